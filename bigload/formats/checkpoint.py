"""Checkpoint formats: a header-only index of every tensor, and zero-copy reads.

`open_checkpoint(path)` accepts a `.safetensors` file, a sharded safetensors index
(`*.safetensors.index.json`), a PyTorch `.bin`/`.pt` zip archive, a sharded `.bin` index
(`pytorch_model.bin.index.json`), or a folder holding any of these (safetensors preferred). It reads headers
only: safetensors headers are parsed and validated by bigload itself; PyTorch archives are listed with
`torch.load(mmap=True, weights_only=True, map_location="meta")`, which refuses pickles that would run code
and reads no tensor bytes, while torch reports where each storage record starts in the zip file.

`CheckpointReader(index).read(ref)` returns a CPU tensor that is a view of a copy-on-write mmap of the file:
the pages stay file-backed (the kernel may drop and re-read them), so a loaded model costs no private memory
until someone writes to its weights.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import mmap
import os
import pickle
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Callable, Iterable, Mapping

import torch

from bigload.load import readahead as pages
from bigload.errors import BigloadError, CheckpointError
from bigload.sizes import dtype_width

__all__ = [
    "CheckpointIndex",
    "CheckpointReader",
    "MappedFiles",
    "SAFETENSORS_DTYPES",
    "TensorRef",
    "checkpoint_tensor_names",
    "open_checkpoint",
]

SAFETENSORS = "safetensors"
TORCH = "torch"

# safetensors' dtype codes for every type torch can hold byte-addressably. Packed sub-byte types (F4, F6)
# have a byte length that is not shape x width, so they are refused as unknown rather than mis-read.
SAFETENSORS_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        code: dtype
        for code, dtype in {
            "F64": torch.float64,
            "F32": torch.float32,
            "F16": torch.float16,
            "BF16": torch.bfloat16,
            "I64": torch.int64,
            "I32": torch.int32,
            "I16": torch.int16,
            "I8": torch.int8,
            "U64": getattr(torch, "uint64", None),
            "U32": getattr(torch, "uint32", None),
            "U16": getattr(torch, "uint16", None),
            "U8": torch.uint8,
            "BOOL": torch.bool,
            "C64": torch.complex64,
            "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
            "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
            "F8_E5M2": getattr(torch, "float8_e5m2", None),
            "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
            "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
        }.items()
        if dtype is not None
    }
)

# The safetensors library refuses headers above 100 MB; so do we, before allocating anything for one.
MAX_HEADER_BYTES = 100_000_000

# The fingerprint hashes this many bytes at the start of each file's tensor data and at its end, so two
# checkpoints with equal names, shapes, sizes and mtimes (`cp -p`, a tar extraction) still differ, while a
# load stays a few reads per file rather than a pass over every byte.
FINGERPRINT_SAMPLE_BYTES = 64 << 10

# `content_digests` hashes this many bytes at both ends of every tensor (a page each): another checkpoint, or
# a fine-tune that changed any tensor, differs there, and a checkpoint of hundreds of tensors costs two small
# reads per tensor rather than a pass over every byte.
CONTENT_SAMPLE_BYTES = 4096


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
            size, mtime_ns = self.file_stats.get(path) or _stat_key(path)
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


def _stat_key(path: Path) -> tuple[int, int]:
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


# ---------------------------------------------------------------------------------------------------------
# safetensors headers


def read_safetensors_header(path: Path) -> tuple[list[TensorRef], dict[str, str]]:
    """Parse and validate one safetensors file's header; read no tensor bytes.

    Args:
        path: a `.safetensors` file.

    Returns:
        (refs sorted by offset, the `__metadata__` dict).

    Raises:
        CheckpointError: naming the file (and the tensor) for a file too small to hold a header, a header
            length past the end of the file, a header that is not a JSON object, an unknown dtype, a bad
            shape, offsets outside the data section, overlapping tensors, or a byte length that is not
            shape x dtype width.

    >>> refs, meta = read_safetensors_header(Path("model.safetensors"))  # doctest: +SKIP
    """
    path = path.resolve()
    file_size = _file_size(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(
                f"{path}: {file_size} bytes is too small to be a safetensors file (the 8-byte header "
                "length is missing); the file is truncated or empty. Download or save it again."
            )
        (header_len,) = struct.unpack("<Q", prefix)
        # Check the length field against the real file before trusting it with an allocation.
        if header_len > file_size - 8 or header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: the header claims {header_len} bytes but the file has {file_size - 8} after the "
                f"length field (limit {MAX_HEADER_BYTES}); the file is truncated or not a safetensors file."
            )
        raw = handle.read(header_len)
    header = _parse_header_json(path, raw)
    data_start = 8 + header_len
    metadata = _header_metadata(path, header.pop("__metadata__", None))
    refs = [_header_entry(path, name, entry, data_start, file_size - data_start) for name, entry in header.items()]
    refs.sort(key=lambda ref: ref.offset)
    _check_no_overlap(path, refs)
    return refs, metadata


def _parse_header_json(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    # ValueError covers UnicodeDecodeError, JSONDecodeError and over-long integers; RecursionError deep nesting.
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid UTF-8 JSON ({exc}); the file is corrupt or not a "
            "safetensors file."
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the safetensors header is a JSON {type(header).__name__}, expected an object mapping "
            "tensor names to entries."
        )
    return header


def _header_metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CheckpointError(
            f"{path}: '__metadata__' must map strings to strings, got {json.dumps(value)[:200]}."
        )
    return dict(value)


def _header_entry(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorRef:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry must be an object with dtype, shape, data_offsets.")
    code = entry.get("dtype")
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{where}: unknown dtype {code!r}; bigload reads {', '.join(SAFETENSORS_DTYPES)}."
        )
    dtype = SAFETENSORS_DTYPES[code]
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_index(dim) for dim in shape):
        raise CheckpointError(f"{where}: shape {shape!r} must be a list of non-negative integers.")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} must be two non-negative integers [begin, end].")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] fall outside the data section of {data_len} bytes; "
            "the file is truncated or its header is wrong."
        )
    expected = math.prod(shape) * dtype_width(dtype)
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes but shape {shape} of {code} "
            f"needs {expected}; the header is inconsistent."
        )
    return TensorRef(name, dtype, tuple(shape), path, data_start + begin, end - begin, SAFETENSORS)


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(path: Path, refs: list[TensorRef]) -> None:
    previous: TensorRef | None = None
    for ref in refs:
        if ref.nbytes == 0:
            continue
        if previous is not None and ref.offset < previous.offset + previous.nbytes:
            raise CheckpointError(
                f"{path}: tensors {previous.name!r} and {ref.name!r} overlap in the data section; "
                "the header is corrupt."
            )
        previous = ref


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file.") from None


# ---------------------------------------------------------------------------------------------------------
# PyTorch zip archives


def read_torch_archive(path: Path) -> list[TensorRef]:
    """List the tensors of a `torch.save` zip archive without reading their bytes.

    `torch.load(..., weights_only=True)` is torch's restricted unpickler: a pickle that would import or call
    anything but tensor-rebuilding functions raises instead of running. With `map_location="meta"` torch
    creates no data and records each storage's byte offset in the zip file (`_checkpoint_offset`);
    storages are stored uncompressed, so that offset plus the view's storage offset is the tensor's bytes.

    Raises:
        CheckpointError: for an unsafe pickle, a legacy (non-zip) file, a non-dict top level, or a tensor
            whose bytes would lie past the end of the file.
    """
    path = path.resolve()
    file_size = _file_size(path)
    try:
        loaded = torch.load(path, mmap=True, weights_only=True, map_location="meta")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: it holds objects other than tensors, which could run code "
            f"({str(exc).splitlines()[0]}). Convert the checkpoint to safetensors with a trusted tool, "
            "or load it yourself if you trust its source."
        ) from None
    except (RuntimeError, ValueError, OSError, EOFError) as exc:
        raise CheckpointError(
            f"{path}: cannot list this PyTorch checkpoint ({str(exc).splitlines()[0]}); bigload reads the "
            "zip format torch.save writes since torch 1.6. Re-save it with torch.save or as safetensors."
        ) from None
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(loaded).__name__}, expected a state dict mapping names to tensors."
        )
    refs = [_torch_ref(path, name, tensor, file_size) for name, tensor in loaded.items()
            if isinstance(name, str) and isinstance(tensor, torch.Tensor)]
    refs.sort(key=lambda ref: (ref.offset, ref.name))
    return refs


def _torch_ref(path: Path, name: str, tensor: torch.Tensor, file_size: int) -> TensorRef:
    width = dtype_width(tensor.dtype)
    storage = tensor.untyped_storage()
    base = getattr(storage, "_checkpoint_offset", None)
    if base is None:
        raise CheckpointError(
            f"{path}: torch {torch.__version__} did not report where tensor {name!r} is stored; "
            "convert the checkpoint to safetensors."
        )
    shape = tuple(tensor.shape)
    contiguous = tensor.is_contiguous()
    extent = _strided_extent(shape, tensor.stride()) * width
    offset = base + tensor.storage_offset() * width
    if offset + extent > min(file_size, base + storage.nbytes()) and extent > 0:
        raise CheckpointError(
            f"{path}: tensor {name!r} would span bytes [{offset}, {offset + extent}) past its storage or the "
            f"end of the {file_size}-byte file; the archive is truncated or corrupt."
        )
    return TensorRef(name, tensor.dtype, shape, path, offset, extent, TORCH,
                     None if contiguous else tuple(tensor.stride()))


def _strided_extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements from the first to one past the last element a strided view touches."""
    if math.prod(shape) == 0:
        return 0
    return 1 + sum((dim - 1) * step for dim, step in zip(shape, stride))


