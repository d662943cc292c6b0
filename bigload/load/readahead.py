"""Reading checkpoint bytes into memory ahead of their use, on several threads, a bounded window ahead.

A load that takes its bytes from memory-mapped files reads the disk through page faults: one stream of
faults, each waiting for the kernel's read-around, leaves an SSD mostly idle (on the benchmark machine one
stream reached about 0.7 of a cold `cat`; 16 MiB reads needed about 8 in flight to approach it, as
`bigload.load.reads` found for offloaded blocks). Advice (`MADV_WILLNEED`) does not help much either: the kernel
reads at most one readahead window (`read_ahead_kb`) per call and does not say when the bytes arrived.

`ReadAhead` reads the byte ranges a consumer will use, in the consumer's order, cut into `CHUNK_BYTES`
pieces, on `THREADS` threads, and never starts a piece more than `window` bytes past what the consumer has
finished with (`wait`), so a checkpoint bigger than memory is not read in faster than it is used (and evicted
before its turn). Each piece is read by `populate`: `madvise(MADV_POPULATE_READ)` (Linux 5.14 and later)
reads the pages into the page cache and maps them, waiting until they are there, then the thread reads one
byte per page (the first CPU access, slow on a VM), so the consumer then neither faults nor waits; no private
memory is used. Pieces all in the page cache when reading starts (`cachestat`, one call each) are skipped
without a thread hand-off, so a warm load is unchanged; of a piece partly in memory only the missing runs of
pages (`mincore`) are read. Where `MADV_POPULATE_READ` does not exist the piece is only advised
(`MADV_WILLNEED`): the load still works, as fast as the kernel's readahead makes it.

`resident`, `advise` and `populate` are the page-level calls, on addresses of mapped memory; the runtime
(`bigload.runtime.hooks`) uses them to prefetch offloaded blocks kept in place.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bigload.errors import CheckpointError

__all__ = ["CHUNK_BYTES", "THREADS", "Extent", "ReadAhead", "advise", "populate", "resident"]

THREADS = 8
CHUNK_BYTES = 32 << 20
WAIT_TIMEOUT_S = 600.0  # one piece; a disk that takes longer is reported, not waited on for ever
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
    about 1 s per 7 GB on the benchmark VM, which the consumer's thread would otherwise pay alone."""
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


_DONE: Future[None] = Future()
_DONE.set_result(None)


@dataclass(frozen=True)
class Extent:
    """`nbytes` bytes of `path` from byte `offset`."""

    path: Path
    offset: int
    nbytes: int


