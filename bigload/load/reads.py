"""Explicit reads of offloaded blocks: a block's file ranges read with large `preadv` calls into a slot buffer.

Used for disk blocks when they do not fit in memory (`reserve.DiskReads.READ`, decided by the planner). Used
in place through `mmap`, such a block is read by page faults, and the page cache, full, evicts the pages of
the block about to run; reading it explicitly, ahead of use, into a slot the runtime owns avoids both, and a
file that shrank becomes an `OffloadError` instead of a SIGBUS.

`layout` says where each tensor of a block lands in the slot. Tensors adjacent in one file form a run, read
rounded out to `READ_ALIGN` into an aligned place of the slot, so each run is read with `O_DIRECT` (no page
cache at all) and each tensor is a view at its offset. When the rounded runs do not fit the slot, or a tensor
is not aligned to its element width in its file, the block is laid out packed and read through the page cache
(still explicit: no page faults, errors raised; the pages read are dropped again).

`BlockReader` reads a layout into a buffer: every run cut into `CHUNK_BYTES` pieces, `READERS` threads
reading at once (one stream of reads leaves an SSD mostly idle; how many must be in flight is measured in
benchmarks/ANALYSIS.md, "Measurements behind the code"). A file that refuses `O_DIRECT` (tmpfs, some network
filesystems) is read through the page cache.
"""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from bigload.errors import OffloadError, OffloadIOError
from bigload.formats.refs import Extent  # where a tensor's bytes are: one type for both read paths
from bigload.plan.reserve import READ_ALIGN

__all__ = ["CHUNK_BYTES", "READERS", "BlockLayout", "BlockRead", "BlockReader", "Extent", "Run", "layout"]

READERS = 8
CHUNK_BYTES = 16 << 20
READ_TIMEOUT_S = 600.0  # one block read; a disk that takes longer is reported, not waited on for ever
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


@dataclass(frozen=True)
class Run:
    """One range of a file read into the slot: `length` bytes from file offset `start` to slot offset `into`;
    the file must have at least `needed` bytes from `start` (the end of the last tensor in the run)."""

    path: Path
    start: int
    length: int
    into: int
    needed: int


@dataclass(frozen=True)
class BlockLayout:
    """How one block is read: its runs, each tensor's offset in the slot (in the block's entry order),
    whether the runs are aligned for `O_DIRECT`, and the slot bytes used."""

    runs: tuple[Run, ...]
    offsets: tuple[int, ...]
    direct: bool
    nbytes: int


def _down(value: int) -> int:
    return value - value % READ_ALIGN