# ---------------------------------------------------------------------------------------------------------
# discovery: file, index, folder


def open_checkpoint(path: str | os.PathLike[str], *, select: Callable[[str], bool] | None = None) -> CheckpointIndex:
    """Index a checkpoint from its headers alone.

    Args:
        path: a `.safetensors` file, a `.bin`/`.pt`/`.pth` file, a `.json` shard index (`{"weight_map":
            {name: shard}}` or the bare `{name: shard}`), or a folder holding `model.safetensors`,
            `*.safetensors.index.json`, `pytorch_model.bin`, `pytorch_model.bin.index.json` or one other
            `*.index.json` (safetensors preferred when several exist).
        select: keep only the tensors whose checkpoint names it accepts (one pipeline stage's); shards of a
            sharded checkpoint holding none of them are never opened.

    Returns:
        A CheckpointIndex listing every tensor's dtype, shape, file and byte range.

    Raises:
        CheckpointError: the path does not exist, holds no checkpoint, is malformed or unsafe, or an index
            names a missing shard or a tensor its shard lacks.

    >>> index = open_checkpoint("llama-7b/")  # doctest: +SKIP
    >>> index.tensors["lm_head.weight"].shape  # doctest: +SKIP
    (32000, 4096)
    """
    target = _checkpoint_file(path)
    for suffix, opener in _OPENERS:
        if target.name.endswith(suffix):
            return opener(target, select or _everything)
    raise CheckpointError(
        f"{target}: unknown checkpoint format; expected .safetensors, .bin, .pt, .pth, or a *.index.json."
    )


