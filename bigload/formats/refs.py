"""What a checkpoint holds, from headers alone: a `TensorRef` per tensor (where its bytes are) and the
`CheckpointIndex` of them all, with a fingerprint of the files' data. Every format's reader makes these."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from bigload.errors import CheckpointError, CheckpointNotFoundError
from bigload.sizes import dtype_width

__all__ = ["CONTENT_SAMPLE_BYTES", "FINGERPRINT_SAMPLE_BYTES", "SAFETENSORS", "TORCH", "CheckpointIndex", "Extent", "TensorRef", "file_size",
           "stat_key"]

SAFETENSORS = "safetensors"
TORCH = "torch"

# The fingerprint hashes this many bytes at the start of each file's tensor data and at its end, so two
# checkpoints with equal names, shapes, sizes and mtimes (`cp -p`, a tar extraction) still differ, while a
# load stays a few reads per file rather than a pass over every byte.
FINGERPRINT_SAMPLE_BYTES = 64 << 10

# `content_digests` hashes this many bytes at both ends of every tensor (a page each): another checkpoint, or
# a fine-tune that changed any tensor, differs there, and a checkpoint of hundreds of tensors costs two small
# reads per tensor rather than a pass over every byte.
CONTENT_SAMPLE_BYTES = 4096


@dataclass(frozen=True)
class Extent:
    """Where some bytes lie in a file: the one type for a tensor's bytes, read ahead or read explicitly."""

    path: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are in a checkpoint file.

    Attributes:
        name: the tensor's name in the checkpoint (e.g. "model.layers.0.mlp.up_proj.weight").
        dtype: the stored dtype.
        shape: the stored shape.
        file: absolute path of the file holding the bytes.
        offset: absolute byte offset, in `file`, of the tensor's first element.
        nbytes: length of the byte range the tensor spans in `file` (numel x width when contiguous).
        format: "safetensors" or "torch".
        stride: element strides when the stored tensor is not row-major contiguous (a transposed view
            saved by `torch.save`); None means contiguous.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int
    format: str
    stride: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def size_bytes(self) -> int:
        """Bytes the tensor holds once materialized contiguously (numel x width)."""
        return self.numel * dtype_width(self.dtype)


