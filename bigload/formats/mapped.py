"""Reading checkpoint bytes: copy-on-write mappings of the files, shared by every tensor viewing them
(`MappedFiles`), and zero-copy reads of indexed tensors (`CheckpointReader`).

`CheckpointReader(index).read(ref)` returns a CPU tensor that is a view of a copy-on-write mmap of the file:
the pages stay file-backed (the kernel may drop and re-read them), so a loaded model costs no private memory
until someone writes to its weights.

Every mapping is registered (`mapped_uses`), so code that runs on such views can ask, before it touches them,
whether their files are still what was mapped (`check_mapped`): a file truncated under a mapping kills the
process with SIGBUS at the next access past its new end, which no Python code can catch.
"""

from __future__ import annotations

import bisect
import ctypes
import math
import mmap
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterable, Sequence

import torch

from bigload.errors import BigloadError, CheckpointError
from bigload.formats import pages
from bigload.formats.refs import CheckpointIndex, TensorRef
from bigload.formats.torch_archive import strided_extent
from bigload.sizes import dtype_width

__all__ = ["CheckpointReader", "FileUse", "MappedFiles", "check_mapped", "mapped_uses"]

# A file's identity as `stat` gives it: (device, inode, size, mtime_ns).
Identity = tuple[int, int, int, int]