def _up(value: int) -> int:
    return -(-value // READ_ALIGN) * READ_ALIGN


def layout(extents: Sequence[Extent], widths: Sequence[int], packed: Sequence[int], slot_bytes: int) -> BlockLayout:
    """Where a block's tensors go in its slot, and the reads that put them there.

    Args:
        extents: each tensor's bytes on disk.
        widths: each tensor's element width (its view must start at a multiple of it).
        packed: each tensor's offset in the slot when laid out tightly (the runtime's own layout).
        slot_bytes: the slot's size.

    Returns:
        Aligned runs when they fit in `slot_bytes`, else the packed layout (one buffered read per tensor).

    >>> layout([Extent(Path("a"), 8, 16)], [2], [0], 8192).runs[0]
    Run(path=PosixPath('a'), start=0, length=4096, into=0, needed=24)
    """
    aligned = _aligned_layout(extents, widths)
    if aligned is not None and aligned.nbytes <= slot_bytes:
        return aligned
    runs = tuple(Run(e.path, e.offset, e.nbytes, at, e.nbytes) for e, at in zip(extents, packed) if e.nbytes)
    used = max((at + e.nbytes for e, at in zip(extents, packed)), default=0)
    return BlockLayout(runs, tuple(packed), False, used)


def _aligned_layout(extents: Sequence[Extent], widths: Sequence[int]) -> BlockLayout | None:
    if any(e.offset % width for e, width in zip(extents, widths)):
        return None  # a view could not start there in an aligned slot
    order = sorted(range(len(extents)), key=lambda i: (str(extents[i].path), extents[i].offset))
    groups: list[list[int]] = []
    for i in order:
        extent = extents[i]
        if groups:
            last = groups[-1]
            end = max(extents[j].offset + extents[j].nbytes for j in last)
            if extents[last[0]].path == extent.path and extent.offset <= _up(end):
                last.append(i)
                continue
        groups.append([i])
    runs, offsets, cursor = [], [0] * len(extents), 0
    for group in groups:
        start = _down(extents[group[0]].offset)
        end = max(extents[j].offset + extents[j].nbytes for j in group)
        for j in group:
            offsets[j] = cursor + extents[j].offset - start
        runs.append(Run(extents[group[0]].path, start, _up(end) - start, cursor, end - start))
        cursor += _up(end) - start
    return BlockLayout(tuple(runs), tuple(offsets), True, cursor)


class BlockReader:
    """Reads block layouts into buffers with a pool of reader threads; keeps its files open until `close`.

    Safe to call from one thread at a time per buffer (the runtime's prefetch thread and the caller's thread
    never read into the same slot).
    """

    def __init__(self, readers: int = READERS, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.readers = readers
        self.chunk_bytes = _up(chunk_bytes)
        self._pool: ThreadPoolExecutor | None = None
        self._fds: dict[tuple[Path, bool], int] = {}
        self._stale: list[int] = []  # descriptors of files replaced since (`reopen`), closed at `close`
        self._buffered_only: set[Path] = set()  # files that refused O_DIRECT
        self._lock = threading.Lock()

    def read(self, block: BlockLayout, buffer: torch.Tensor, *, what: str = "block") -> None:
        """Fill `buffer` (a CPU uint8 tensor of at least `block.nbytes`) as `block` says; returns when done.

        Raises:
            OffloadError: a file is missing, unreadable or shorter than the layout needs (truncated or
                changed since it was written), or the reads did not finish within `READ_TIMEOUT_S`.
        """
        self.start(block, buffer, what=what).wait()

    def start(self, block: BlockLayout, buffer: torch.Tensor, *, what: str = "block") -> "BlockRead":
        """Queue the reads of `block` into `buffer` and return at once; `BlockRead.wait` or its `future` tells
        when every piece has landed. Reads of several blocks (into different buffers) can be in flight at once:
        their pieces queue in order, so the reader threads go on to the next block's first pieces while the
        last pieces of one are still being read (a block's tail alone leaves most of them idle)."""
        direct = block.direct and bool(_O_DIRECT) and buffer.data_ptr() % READ_ALIGN == 0
        view = memoryview(buffer.numpy()).cast("B")
        pool = self._executor()
        pieces = [pool.submit(self._read_piece, run, pos, min(self.chunk_bytes, run.length - pos), view, direct)
                  for run in block.runs for pos in range(0, run.length, self.chunk_bytes)]
        return BlockRead(pieces, what)

    @property
    def buffered_files(self) -> tuple[Path, ...]:
        """Files read through the page cache because they refused `O_DIRECT`."""
        return tuple(sorted(self._buffered_only))

    def reopen(self, paths: Iterable[Path]) -> None:
        """Open these files afresh on their next read (they were replaced, e.g. by `DiskStore.rewrite`). The
        old descriptors stay open until `close`: a read in flight may still use them."""
        wanted = set(paths)
        with self._lock:
            for key in [key for key in self._fds if key[0] in wanted]:
                self._stale.append(self._fds.pop(key))

    def close(self) -> None:
        """Stop the reader threads (after the reads in flight) and close the files."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
            fds += self._stale
            self._stale = []
        for fd in fds:
            os.close(fd)

    # -- internals

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="bigload-read")
            return self._pool

    def _read_piece(self, run: Run, pos: int, length: int, view: memoryview, direct: bool) -> None:
        dest = view[run.into + pos: run.into + pos + length]
        direct = direct and run.path not in self._buffered_only
        try:
            got = _pread_full(self._fd(run.path, direct), dest, run.start + pos)
        except OSError as error:
            if not (direct and error.errno == errno.EINVAL):
                raise OffloadIOError(f"{run.path}: reading {length} bytes at {run.start + pos} failed "
                                     f"({error.strerror or error}); check the disk and the file.", error.errno) from None
            self._buffered_only.add(run.path)  # the filesystem accepted O_DIRECT on open, not on read
            return self._read_piece(run, pos, length, view, False)
        if got < min(length, run.needed - pos):
            raise OffloadError(
                f"{run.path}: needs bytes up to {run.start + run.needed} but ends at {run.start + pos + got}; it was "
                "truncated or changed after the model was loaded. Load the model again (delete the offload folder "
                "if it is the one damaged).")
        if not direct and _DONTNEED is not None:
            # Read once per pass and too big to keep: leave the page cache to what fits.
            os.posix_fadvise(self._fd(run.path, False), run.start + pos, length, _DONTNEED)

    def _fd(self, path: Path, direct: bool) -> int:
        key = (path, direct)
        with self._lock:
            fd = self._fds.get(key)
            if fd is not None:
                return fd
            try:
                fd = os.open(path, os.O_RDONLY | (_O_DIRECT if direct else 0))
            except OSError as error:
                if direct and error.errno == errno.EINVAL:
                    self._buffered_only.add(path)  # tmpfs and others refuse O_DIRECT when opening
                    key = (path, False)
                    fd = self._fds.get(key) or os.open(path, os.O_RDONLY)
                else:
                    raise OffloadIOError(f"{path}: cannot open the file ({error.strerror or error}); it was deleted "
                                         "or moved after the model was loaded. Load the model again.",
                                         error.errno) from None
            self._fds[key] = fd
            return fd


class BlockRead:
    """One block's reads in flight (`BlockReader.start`). `future` is done once every piece has landed (none
    still writes into the buffer), with the first piece's error if one failed."""

    def __init__(self, pieces: Sequence[Future[None]], what: str) -> None:
        self.what = what
        self.future: Future[None] = Future()
        self._pieces = list(pieces)
        self._left = len(self._pieces)
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        if not self._pieces:
            self.future.set_result(None)
        for piece in self._pieces:
            piece.add_done_callback(self._landed)

    def wait(self, timeout: float = READ_TIMEOUT_S) -> None:
        """Return once every piece has landed.

        Raises:
            OffloadError: a piece failed (its error), or the pieces did not all land within `timeout` seconds
                (those not started are cancelled).
        """
        try:
            self.future.result(timeout=timeout)
        except FutureTimeout:
            for piece in self._pieces:
                piece.cancel()
            raise OffloadError(f"reading {self.what} from disk did not finish in {timeout:.0f} s; check the disk "
                               "holding the offload folder (or the checkpoint it points into).") from None

    def _landed(self, piece: Future[None]) -> None:
        error = OffloadError(f"reading {self.what} was cancelled") if piece.cancelled() else piece.exception()
        with self._lock:
            self._left -= 1
            self._error = self._error or error
            if self._left:
                return
        if self._error is not None:
            self.future.set_exception(self._error)
        else:
            self.future.set_result(None)


def _pread_full(fd: int, dest: memoryview, offset: int) -> int:
    """Read into all of `dest` from `offset`, or up to the end of the file; returns the bytes read."""
    done = 0
    while done < len(dest):
        count = os.preadv(fd, [dest[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done
