"""Where offloaded weights live: a disk folder in accelerate's layout.

A store folder holds `index.json`, mapping each tensor name to `{"dtype": "float16", "shape": [...]}`, and
one raw `<name>.dat` per tensor (bfloat16 written as its int16 bits, float8 as int8 bits, a 0-d tensor as
one element), exactly what `accelerate.utils.offload_state_dict` writes, so accelerate reads bigload's
folders and bigload reads accelerate's. A tensor that needs no conversion is instead an entry
`{"safetensors_file": ..., "weight_name": ..., "dtype": ...}` pointing into the original checkpoint: no byte
is copied. bigload's own metadata (the source checkpoint's fingerprint and the dtype) sits in `bigload.json`
beside the index, so a folder built from another checkpoint is refused instead of silently used.

Writing is all-or-nothing: `.dat` files are written under temporary names and renamed, and `index.json`
appears only at `commit` (temp file, fsync, rename). Until then the folder holds no index, so an interrupted
load never leaves a store claiming tensors it does not have.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Iterable, Iterator, Mapping

import torch

from bigload.formats.refs import CheckpointIndex, TensorRef
from bigload.formats.mapped import MappedFiles
from bigload.formats.safetensors import read_safetensors_header
from bigload.errors import CheckpointError, OffloadError, OffloadIOError
from bigload.messages import Setting, Text, setting
from bigload.load.reads import Extent
from bigload.sizes import dtype_width, format_size
from bigload.tensors import summarize_names

__all__ = ["DiskStore", "StoreOrigin", "StoreWriter", "TensorMeta"]

INDEX_FILE = "index.json"
ORIGIN_FILE = "bigload.json"
_TMP_MARK = ".bigload-tmp"
_CHUNK_BYTES = 4 << 20  # converted bytes held at once while writing a cast copy

# index.json dtype names (numpy's, plus "bfloat16"/"float8_*" which accelerate stores as integer bits).
_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        name: getattr(torch, name)
        for name in (
            "float64", "float32", "float16", "bfloat16", "complex64", "complex128",
            "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
            "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
        )
        if hasattr(torch, name)
    }
)


@dataclass(frozen=True)
class TensorMeta:
    """What a store holds for one tensor: its dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StoreOrigin:
    """What a store was built from: the source checkpoint's fingerprint, where it was, the dtype, and the
    quantization scheme (with the int4 byte order) of its quantized tensors ("" for none).

    `fingerprint` alone decides whether a folder can be reused (the loader folds the scheme into it);
    the other fields make the refusal readable: `differences` names what changed between two origins.
    """

    fingerprint: str
    source: str = ""
    dtype: str = ""
    quantize: str = ""
    changed: str = ""  # what changed the bytes after the load (`DiskStore.rewrite`), if anything
    files: tuple[tuple[str, int, int], ...] = ()  # the source's data files read: (name in source, size, mtime_ns)
    cast: str = ""  # how the loader cast tensors (its dtype policy), as folded into the fingerprint

    def describe(self) -> str:
        where = self.source or "an unnamed checkpoint"
        then = f", then changed: {summarize_changes(self.changed)}" if self.changed else ""
        return f"{where} (dtype {self.dtype or 'as stored'}, fingerprint {self.fingerprint[:12]}{then})"

    def describe_quantize(self) -> Text:
        """The quantization its bytes were written with, as the setting the user gives (`quantize='int8'`,
        `--quantize int8`); a storage order ("int4:128 in cpu-avx2 order") follows in parentheses."""
        if not self.quantize:
            return Text("no quantization")
        parts: list[str | Setting] = []
        for stored in self.quantize.split(", "):
            tag, _, order = stored.partition(" in ")
            parts += [", " if parts else "", setting("quantize", repr(tag)), f" (in {order})" if order else ""]
        return Text(*parts)

    def differences(self, wanted: "StoreOrigin") -> list[str]:
        """What differs between this (the folder's) origin and `wanted`, in words; [] when no recorded part
        does (then the bytes differ under the same names, sizes and mtimes, or this origin predates the record)."""
        found: list[str] = []
        if self.source != wanted.source:
            found.append(f"the checkpoint folder ({self.source or 'unknown'} then, {wanted.source or 'unknown'} now)")
        found += _file_differences(self.files, wanted.files)
        if self.dtype != wanted.dtype:
            found.append(f"the stored dtypes ({self.dtype or 'as stored'} then, {wanted.dtype or 'as stored'} now)")
        if self.cast != wanted.cast:
            found.append(f"how tensors are cast ({self.cast or 'unrecorded'} then, {wanted.cast or 'unrecorded'} now)")
        if self.changed:
            found.append("the folder's bytes were changed after the load (what changed them is named above)")
        return found

    def to_json(self) -> dict[str, object]:
        """The content of `bigload.json`."""
        return {"fingerprint": self.fingerprint, "source": self.source, "dtype": self.dtype,
                "quantize": self.quantize, "changed": self.changed, "cast": self.cast,
                "files": [list(entry) for entry in self.files]}

    @staticmethod
    def of(index: CheckpointIndex, dtype: torch.dtype | None, variant: str = "") -> "StoreOrigin":
        """The origin of a store built from `index` cast to `dtype` (None: stored dtypes).

        `variant` names anything else that changes the stored bytes (e.g. modules kept in fp32).
        """
        name = dtype_name(dtype) if dtype is not None else ""
        digest = hashlib.sha256(f"{index.fingerprint()}\0{name}\0{variant}".encode()).hexdigest()
        files = tuple((_relative_name(path, index.root), *index.file_stats.get(path, (0, 0))) for path in index.files)
        return StoreOrigin(fingerprint=digest, source=str(index.root), dtype=name, files=files, cast=variant)

    @staticmethod
    def coerce(value: "str | StoreOrigin") -> "StoreOrigin":
        return value if isinstance(value, StoreOrigin) else StoreOrigin(fingerprint=value)