def identity_of(stat: os.stat_result) -> Identity:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class MappedFiles:
    """Copy-on-write (`MAP_PRIVATE`) mappings of files, each mapped once, shared by every tensor viewing it.

    Views are file-backed page cache, not private memory: the kernel may drop and re-read the pages, and
    writing to a view copies only the touched pages and never changes the file. A mapping lives as long as
    any tensor views it, so views stay valid after `clear()`. Safe to use from several threads.

    `check`, if given, is called with each file and the `os.fstat` of the file mapped before its mapping is
    first used (after the byte range asked for is known to be inside it) and may raise to refuse the file;
    `CheckpointReader` passes its index's `check_unchanged`, `DiskStore` compares with what it checked.
    `error` is the type `check_mapped` raises for a file of these mappings that changed under them.
    """

    def __init__(self, check: Callable[[Path, os.stat_result], None] | None = None, *,
                 error: type[BigloadError] = CheckpointError) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._check = check
        self._error = error

    def clear(self) -> None:
        """Forget the mappings; each is unmapped once no tensor views it any more."""
        with self._lock:
            self._maps.clear()

    def view(self, path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...],
             stride: tuple[int, ...] | None = None, *, what: str = "",
             error: type[BigloadError] = CheckpointError) -> torch.Tensor:
        """A CPU tensor viewing `path` from byte `offset` (zero-copy when `offset` is dtype-aligned).

        An unaligned offset (a safetensors header whose length is not padded) gets an aligned private copy.

        Raises:
            `error` (CheckpointError by default): the file is missing, cannot be mapped, or is shorter than
                the tensor needs; or whatever `check` raises for the file.
        """
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        width = dtype_width(dtype)
        nbytes = (strided_extent(shape, stride) if stride is not None else numel) * width
        mapping = self._mapping(path, error, end=offset + nbytes, what=what)
        if offset % width == 0:
            flat = torch.frombuffer(mapping, dtype=dtype, count=nbytes // width, offset=offset)
        else:
            flat = torch.frombuffer(bytearray(mapping[offset:offset + nbytes]), dtype=dtype)
        return flat.view(shape) if stride is None else flat.as_strided(shape, stride)

    def populate(self, path: Path, offset: int, nbytes: int, *,
                 error: type[BigloadError] = CheckpointError) -> None:
        """Read these bytes of `path` into memory and map them, returning once they are there
        (`pages.populate`: pages already in memory are left alone; only advised on old kernels).

        Raises:
            `error` (CheckpointError by default): the file is missing, shorter than `offset + nbytes`, shrank
                after it was mapped, or could not be read; or whatever `check` raises for the file.
        """
        if nbytes <= 0:
            return
        mapping = self._mapping(path, error, end=offset + nbytes)
        anchor = ctypes.c_char.from_buffer(mapping)  # holds the mapping open while the kernel reads into it
        failure = pages.populate(ctypes.addressof(anchor) + offset, nbytes)
        del anchor
        if failure:
            raise error(
                f"{path}: reading bytes {offset}..{offset + nbytes} failed ({os.strerror(failure)}); the file was "
                "truncated or changed after it was indexed, or the disk failed. Open it again or write it again."
            )

    def release(self, path: Path, offset: int, nbytes: int) -> None:
        """Unmap these bytes' whole pages from this process; the page cache keeps them (no-op where unsupported).

        For bytes already copied elsewhere (a cast, a GPU, an offload file): without it every page a load
        reads stays mapped until the load ends, and the process's file-backed RSS grows to the checkpoint's
        size. Views of these bytes stay valid: the mapping is never written, so a later access faults the
        same bytes back in from the file.
        """
        advice = getattr(mmap, "MADV_DONTNEED", None)
        with self._lock:
            mapping = self._maps.get(path)
        if advice is None or mapping is None:
            return
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: neighbours may still be in use
        end = min(len(mapping), offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            mapping.madvise(advice, start, end - start)

    def _mapping(self, path: Path, error: type[BigloadError], *, end: int = 0, what: str = "") -> mmap.mmap:
        """`path`'s mapping, holding at least `end` bytes (needed for `what`); mapped and checked on first use."""
        with self._lock:
            mapping = self._maps.get(path)
            known = mapping is not None
            if mapping is None:
                mapping, stat = _map_private(path, error)
            if end > len(mapping):
                raise error(
                    f"{path}: {what or 'a tensor'} needs bytes up to {end} but the file has {len(mapping)}; it "
                    "was truncated or changed after it was indexed. Open it again or write it again."
                )
            if not known:
                # Only a mapping the check accepted is kept, so a refused file is checked again next time.
                if self._check is not None:
                    self._check(path, stat)
                self._maps[path] = mapping
                _register(mapping, path, identity_of(stat), self._error)
            return mapping


def _map_private(path: Path, error: type[BigloadError]) -> tuple[mmap.mmap, os.stat_result]:
    """A copy-on-write mapping of the whole file, and the `fstat` of the file it maps."""
    try:
        with open(path, "rb") as handle:
            # ACCESS_COPY: writable for torch.frombuffer, yet never writes back to the file.
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY), os.fstat(handle.fileno())
    except (OSError, ValueError) as exc:  # ValueError: mmap refuses an empty file
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise error(
            f"{path}: cannot map the file ({reason}); it was deleted, emptied or changed after it was indexed. "
            "Open it again or write it again."
        ) from None


class CheckpointReader:
    """Zero-copy reads of tensors listed in a CheckpointIndex.

    Each file is mapped once, copy-on-write, on first use (see `MappedFiles`); tensors stay valid after the
    reader is closed. Safe to use from several threads.

    >>> index = open_checkpoint("model.safetensors")  # doctest: +SKIP
    >>> with CheckpointReader(index) as reader:  # doctest: +SKIP
    ...     weight = reader.read(index.tensors["lm_head.weight"])
    """

    def __init__(self, index: CheckpointIndex) -> None:
        self.index = index
        self._files = MappedFiles(lambda path, _: index.check_unchanged(path))

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Forget the mappings; tensors already read keep theirs alive."""
        self._files.clear()

    def read(self, ref: TensorRef) -> torch.Tensor:
        """The tensor's stored bytes as a CPU tensor in its stored dtype and shape.

        Zero-copy (a view of the file mapping) when the offset is a multiple of the dtype width; otherwise
        the bytes are copied into aligned private memory.

        Raises:
            CheckpointError: the file is gone, shrank, or changed size or mtime since it was indexed.
        """
        return self._files.view(ref.file, ref.offset, ref.dtype, ref.shape, ref.stride,
                                what=f"tensor {ref.name!r}")

    def populate(self, path: Path, offset: int, nbytes: int) -> None:
        """Read these bytes of one of the index's files into memory, returning once they are there (see
        `MappedFiles.populate`); `readahead.ReadAhead` calls it on its threads.

        Raises:
            CheckpointError: the file is gone, shrank, failed to read, or changed since it was indexed.
        """
        self._files.populate(path, offset, nbytes)

    def release(self, refs: Iterable[TensorRef]) -> None:
        """Unmap the pages of tensors whose bytes were copied elsewhere (see `MappedFiles.release`)."""
        for ref in refs:
            self._files.release(ref.file, ref.offset, ref.nbytes)


# ---------------------------------------------------------------------------------------------------------
# which mapped files tensors view, and whether those files are still what was mapped


@dataclass(frozen=True)
class _Mapping:
    """A registered mapping: where it is in memory, the file and its identity when mapped."""

    start: int
    length: int
    path: Path
    identity: Identity
    mapping: "weakref.ref[mmap.mmap]"
    error: type[BigloadError]


_registry: dict[int, _Mapping] = {}  # by start address; an entry goes when its mapping is collected
_starts: list[int] = []  # sorted
_registry_lock = threading.Lock()


def _register(mapping: mmap.mmap, path: Path, identity: Identity, error: type[BigloadError]) -> None:
    anchor = ctypes.c_char.from_buffer(mapping)
    start = ctypes.addressof(anchor)
    del anchor  # an exported buffer would keep the mapping from ever being closed
    ref = weakref.ref(mapping, lambda _: _forget(start))  # runs before the pages are unmapped
    with _registry_lock:
        if start not in _registry:
            bisect.insort(_starts, start)
        _registry[start] = _Mapping(start, len(mapping), path, identity, ref, error)


def _forget(start: int) -> None:
    with _registry_lock:
        if _registry.pop(start, None) is not None:
            del _starts[bisect.bisect_left(_starts, start)]


@dataclass(frozen=True)
class FileUse:
    """The bytes of one mapped file that some tensors view: up to `end` (exclusive)."""

    mapped: _Mapping
    end: int

    @property
    def path(self) -> Path:
        return self.mapped.path


def mapped_uses(tensors: Iterable[torch.Tensor]) -> tuple[FileUse, ...]:
    """The mapped files these tensors view (through `MappedFiles`), each with the end of the bytes they need.
    Tensors that view no mapping (private memory, other devices) are left out. Reads no tensor's data."""
    ends: dict[int, int] = {}
    with _registry_lock:
        for tensor in tensors:
            if tensor.device.type != "cpu" or tensor.numel() == 0 or tensor.layout != torch.strided:
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            at = bisect.bisect_right(_starts, pointer) - 1
            if at < 0:
                continue
            found = _registry[_starts[at]]
            if pointer < found.start + found.length:
                end = pointer - found.start + storage.nbytes()
                ends[found.start] = max(end, ends.get(found.start, 0))
        return tuple(FileUse(_registry[start], end) for start, end in ends.items())


