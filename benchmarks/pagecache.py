"""Page-cache control for warm and cold runs, and a check of what is really resident.

"Cold" is only as cold as the eviction worked, so every run records the resident fraction of its files
(`mincore`) right before it starts. Eviction first asks the kernel per file (`posix_fadvise(DONTNEED)`, which
works unprivileged but only drops clean pages not mapped by a live process), and only if pages remain tries
the global `echo 3 > /proc/sys/vm/drop_caches` (root; in containers the write often succeeds and does nothing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path
from typing import Iterable

__all__ = ["drop_caches", "evict", "resident_fraction", "warm", "files_under"]

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_PAGE = mmap.PAGESIZE
_MAP_FAILED = ctypes.c_void_p(-1).value


def files_under(paths: Iterable[Path]) -> list[Path]:
    """Regular files among `paths`, folders expanded recursively."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
    return out


def _resident_pages(path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    pages = (size + _PAGE - 1) // _PAGE
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return sum(b & 1 for b in bytes(vec)), pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_fraction(paths: Iterable[Path]) -> float:
    """Fraction of the files' pages that are in the page cache (0.0 to 1.0; 1.0 when there are none)."""
    resident = total = 0
    for f in files_under(paths):
        r, t = _resident_pages(f)
        resident += r
        total += t
    return resident / total if total else 1.0


def _fadvise_dontneed(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_caches() -> bool:
    """`sync; echo 3 > /proc/sys/vm/drop_caches` (root; every file's clean pages); False when refused."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def evict(paths: Iterable[Path], *, allow_global: bool = True) -> dict[str, object]:
    """Drop the files' pages from the page cache. Returns {"method": ..., "resident_after": fraction}."""
    files = files_under(paths)
    for f in files:
        _fadvise_dontneed(f)
    method = "posix_fadvise(DONTNEED)"
    left = resident_fraction(files)
    if left > 0.05 and allow_global and drop_caches():
        left = resident_fraction(files)
        method += " + drop_caches"
    return {"method": method, "resident_after": round(left, 4)}


def warm(paths: Iterable[Path], *, block: int = 8 * 2**20) -> float:
    """Read the files through once so their pages are cached. Returns the resident fraction after."""
    files = files_under(paths)
    buf = bytearray(block)
    view = memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return resident_fraction(files)