def checkpoint_tensor_names(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The tensor names of a checkpoint: a shard index's `weight_map` (no shard opened), else the headers.

    Raises:
        CheckpointError: as `open_checkpoint`.
    """
    target = _checkpoint_file(path)
    if target.name.endswith(".json"):
        return tuple(_read_index_json(target)[0])
    return tuple(open_checkpoint(target).tensors)


def _checkpoint_file(path: str | os.PathLike[str]) -> Path:
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        target = _discover(target)
    if not target.exists():
        raise CheckpointError(f"{target}: no such checkpoint file or folder.")
    return target


def _everything(_: str) -> bool:
    return True


def _discover(folder: Path) -> Path:
    for pattern in _DISCOVERY:
        found = [p for p in sorted(folder.glob(pattern)) if not p.name.endswith(_NOT_OTHER_INDEX)
                 or pattern != _OTHER_INDEX]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(
                f"{folder}: several files match {pattern!r} ({', '.join(p.name for p in found[:5])}); "
                "pass the one to load, or its *.index.json."
            )
    raise CheckpointError(
        f"{folder}: no checkpoint found; expected model.safetensors, *.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json."
    )


_OTHER_INDEX = "*.index.json"
_NOT_OTHER_INDEX = (".safetensors.index.json", ".bin.index.json")

# Safetensors first: they need no unpickling and map straight to bytes.
_DISCOVERY = (
    "model.safetensors.index.json",
    "model.safetensors",
    "*.safetensors.index.json",
    "*.index.json",  # accelerate takes any one index, e.g. weight_map.index.json (PyTorch ones come later)
    "*.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "*.bin.index.json",
    "*.bin",
    "*.pt",
    "*.pth",
)


def _open_single_safetensors(path: Path, select: Callable[[str], bool]) -> CheckpointIndex:
    refs, metadata = read_safetensors_header(path)
    return _build_index(path.parent, SAFETENSORS, [(path, [ref for ref in refs if select(ref.name)])], metadata)


def _open_single_torch(path: Path, select: Callable[[str], bool]) -> CheckpointIndex:
    refs = [ref for ref in read_torch_archive(path) if select(ref.name)]
    return _build_index(path.parent, TORCH, [(path, refs)], {})


def _open_sharded(path: Path, select: Callable[[str], bool]) -> CheckpointIndex:
    weight_map, metadata = _read_index_json(path)
    weight_map = {name: shard for name, shard in weight_map.items() if select(name)}
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        # Checked on the name as written, so shards that are symlinks (the Hugging Face cache) still load.
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(
                f"{path}: shard {shard!r} is outside {path.parent}; an index may only name files in its own "
                "folder. Move the shard into the folder and name it relative to the index."
            )
    is_safetensors = all(shard.endswith(".safetensors") for shard in shards)
    if not is_safetensors and any(shard.endswith(".safetensors") for shard in shards):
        # torch.load would hand a .safetensors shard to safetensors and read every byte of it.
        mixed = (next(s for s in shards if s.endswith(".safetensors")),
                 next(s for s in shards if not s.endswith(".safetensors")))
        raise CheckpointError(
            f"{path}: the index names both safetensors and PyTorch shards (e.g. {mixed[0]!r} and {mixed[1]!r}); "
            "a checkpoint is in one format. Fix the index or download the checkpoint again."
        )
    per_file: list[tuple[Path, list[TensorRef]]] = []
    owner: dict[str, Path] = {}
    for shard in shards:
        shard_path = (path.parent / shard).resolve()
        if not shard_path.is_file():
            wanted = sum(1 for name in weight_map.values() if name == shard)
            raise CheckpointError(
                f"{path}: shard {shard!r} ({wanted} tensors) is missing from {path.parent}; "
                "download or copy the missing shard."
            )
        refs = read_safetensors_header(shard_path)[0] if is_safetensors else read_torch_archive(shard_path)
        kept = [ref for ref in refs if select(ref.name)
                and (path.parent / weight_map.get(ref.name, shard)).resolve() == shard_path]
        per_file.append((shard_path, kept))
        owner.update({ref.name: shard_path for ref in kept})
    absent = [name for name in weight_map if name not in owner]
    if absent:
        raise CheckpointError(
            f"{path}: {len(absent)} tensors are listed in the index but absent from their shard, e.g. "
            f"{absent[0]!r} in {weight_map[absent[0]]!r}: {_first(absent)}. The shard is stale or the "
            "index is wrong; download both again."
        )
    return _build_index(path.parent, SAFETENSORS if is_safetensors else TORCH, per_file, metadata)


def _read_index_json(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    # ValueError covers UnicodeDecodeError, JSONDecodeError and over-long integers; RecursionError deep nesting.
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: the shard index is not valid JSON ({exc}).") from None
    # Hugging Face's {"weight_map": {...}, "metadata": {...}}, or (as accelerate accepts) the bare map.
    weight_map = content.get("weight_map", content) if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{path}: a shard index needs a 'weight_map' object (or is itself an object) mapping tensor names to "
            "shard file names."
        )
    raw_meta = content.get("metadata") or {}
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in dict(raw_meta).items()} \
        if isinstance(raw_meta, dict) else {}
    return weight_map, metadata


def _build_index(root: Path, fmt: str, per_file: list[tuple[Path, list[TensorRef]]],
                 metadata: Mapping[str, str]) -> CheckpointIndex:
    tensors: dict[str, TensorRef] = {}
    for path, refs in per_file:
        for ref in refs:
            if ref.name in tensors:
                raise CheckpointError(
                    f"tensor {ref.name!r} is stored in both {tensors[ref.name].file} and {path}; "
                    "remove the duplicate or add a shard index saying which to use."
                )
            tensors[ref.name] = ref
    return CheckpointIndex(
        root=root.resolve(),
        format=fmt,
        files=tuple(path for path, _ in per_file),
        tensors=MappingProxyType(tensors),
        metadata=MappingProxyType(dict(metadata)),
        total_bytes=sum(ref.nbytes for ref in tensors.values()),
        file_stats=MappingProxyType({path: _stat_key(path) for path, _ in per_file}),
    )


def _first(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# Longest suffixes first so "x.safetensors.index.json" is not taken for a plain file.
_OPENERS: tuple[tuple[str, Callable[[Path, Callable[[str], bool]], CheckpointIndex]], ...] = (
    (".index.json", _open_sharded),
    (".safetensors", _open_single_safetensors),
    (".bin", _open_single_torch),
    (".pt", _open_single_torch),
    (".pth", _open_single_torch),
    (".json", _open_sharded),  # accelerate reads any .json file it is given as a shard index
)


# ---------------------------------------------------------------------------------------------------------
# reading bytes


class MappedFiles:
    """Copy-on-write (`MAP_PRIVATE`) mappings of files, each mapped once, shared by every tensor viewing it.

    Views are file-backed page cache, not private memory: the kernel may drop and re-read the pages, and
    writing to a view copies only the touched pages and never changes the file. A mapping lives as long as
    any tensor views it, so views stay valid after `clear()`. Safe to use from several threads.

    `check`, if given, is called with each file before its mapping is first used (after the byte range asked
    for is known to be inside it) and may raise to refuse the file; `CheckpointReader` passes its index's
    `check_unchanged`.
    """

    def __init__(self, check: Callable[[Path], None] | None = None) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._check = check

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
        nbytes = (_strided_extent(shape, stride) if stride is not None else numel) * width
        mapping = self._mapping(path, error, end=offset + nbytes, what=what)
        if offset % width == 0:
            flat = torch.frombuffer(mapping, dtype=dtype, count=nbytes // width, offset=offset)
        else:
            flat = torch.frombuffer(bytearray(mapping[offset:offset + nbytes]), dtype=dtype)
        return flat.view(shape) if stride is None else flat.as_strided(shape, stride)

    def populate(self, path: Path, offset: int, nbytes: int, *,
                 error: type[BigloadError] = CheckpointError) -> None:
        """Read these bytes of `path` into memory and map them, returning once they are there
        (`readahead.populate`: pages already in memory are left alone; only advised on old kernels).

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
                mapping = _map_private(path, error)
            if end > len(mapping):
                raise error(
                    f"{path}: {what or 'a tensor'} needs bytes up to {end} but the file has {len(mapping)}; it "
                    "was truncated or changed after it was indexed. Open it again or write it again."
                )
            if not known:
                # Only a mapping the check accepted is kept, so a refused file is checked again next time.
                if self._check is not None:
                    self._check(path)
                self._maps[path] = mapping
            return mapping


def _map_private(path: Path, error: type[BigloadError]) -> mmap.mmap:
    try:
        with open(path, "rb") as handle:
            # ACCESS_COPY: writable for torch.frombuffer, yet never writes back to the file.
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
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
        self._files = MappedFiles(index.check_unchanged)

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