def check_mapped(uses: Sequence[FileUse], what: str) -> None:
    """Refuse files that changed under these uses since they were mapped; call before touching the views.

    A file still under its name is compared with its identity when mapped (one `stat`): shorter than the bytes
    used means truncated; another size or mtime means written in place. A file replaced or removed under its
    name (a writer that renames its new file over it) is still mapped as it was; only its own size is checked
    (one `fstat`). Covers changes before the call: a file truncated while the views are being read can still
    end the process with SIGBUS.

    Raises:
        the mapping's error type (`MappedFiles(error=...)`: `CheckpointError` for checkpoint files,
        `OffloadError` for offload stores), naming the file, what uses it and the fix.
    """
    for use in uses:
        mapped, mapping = use.mapped, use.mapped.mapping()
        if mapping is None:
            continue
        try:
            stat: os.stat_result | None = os.stat(mapped.path)
        except OSError:
            stat = None
        if stat is not None and (stat.st_dev, stat.st_ino) == mapped.identity[:2]:
            size = stat.st_size
            if size >= use.end and (size, stat.st_mtime_ns) != mapped.identity[2:]:
                raise mapped.error(
                    f"{mapped.path} changed after it was mapped (size {mapped.identity[2]} -> {size} bytes, mtime "
                    f"{mapped.identity[3]} -> {stat.st_mtime_ns} ns; written in place): {what} would read bytes "
                    "that were never checked. Replace such files by renaming a new file over them, and load "
                    "the model again."
                )
        else:
            size = mapping.size()
        if size < use.end:
            raise mapped.error(
                f"{mapped.path}: {what} needs its bytes up to {use.end}, but the file now ends at {size}: it was "
                "truncated after the model mapped it, and reading on would end the process with SIGBUS. Restore "
                "the file (or write the offload folder again) and load the model again."
            )