@dataclass(frozen=True)
class CheckpointIndex:
    """Every tensor of a checkpoint, from headers only.

    Attributes:
        root: the folder the checkpoint lives in.
        format: "safetensors" or "torch".
        files: the data files, in the order tensors are listed.
        tensors: name -> TensorRef, in file order then offset order (the order that reads the disk forward).
        metadata: string metadata (safetensors `__metadata__`, or the index file's "metadata" section).
        total_bytes: sum of every tensor's byte range.
        file_stats: file -> (size, mtime_ns) when it was indexed; `check_unchanged` compares against it.
    """

    root: Path
    format: str
    files: tuple[Path, ...]
    tensors: Mapping[str, TensorRef]
    metadata: Mapping[str, str] = field(default_factory=dict)
    total_bytes: int = 0
    file_stats: Mapping[Path, tuple[int, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def check_unchanged(self, *paths: Path) -> None:
        """Refuse files that changed since they were indexed: the offsets in `tensors` may no longer hold.

        Args:
            paths: the files to check; none checks every file of the index.

        Raises:
            CheckpointError: a file is gone, or its size or mtime differs from when it was indexed.
        """
        for path in paths or self.files:
            indexed = self.file_stats.get(path)
            if indexed is None:
                continue
            try:
                stat = path.stat()
            except OSError as exc:
                raise CheckpointError(
                    f"{path}: cannot read it any more ({exc.strerror or exc}); it was deleted or moved after it "
                    "was indexed. Open the checkpoint again."
                ) from None
            if (stat.st_size, stat.st_mtime_ns) != indexed:
                raise CheckpointError(
                    f"{path} changed after it was indexed (size {indexed[0]} -> {stat.st_size} bytes, mtime "
                    f"{indexed[1]} -> {stat.st_mtime_ns} ns); open it again."
                )

    def fingerprint(self) -> str:
        """A stable hash of file names, sizes, mtimes, a sample of each file's bytes, every tensor's header
        entry and the metadata.

        Two indexes of the same unchanged files give the same fingerprint, even after the folder is moved
        (names are relative to `root`); touching or rewriting a file changes it, and so do other bytes under
        the same names, sizes and mtimes (`cp -p` of another checkpoint) where they differ in the first or
        last `FINGERPRINT_SAMPLE_BYTES` of a file's tensor data.

        Raises:
            CheckpointError: a file changed since it was indexed (see `check_unchanged`).
        """
        self.check_unchanged()
        data_start: dict[Path, int] = {}
        for ref in self.tensors.values():
            data_start[ref.file] = min(ref.offset, data_start.get(ref.file, ref.offset))
        digest = hashlib.sha256()
        digest.update(self.format.encode())
        for path in self.files:
            size, mtime_ns = self.file_stats.get(path) or stat_key(path)
            digest.update(f"\0{_relative(path, self.root)}\0{size}\0{mtime_ns}".encode())
            digest.update(_sample(path, data_start.get(path, 0), size))
        for ref in self.tensors.values():
            entry = (ref.name, str(ref.dtype), ref.shape, _relative(ref.file, self.root), ref.offset,
                     ref.nbytes, ref.stride)
            digest.update(repr(entry).encode())
        digest.update(json.dumps(dict(self.metadata), sort_keys=True).encode())
        return digest.hexdigest()


    def content_digests(self) -> dict[str, str]:
        """What each data file holds, by its name relative to `root`: a hash of its tensors' header entries
        (name, dtype, shape) and the first and last `CONTENT_SAMPLE_BYTES` of every tensor's bytes.

        Unlike `fingerprint`, no mtime, path, offset or file size enters it, so copies of one checkpoint on
        different machines agree (the ranks of a pipeline compare these), as do files re-saved with other
        header padding; other weights under the same names and sizes differ, unless every changed tensor
        differs only away from both of its ends.

        Raises:
            CheckpointError: a file changed since it was indexed, or cannot be read.
        """
        self.check_unchanged()
        by_file: dict[Path, list[TensorRef]] = {path: [] for path in self.files}
        for ref in self.tensors.values():
            by_file.setdefault(ref.file, []).append(ref)
        return {_relative(path, self.root): _content_digest(path, sorted(refs, key=lambda r: (r.offset, r.name)))
                for path, refs in by_file.items()}


def stat_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _sample(path: Path, start: int, size: int) -> bytes:
    """The first and last `FINGERPRINT_SAMPLE_BYTES` of `path` from byte `start` on (all of it if shorter)."""
    tail = max(start, size - FINGERPRINT_SAMPLE_BYTES)
    with open(path, "rb") as handle:
        handle.seek(start)
        head = handle.read(min(FINGERPRINT_SAMPLE_BYTES, tail - start))
        handle.seek(tail)
        return head + handle.read(size - tail)


def _content_digest(path: Path, refs: Iterable[TensorRef]) -> str:
    """See `CheckpointIndex.content_digests`: one file's tensors' entries and both ends of each."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for ref in refs:
                digest.update(repr((ref.name, str(ref.dtype), ref.shape, ref.nbytes, ref.stride)).encode())
                head = min(ref.nbytes, CONTENT_SAMPLE_BYTES)
                tail = max(head, ref.nbytes - CONTENT_SAMPLE_BYTES)
                for start, length in ((ref.offset, head), (ref.offset + tail, ref.nbytes - tail)):
                    handle.seek(start)
                    digest.update(handle.read(length))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc}).") from None
    return digest.hexdigest()


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def file_size(path: Path) -> int:
    """The size of a checkpoint file.

    Raises:
        CheckpointError: it does not exist.
    """
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such checkpoint file.") from None
