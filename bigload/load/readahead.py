"""Reading checkpoint bytes into memory ahead of their use, on several threads, a bounded window ahead.

A load that takes its bytes from memory-mapped files reads the disk through page faults: one stream of
faults, each waiting for the kernel's read-around, leaves an SSD mostly idle (benchmarks/ANALYSIS.md,
"Measurements behind the code"). Advice (`MADV_WILLNEED`) does not help much either: the kernel
reads at most one readahead window (`read_ahead_kb`) per call and does not say when the bytes arrived.

`ReadAhead` reads the byte ranges a consumer will use, in the consumer's order, cut into `CHUNK_BYTES`
pieces, on `THREADS` threads, and never starts a piece more than `window` bytes past what the consumer has
finished with (`wait`), so a checkpoint bigger than memory is not read in faster than it is used (and evicted
before its turn). Each piece is read by `formats.pages.populate`: `madvise(MADV_POPULATE_READ)` (Linux 5.14 and later)
reads the pages into the page cache and maps them, waiting until they are there, then the thread reads one
byte per page (the first CPU access, slow on a VM), so the consumer then neither faults nor waits; no private
memory is used. Pieces all in the page cache when reading starts (`cachestat`, one call each) are skipped
without a thread hand-off, so a warm load is unchanged; of a piece partly in memory only the missing runs of
pages (`mincore`) are read. Where `MADV_POPULATE_READ` does not exist the piece is only advised
(`MADV_WILLNEED`): the load still works, as fast as the kernel's readahead makes it.

The page-level calls themselves are `bigload.formats.pages`'.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Callable, Sequence

from bigload.errors import CheckpointError
from bigload.formats.pages import PAGE, cached
from bigload.formats.refs import Extent

__all__ = ["CHUNK_BYTES", "THREADS", "Extent", "ReadAhead"]

THREADS = 8
CHUNK_BYTES = 32 << 20
WAIT_TIMEOUT_S = 600.0  # one piece; a disk that takes longer is reported, not waited on for ever
_DONE: Future[None] = Future()
_DONE.set_result(None)


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