class ReadAhead:
    """Reads the byte ranges of a sequence of uses, in order, on threads, at most `window` bytes ahead.

    `uses[i]` are the ranges use `i` reads (none for a use that reads nothing). The consumer calls
    `wait(i)` before use `i`, in order: it returns once those bytes are in memory, and counts every use
    before `i` as finished, so reading moves on. `read(path, offset, nbytes)` does the reading (on a pool
    thread) and raises the caller's error for a file that is missing or too short; that error is raised
    again by the `wait` that needs the piece. `close` stops reading (pieces in flight finish on their own).

    >>> ahead = ReadAhead(reader.populate, [[Extent(path, 8, 4096)]], window=256 << 20)  # doctest: +SKIP
    >>> ahead.wait(0); use(path); ahead.close()  # doctest: +SKIP
    """

    def __init__(self, read: Callable[[Path, int, int], None], uses: Sequence[Sequence[Extent]], window: int, *,
                 threads: int = THREADS, chunk_bytes: int = CHUNK_BYTES,
                 timeout_s: float = WAIT_TIMEOUT_S) -> None:
        self._read = read
        self._window = max(1, window)
        self._timeout = timeout_s
        self._pieces, self._last = _pieces(uses, max(PAGE, min(chunk_bytes, self._window // threads)))
        self._starts = [0]
        for piece in self._pieces:
            self._starts.append(self._starts[-1] + piece.nbytes)
        # Asked before any piece is read: once reading starts, the kernel's readahead puts pages of the next
        # pieces in the page cache before their bytes arrive, and `cachestat` counts those as cached.
        self._cached = _cached_pieces(self._pieces)
        self._futures: list[Future[None]] = []
        self._done = 0  # pieces before this one are known to be read
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bigload-readahead") \
            if self._pieces else None
        self._submit(needed=0, consumed=0)

    def wait(self, use: int) -> None:
        """Return once use `use`'s bytes are in memory (uses before it count as finished).

        Raises:
            whatever `read` raised for a piece of it; CheckpointError when a piece takes longer than the
            timeout (a stalled disk or network filesystem).
        """
        needed = self._last[use]
        with self._lock:
            # The window counts from where this use starts: the uses before it are finished with.
            self._submit(needed=needed, consumed=self._starts[self._last[use - 1] if use > 0 else 0])
            first, futures = self._done, self._futures[self._done:needed]
        for index, future in enumerate(futures, start=first):
            try:
                future.result(timeout=self._timeout)
            except FutureTimeout:
                piece = self._pieces[index]
                raise CheckpointError(
                    f"{piece.path}: reading {piece.nbytes} bytes at {piece.offset} did not finish in "
                    f"{self._timeout:.0f} s; check the disk (or network filesystem) holding the checkpoint."
                ) from None
        with self._lock:
            self._done = max(self._done, needed)

    def close(self) -> None:
        """Start no more pieces; those being read finish in the background (each is bounded)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _submit(self, *, needed: int, consumed: int) -> None:
        """Start the pieces up to `needed` and those ending within the window past `consumed` bytes."""
        assert self._pool is not None or not self._pieces
        while len(self._futures) < len(self._pieces) and (
                len(self._futures) < needed or self._starts[len(self._futures) + 1] <= consumed + self._window):
            piece = self._pieces[len(self._futures)]
            if self._cached[len(self._futures)]:
                self._futures.append(_DONE)  # warm: no thread hand-off at all
            else:
                self._futures.append(self._pool.submit(  # type: ignore[union-attr]
                    self._read, piece.path, piece.offset, piece.nbytes))


def _cached_pieces(pieces: Sequence[Extent]) -> list[bool]:
    """Whether each piece is all in the page cache: one `cachestat` call per file when all its pieces are
    (the warm case: a few calls instead of one per piece), else one per piece."""
    spans: dict[Path, tuple[int, int]] = {}
    for piece in pieces:
        first, end = spans.get(piece.path, (piece.offset, piece.offset + piece.nbytes))
        spans[piece.path] = (min(first, piece.offset), max(end, piece.offset + piece.nbytes))
    warm = {path for path, (first, end) in spans.items() if cached(path, first, end - first)}
    return [piece.path in warm or cached(piece.path, piece.offset, piece.nbytes) for piece in pieces]


def _pieces(uses: Sequence[Sequence[Extent]], chunk: int) -> tuple[list[Extent], list[int]]:
    """The uses' ranges as pieces of at most `chunk` bytes in use order, ranges that continue one another
    in a file joined (small tensors stored side by side are read together); and, per use, the number of
    pieces up to and including its last byte."""
    pieces: list[Extent] = []
    last: list[int] = []
    for use in uses:
        for extent in use:
            offset, end = extent.offset, extent.offset + extent.nbytes
            while offset < end:
                top = pieces[-1] if pieces else None
                if top is not None and top.path == extent.path and top.offset + top.nbytes == offset \
                        and top.nbytes < chunk:
                    take = min(end - offset, chunk - top.nbytes)
                    pieces[-1] = Extent(top.path, top.offset, top.nbytes + take)
                else:
                    take = min(end - offset, chunk)
                    pieces.append(Extent(extent.path, offset, take))
                offset += take
        last.append(len(pieces))
    return pieces, last