def _relative_name(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _file_differences(then: tuple[tuple[str, int, int], ...], now: tuple[tuple[str, int, int], ...]) -> list[str]:
    """The checkpoint files a store was built from against those a load reads: other files, or the same
    files rewritten since (size or mtime)."""
    if not then or not now:
        return []  # one side did not record them
    before, after = {name: stats for name, *stats in then}, {name: stats for name, *stats in now}
    if set(before) != set(after):
        return [f"the checkpoint files read ({_names(sorted(before))} then, {_names(sorted(after))} now)"]
    rewritten = [name for name in sorted(after) if before[name] != after[name]]
    if not rewritten:
        return []
    name = rewritten[0]
    (size0, mtime0), (size1, mtime1) = before[name], after[name]
    what = f"size {size0} -> {size1} bytes" if size0 != size1 else f"mtime {mtime0} -> {mtime1} ns"
    more = f" and {len(rewritten) - 1} more" if len(rewritten) > 1 else ""
    return [f"{name}{more} rewritten since ({what})"]


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def summarize_changes(changed: str, names: int = 3) -> str:
    """A store's change record (`DiskStore.rewrite`'s "; "-joined entries, one per tensor) made short: each run
    of one action is its count and the first `names` tensors.

    >>> summarize_changes("merged ['a'] into w; merged ['a'] into x; merged ['a'] into y; merged ['a'] into z")
    "merged ['a'] into 4 tensors: w, x, ... (+2 more)"
    """
    runs: list[tuple[str, list[str]]] = []
    for change in filter(None, changed.split("; ")):
        action, _, name = change.rpartition(" ")  # tensor names hold no spaces
        if runs and runs[-1][0] == action:
            runs[-1][1].append(name)
        else:
            runs.append((action, [name]))
    return "; ".join(f"{action} {tensors[0]}" if len(tensors) == 1 else
                     f"{action} {len(tensors)} tensors: {summarize_names(tensors, limit=names)}"
                     for action, tensors in runs)


def dtype_name(dtype: torch.dtype) -> str:
    """index.json's name for a dtype: "float32", "bfloat16", "bool", ..."""
    return str(dtype).removeprefix("torch.")


def _parse_dtype(folder: Path, name: str, value: object) -> torch.dtype:
    if not isinstance(value, str) or value not in _DTYPES:
        raise OffloadError(
            f"{folder / INDEX_FILE}: tensor {name!r} has unknown dtype {value!r}; the index is corrupt. "
            "Delete the folder and load again."
        )
    return _DTYPES[value]


class DiskStore:
    """A committed offload folder, read-only: bigload's or accelerate's layout. `StoreWriter.commit` returns
    one; `DiskStore(folder)` (or `DiskStore.open`) opens one.

    >>> store = DiskStore("offload/")  # doctest: +SKIP
    >>> store.get("lm_head.weight").shape  # doctest: +SKIP
    torch.Size([32000, 4096])
    """

    def __init__(self, folder: str | os.PathLike[str],
                 expect_fingerprint: "str | StoreOrigin | None" = None) -> None:
        """Open a committed store for reading.

        Args:
            folder: the offload folder.
            expect_fingerprint: the origin (or just the fingerprint) the store must have been built from.

        Raises:
            OffloadError: no index in the folder, a corrupt index, a `.dat` file missing or of the wrong
                size, or (with `expect_fingerprint`) a store built from another checkpoint or dtype.
        """
        self.folder = Path(folder).expanduser().resolve()
        self._files = MappedFiles()
        self._headers: dict[Path, dict[str, TensorRef]] = {}
        self._entries = _read_index(self.folder)
        if expect_fingerprint is not None:
            _check_origin(self.folder, StoreOrigin.coerce(expect_fingerprint))
        for name in self._entries:
            self._check_entry(name)

    @classmethod
    def open(cls, folder: str | os.PathLike[str],
             expect_fingerprint: "str | StoreOrigin | None" = None) -> "DiskStore":
        """Open a committed store (bigload's or accelerate's) for reading; the same as `DiskStore(...)`."""
        return cls(folder, expect_fingerprint)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    @property
    def origin(self) -> StoreOrigin | None:
        """What the store says it was built from (None for folders accelerate wrote)."""
        return _read_origin(self.folder)

    def meta(self, name: str) -> TensorMeta:
        """The stored dtype and shape of `name`.

        Raises:
            OffloadError: `name` is not in the store.
        """
        entry = self._entry(name)
        dtype = _parse_dtype(self.folder, name, entry.get("dtype"))
        if "shape" in entry:
            return TensorMeta(dtype, tuple(int(d) for d in entry["shape"]))  # type: ignore[union-attr]
        return TensorMeta(dtype, self._reference(name, entry).shape)

    def get(self, name: str) -> torch.Tensor:
        """`name` as a CPU tensor in its stored dtype: a zero-copy view of its file (file-backed pages).

        Reference entries view the original safetensors file; if the entry asks for another dtype than the
        file holds (only accelerate writes such entries), the cast is a private copy.

        Raises:
            OffloadError: `name` is not in the store, or its file is missing or truncated.
        """
        entry = self._entry(name)
        meta = self.meta(name)
        if "safetensors_file" in entry:
            ref = self._reference(name, entry)
            if ref.shape != meta.shape:
                raise OffloadError(
                    f"{self.folder}: {name!r} points to tensor {ref.name!r} of {ref.file}, of shape "
                    f"{list(ref.shape)}, but the index says {list(meta.shape)}; the checkpoint changed. Delete the "
                    "offload folder and load again."
                )
            tensor = self._files.view(ref.file, ref.offset, ref.dtype, ref.shape, what=f"tensor {ref.name!r}",
                                      error=OffloadError)
            return tensor if tensor.dtype == meta.dtype else tensor.to(meta.dtype)
        path = self._dat_path(name)
        if not path.is_file():
            raise OffloadError(f"{path}: the data of {name!r} is missing; delete {self.folder} and load again.")
        shape = meta.shape or (1,)  # 0-d tensors are stored as one element, as accelerate does
        return self._files.view(path, 0, meta.dtype, shape, what=repr(name), error=OffloadError).view(meta.shape)

    def locate(self, name: str) -> Extent | None:
        """Where `name`'s bytes are on disk, exactly as `get` returns them (its `.dat` file, or its range of the
        safetensors file it points into), for explicit reads; None when `get` casts them.

        Raises:
            OffloadError: `name` is not in the store, or its reference cannot be resolved.
        """
        entry = self._entry(name)
        meta = self.meta(name)
        nbytes = (math.prod(meta.shape) if meta.shape else 1) * dtype_width(meta.dtype)
        if "safetensors_file" not in entry:
            return Extent(self._dat_path(name), 0, nbytes)
        ref = self._reference(name, entry)
        if ref.dtype != meta.dtype or ref.shape != meta.shape or ref.stride is not None or ref.nbytes != nbytes:
            return None
        return Extent(ref.file, ref.offset, nbytes)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy `name` into the preallocated `out` (pinned host memory, or a GPU tensor) and return `out`.

        Raises:
            OffloadError: `out` has another dtype or shape than the stored tensor.
        """
        meta = self.meta(name)
        if out.dtype != meta.dtype or tuple(out.shape) != meta.shape:
            raise OffloadError(
                f"{self.folder}: cannot read {name!r} ({dtype_name(meta.dtype)} {list(meta.shape)}) into a "
                f"{dtype_name(out.dtype)} {list(out.shape)} buffer; allocate the buffer from store.meta(name)."
            )
        out.copy_(self.get(name), non_blocking=out.device.type != "cpu")
        return out

    # -- internals -------------------------------------------------------------------------------------

    def rewrite(self, name: str, tensor: torch.Tensor, *, change: str) -> None:
        """Replace the stored bytes of `name` in a committed store (e.g. weights an adapter was merged into).

        The new bytes go to `<name>.dat` through a temporary file and a rename, so views of the old bytes stay
        valid and a crash leaves either the old or the new tensor; a reference entry into the source
        checkpoint becomes a `.dat` entry (the checkpoint itself is never written). `bigload.json` then records
        `change`, so a later load of the source checkpoint rebuilds this folder instead of reusing it.

        Args:
            name: a tensor of the store.
            tensor: its new value, of the stored dtype and shape.
            change: what changed the bytes (it becomes part of the store's fingerprint).

        Raises:
            OffloadError: `name` is not in the store, the tensor has another dtype or shape than the stored
                one, or writing failed.
        """
        meta = self.meta(name)
        if tensor.dtype != meta.dtype or tuple(tensor.shape) != meta.shape:
            raise OffloadError(
                f"{self.folder}: cannot replace {name!r} ({dtype_name(meta.dtype)} {list(meta.shape)}) with a "
                f"{dtype_name(tensor.dtype)} {list(tensor.shape)} tensor."
            )
        final = self._dat_path(name)
        temp = final.with_name(final.name + _TMP_MARK)
        origin = _read_origin(self.folder) or StoreOrigin(fingerprint="")
        try:
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            _write_file(temp, [memoryview(data.view(torch.uint8).numpy())])
            os.replace(temp, final)
            self._entries[name] = {"dtype": dtype_name(meta.dtype), "shape": list(meta.shape)}
            changed = hashlib.sha256(f"{origin.fingerprint}\0{change}".encode()).hexdigest()
            changes = f"{origin.changed}; {change}" if origin.changed else change
            _write_json_atomic(self.folder / ORIGIN_FILE,
                               replace(origin, fingerprint=changed, changed=changes).to_json())
            _write_json_atomic(self.folder / INDEX_FILE, self._entries)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise OffloadIOError(
                f"writing the new value of {name!r} into {self.folder} failed ({exc.strerror or exc}); the old "
                "value is still there. Free disk space or fix the folder's permissions, then merge again.",
                exc.errno,
            ) from exc
        self._files.clear()  # the old mapping of `final` views the replaced file

    def _dat_path(self, name: str) -> Path:
        return _dat_path(self.folder, name)

    def _entry(self, name: str) -> dict[str, object]:
        entry = self._entries.get(name)
        if entry is None:
            raise OffloadError(
                f"{self.folder}: no tensor named {name!r} in the offload store ({len(self._entries)} tensors)."
            )
        return entry

    def _reference(self, name: str, entry: Mapping[str, object]) -> TensorRef:
        path = Path(entry["safetensors_file"])  # type: ignore[arg-type]
        weight = entry.get("weight_name", name)
        if path not in self._headers:
            try:
                self._headers[path] = {ref.name: ref for ref in read_safetensors_header(path)[0]}
            except CheckpointError as exc:
                raise OffloadError(
                    f"{self.folder}: {name!r} points into {path}, which cannot be read ({exc}); "
                    "delete the offload folder and load again."
                ) from None
        ref = self._headers[path].get(weight)
        if ref is None:
            raise OffloadError(
                f"{self.folder}: {name!r} points to tensor {weight!r} of {path}, which has no such tensor; "
                "the checkpoint changed. Delete the offload folder and load again."
            )
        return ref

    def _check_entry(self, name: str) -> None:
        entry = self._entries[name]
        _check_entry_fields(self.folder, name, entry)
        if "safetensors_file" in entry:
            if not Path(entry["safetensors_file"]).is_file():  # type: ignore[arg-type]
                raise OffloadError(
                    f"{self.folder}: {name!r} points into {entry['safetensors_file']}, which no longer exists; "
                    "delete the offload folder and load again."
                )
            return
        meta = self.meta(name)
        stored_elements = math.prod(meta.shape) if meta.shape else 1  # 0-d tensors are stored as one element
        expected = stored_elements * dtype_width(meta.dtype)
        path = self._dat_path(name)
        size = path.stat().st_size if path.is_file() else -1
        if size != expected:
            found = "is missing" if size < 0 else f"has {size} bytes, expected {expected}"
            raise OffloadError(
                f"{path}: the data of {name!r} {found}; the store is damaged. Delete {self.folder} and load "
                "again."
            )


class StoreWriter:
    """Writes an offload folder: `put` / `put_reference`, then `commit`, which returns the `DiskStore` that
    reads it. Nothing is listed until `commit`.

    >>> with StoreWriter("offload/") as writer:  # doctest: +SKIP
    ...     writer.put("lm_head.weight", weight)
    ...     writer.put_reference("model.embed_tokens.weight", index.tensors["model.embed_tokens.weight"])
    ...     store = writer.commit(StoreOrigin(index.fingerprint(), str(index.root), "bfloat16"))

    Leaving the `with` block by an exception before `commit` removes every file this writer created.
    """

    def __init__(self, folder: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Start writing a store in `folder` (created if needed).

        Args:
            folder: the offload folder.
            overwrite: replace a store already in the folder (its index is removed first, so it never
                describes files being rewritten).

        Raises:
            OffloadError: the folder cannot be created or written, or already holds a store and
                `overwrite` is False.
        """
        self.folder = Path(folder).expanduser().resolve()
        self._entries: dict[str, dict[str, object]] = {}
        self._written: list[Path] = []
        self._scratch: torch.Tensor | None = None
        self._committed = False
        _ensure_writable(self.folder)
        existing = self.folder / INDEX_FILE
        if existing.exists():
            if not overwrite:
                raise OffloadError(
                    f"{self.folder} already holds an offload store ({existing.name}); open it with "
                    "DiskStore(folder), pass overwrite=True to replace it, or use another folder."
                )
            existing.unlink()
            (self.folder / ORIGIN_FILE).unlink(missing_ok=True)

    @property
    def names(self) -> tuple[str, ...]:
        """Tensors written so far (the index lists them once committed)."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None and not self._committed:
            self.abort()

    def put(self, name: str, tensor: torch.Tensor, *, dtype: torch.dtype | None = None) -> None:
        """Write `tensor` as `<name>.dat`, cast to `dtype` if given; it is listed only after `commit`.

        A cast (or a copy off a GPU, or out of a strided view) is done a few MiB at a time through one
        reused buffer, so writing never holds a converted copy of the whole tensor in memory. Not
        thread-safe: one writer thread per store.

        Raises:
            OffloadError: the name cannot be a file name, the store is committed, or writing failed
                (no space, I/O error); the partial file is removed.
        """
        self._check_writable_name(name)
        data = tensor.detach()
        target = data.dtype if dtype is None else dtype
        self._entries[name] = {"dtype": dtype_name(target), "shape": list(data.shape)}
        final = self._dat_path(name)
        temp = final.with_name(final.name + _TMP_MARK)
        try:
            _write_file(temp, self._payload(data, target))
            os.replace(temp, final)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            del self._entries[name]
            raise self._write_error(name, data.numel() * dtype_width(target), exc) from exc
        self._written.append(final)

    def _payload(self, data: torch.Tensor, target: torch.dtype) -> Iterator[memoryview]:
        """The bytes of `data` as `target`: the tensor's own memory when it already is, else chunks."""
        if data.numel() == 0:
            return
        if data.dtype == target and data.device.type == "cpu" and data.is_contiguous():
            yield memoryview(data.reshape(-1).view(torch.uint8).numpy())
            return
        if self._scratch is None:
            self._scratch = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
        flat = data.reshape(-1)  # a copy only for strided views, which checkpoints rarely hold
        step = _CHUNK_BYTES // dtype_width(target)
        for start in range(0, flat.numel(), step):
            chunk = self._scratch.view(target)[:min(step, flat.numel() - start)]
            chunk.copy_(flat[start:start + step])
            yield memoryview(chunk.view(torch.uint8).numpy())

    def put_reference(self, name: str, ref: TensorRef) -> None:
        """Record that `name` is `ref` inside its safetensors file, unchanged: no bytes are written.

        Raises:
            OffloadError: `ref` is not a contiguous tensor of a safetensors file (copy it with `put`).
        """
        self._check_writable_name(name)
        if ref.format != "safetensors" or ref.stride is not None:
            raise OffloadError(
                f"{ref.file}: tensor {ref.name!r} is not a plain safetensors tensor, so the store cannot "
                "point into the file; write a copy with put(name, tensor) instead."
            )
        self._entries[name] = {
            "safetensors_file": str(ref.file),
            "weight_name": ref.name,
            "dtype": dtype_name(ref.dtype),
            "shape": list(ref.shape),  # not in accelerate's entries, which ignore it; saves a header read
        }

    def commit(self, fingerprint: "str | StoreOrigin") -> "DiskStore":
        """Write `bigload.json` then `index.json` atomically; from now on the folder is a readable store.

        Args:
            fingerprint: the source checkpoint's origin (or just its fingerprint string).

        Returns:
            The `DiskStore` reading what was written.

        Raises:
            OffloadError: writing the index failed (nothing is left claiming tensors).
        """
        origin = StoreOrigin.coerce(fingerprint)
        try:
            _write_json_atomic(self.folder / ORIGIN_FILE, origin.to_json())
            _write_json_atomic(self.folder / INDEX_FILE, self._entries)
            _fsync_dir(self.folder)
        except OSError as exc:
            # The index may be in place if only the directory sync failed; the data it lists will be removed
            # by `abort`, so it must go too. The writer owns both files (see __init__).
            (self.folder / INDEX_FILE).unlink(missing_ok=True)
            (self.folder / ORIGIN_FILE).unlink(missing_ok=True)
            raise self._write_error(INDEX_FILE, 0, exc) from exc
        self._committed = True
        return DiskStore(self.folder)

    def abort(self) -> None:
        """Remove every file this writer created (before `commit`); the folder holds no store afterwards."""
        for path in self._written:
            path.unlink(missing_ok=True)
        for temp in self.folder.glob(f"*{_TMP_MARK}"):
            temp.unlink(missing_ok=True)
        if not (self.folder / INDEX_FILE).exists():
            # An origin without an index describes nothing (a commit that failed half way).
            (self.folder / ORIGIN_FILE).unlink(missing_ok=True)
        self._written.clear()
        self._entries.clear()

    # -- internals -------------------------------------------------------------------------------------

    def _dat_path(self, name: str) -> Path:
        return _dat_path(self.folder, name)

    def _check_writable_name(self, name: str) -> None:
        if self._committed:
            raise OffloadError(f"{self.folder}: the store is committed; start a new StoreWriter to write.")
        if not name or "/" in name or "\0" in name or name.startswith("."):
            raise OffloadError(
                f"tensor name {name!r} cannot be a file name in {self.folder}; names must be non-empty, "
                "not start with '.', and contain no '/'."
            )

    def _write_error(self, name: str, nbytes: int, exc: OSError) -> OffloadIOError:
        if exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(self.folder).free
            return OffloadIOError(
                f"no space left in {self.folder} while writing {name!r} ({format_size(nbytes)}; "
                f"{format_size(free)} free). Free disk space or choose an offload_folder on a larger disk.",
                exc.errno,
            )
        return OffloadIOError(f"cannot write {name!r} to {self.folder}: {exc}. Check the folder and disk.", exc.errno)



def _dat_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.dat"


def _write_file(path: Path, payload: Iterable[memoryview]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for piece in payload:
            written = 0
            while written < len(piece):
                written += os.write(fd, piece[written:written + (64 << 20)])
        # The index will claim these bytes, so they must be on disk before it is.
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, content: object) -> None:
    temp = path.with_name(path.name + _TMP_MARK)
    try:
        _write_file(temp, [memoryview(json.dumps(content, indent=2).encode())])
        os.replace(temp, path)
    except OSError:
        temp.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_writable(folder: Path) -> None:
    probe = folder / f"probe{_TMP_MARK}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OffloadIOError(
            Text(f"cannot write to the offload folder {folder} ({exc.strerror or exc}); pass an ",
                 Setting("offload_folder", "--offload-folder DIR"), " you can write to."),
            exc.errno,
        ) from None


def _read_index(folder: Path) -> dict[str, dict[str, object]]:
    path = folder / INDEX_FILE
    if not path.is_file():
        raise OffloadError(
            Text(f"{folder}: no offload store here ({INDEX_FILE} is missing); load the checkpoint with ",
                 setting("offload_folder", repr(str(folder)), str(folder)), " first.")
        )
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    # ValueError covers UnicodeDecodeError, JSONDecodeError and over-long integers; RecursionError deep nesting.
    except (ValueError, RecursionError) as exc:
        raise OffloadError(f"{path}: not valid JSON ({exc}); delete the folder and load again.") from None
    if not isinstance(entries, dict):
        raise OffloadError(f"{path}: expected an object mapping tensor names to entries.")
    return entries


def _check_entry_fields(folder: Path, name: str, entry: object) -> None:
    """Refuse an index entry `meta`/`get` could not read: checked at `open`, so damage shows up front."""
    where = f"{folder / INDEX_FILE}: the entry of {name!r}"
    fix = "the index is corrupt. Delete the folder and load again."
    if not isinstance(entry, dict):
        raise OffloadError(f"{where} is not an object; {fix}")
    _parse_dtype(folder, name, entry.get("dtype"))
    if "shape" in entry:
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(
                isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
            raise OffloadError(f"{where} has shape {shape!r}, not a list of non-negative integers; {fix}")
    if "safetensors_file" in entry:
        for key in ("safetensors_file", "weight_name"):
            if key in entry and not isinstance(entry[key], str):
                raise OffloadError(f"{where} has {key} {entry[key]!r}, not a string; {fix}")
    elif "shape" not in entry:
        raise OffloadError(f"{where} has neither 'shape' nor 'safetensors_file'; {fix}")


def _read_origin(folder: Path) -> StoreOrigin | None:
    path = folder / ORIGIN_FILE
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        files = tuple((str(name), int(size), int(mtime)) for name, size, mtime in content.get("files", []))
        return StoreOrigin(str(content["fingerprint"]), str(content.get("source", "")),
                           str(content.get("dtype", "")), quantize=str(content.get("quantize", "")),
                           changed=str(content.get("changed", "")), files=files, cast=str(content.get("cast", "")))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def _check_origin(folder: Path, expected: StoreOrigin) -> None:
    found = _read_origin(folder)
    if found is None:
        raise OffloadError(
            Text(f"{folder} holds an offload store that bigload did not write (no readable {ORIGIN_FILE}), so it "
                 f"cannot be checked against {expected.describe()}. Use another ",
                 setting("offload_folder"), ", or delete it.")
        )
    if found.fingerprint != expected.fingerprint and found.quantize != expected.quantize:
        raise OffloadError(Text(
            f"{folder} holds weights written with ", found.describe_quantize(), ", and this load asks for ",
            expected.describe_quantize(), ". Use another ", setting("offload_folder"), " for each scheme, or "
            "delete this one to rebuild it."))
    if found.fingerprint != expected.fingerprint:
        what = "; ".join(found.differences(expected)) or (
            "the checkpoint's bytes (its files' names, sizes and mtimes are the same)" if found.files else
            "unrecorded (an older bigload wrote this folder)")
        raise OffloadError(
            Text(f"{folder} holds weights from {found.describe()}, not from {expected.describe()}; what differs: "
                 f"{what}. Use another ", setting("offload_folder"), ", or delete this one to rebuild it.")
        )
