"""Page-cache calls on mapped files, by address: which pages are in memory (`mincore`, `cachestat`), advice
to read them (`MADV_WILLNEED`), and reading them in and mapping them (`MADV_POPULATE_READ`). The loader's
read-ahead threads, the checkpoint mappings and the runtime's prefetch of blocks kept in place use them.

Called through ctypes, which releases the GIL for the call (Python's `mmap.madvise` holds it), so several
threads can wait on the disk at once. Where a call does not exist (Windows, old kernels) it degrades to advice
or to nothing: page faults then read the bytes.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["MADV_POPULATE_READ", "MADV_WILLNEED", "PAGE", "advise", "cached", "populate", "resident"]

PAGE = mmap.PAGESIZE
MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)
MADV_POPULATE_READ = 22  # <linux/mman.h>; Python's mmap module does not name it
_GAP_PAGES = 256  # resident runs shorter than this (1 MiB of 4 KiB pages) are read over, not around


def _libc_calls() -> tuple[Any, Any, Any]:
    """`madvise`, `mincore` and `syscall` from the C library, or Nones where they do not exist (Windows).

    Called through ctypes, which releases the GIL for the call (Python's `mmap.madvise` holds it), so
    several threads can wait on the disk at once.
    """
    if MADV_WILLNEED is None or sys.platform == "win32":
        return None, None, None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise, mincore, syscall = libc.madvise, libc.mincore, libc.syscall
    except (OSError, AttributeError):
        return None, None, None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    madvise.restype = mincore.restype = ctypes.c_int
    syscall.restype = ctypes.c_long
    return madvise, mincore, syscall


_madvise, _mincore, _syscall = _libc_calls()
_populate_works = sys.platform.startswith("linux")  # cleared on the first EINVAL (a kernel before 5.14)
_cachestat_works = sys.platform.startswith("linux") and _syscall is not None  # cleared before Linux 6.5
_CACHESTAT = 451  # the same number on every Linux architecture


def _pages(address: int, length: int) -> tuple[int, int]:
    start = address - address % PAGE
    return start, length + address - start


def _residency(address: int, length: int) -> bytes | None:
    """One byte per page of `[address, address + length)`, nonzero where the page is in memory; None when
    unknown (no `mincore`, or it failed)."""
    if _mincore is None:
        return None
    start, span = _pages(address, length)
    vector = ctypes.create_string_buffer((span + PAGE - 1) // PAGE)
    return vector.raw if _mincore(start, span, vector) == 0 else None


def resident(address: int, length: int) -> bool:
    """Whether every page of mapped memory `[address, address + length)` is in memory (False if unknown)."""
    if length <= 0:
        return _mincore is not None
    pages = _residency(address, length)
    return pages is not None and b"\x00" not in pages


def advise(address: int, length: int) -> None:
    """Ask the kernel to start reading these mapped pages in the background (advice: failures change nothing)."""
    if _madvise is not None and length > 0:
        _madvise(*_pages(address, length), MADV_WILLNEED)


def populate(address: int, length: int) -> int:
    """Read these mapped pages into memory and map them, returning once they are there.

    Only the runs of pages not in memory (`mincore`) are read, so pages already there stay as they were.
    Returns 0, or the errno of the failure: `EFAULT` when the range reaches past the end of the file (it
    shrank after it was mapped), `EIO` for a read error. Without `MADV_POPULATE_READ` (Linux before 5.14)
    the pages are only advised.
    """
    if _madvise is None or length <= 0:
        return 0
    start, span = _pages(address, length)
    pages = _residency(start, span)
    runs = _missing_runs(pages) if pages is not None else [(0, (span + PAGE - 1) // PAGE)]
    for first, end in runs:
        failure = _populate_pages(start + first * PAGE, min(span, end * PAGE) - first * PAGE)
        if failure:
            return failure
    return 0


def cached(path: Path, offset: int, length: int) -> bool:
    """Whether every page of `length` bytes of `path` from `offset` is in the page cache; False if unknown.

    One `cachestat` call (Linux 6.5 and later): microseconds, where `mincore` on a mapping takes about a
    millisecond per 32 MiB, which made a warm load of 7 GB 0.25 s slower.
    """
    global _cachestat_works
    if not _cachestat_works or length <= 0:
        return length <= 0
    first, last = offset // PAGE, (offset + length - 1) // PAGE
    request, stat = _CachestatRange(first * PAGE, (last - first + 1) * PAGE), _Cachestat()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if _syscall(_CACHESTAT, fd, ctypes.byref(request), ctypes.byref(stat), 0) != 0:  # type: ignore[misc]
            _cachestat_works = ctypes.get_errno() not in (errno.ENOSYS, errno.EPERM)  # before 6.5, or seccomp
            return False
    finally:
        os.close(fd)
    return stat.nr_cache >= last - first + 1


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def _first_touch(start: int, span: int) -> None:
    """Read one byte of every page, here on a reader thread rather than in the consumer: on a virtual
    machine the first CPU access to a page the disk just wrote costs microseconds (the hypervisor maps it),
    which the consumer's thread would otherwise pay alone (benchmarks/ANALYSIS.md)."""
    pages = torch.frombuffer((ctypes.c_char * span).from_address(start), dtype=torch.uint8)
    pages[::PAGE].sum()  # torch releases the GIL: the threads touch in parallel


def _missing_runs(pages: bytes) -> list[tuple[int, int]]:
    """The runs `[first, end)` of pages not in memory, gaps shorter than `_GAP_PAGES` joined (one call for
    a scattered few is cheaper than many)."""
    runs: list[tuple[int, int]] = []
    for match in re.finditer(b"\x00+", pages):
        if runs and match.start() - runs[-1][1] < _GAP_PAGES:
            runs[-1] = (runs[-1][0], match.end())
        else:
            runs.append((match.start(), match.end()))
    return runs


def _populate_pages(start: int, span: int) -> int:
    global _populate_works
    if _populate_works:
        if _madvise(start, span, MADV_POPULATE_READ) == 0:  # type: ignore[misc]  # checked by the caller
            _first_touch(start, span)
            return 0
        failure = ctypes.get_errno()
        if failure != errno.EINVAL:
            return failure
        _populate_works = False  # an older kernel: advice is all there is
    _madvise(start, span, MADV_WILLNEED)  # type: ignore[misc]
    return 0
