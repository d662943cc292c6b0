"""Where offloaded weights live: a disk folder in accelerate's layout.

A store folder holds `index.json`, mapping each tensor name to `{"dtype": "float16", "shape": [...]}`, and
one raw `<name>.dat` per tensor (bfloat16 written as its int16 bits, float8 as int8 bits, a 0-d tensor as
one element), exactly what `accelerate.utils.offload_state_dict` writes, so accelerate reads bigload's
folders and bigload reads accelerate's. A tensor that needs no conversion is instead an entry
`{"safetensors_file": ..., "weight_name": ..., "dtype": ...}` pointing into the original checkpoint: no byte
is copied. bigload's own metadata (the source checkpoint's fingerprint and the dtype) sits in `bigload.json`
beside the index, so a folder built from another checkpoint is refused instead of silently used.

The folder's format is `store_format`, what it was built from `store_origin`; `store_writer.StoreWriter`
writes one. This module reads a committed folder (`DiskStore`).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Mapping

import torch

from bigload.errors import CheckpointError, OffloadError, OffloadIOError
from bigload.formats.mapped import MappedFiles
from bigload.formats.refs import TensorRef
from bigload.formats.safetensors import read_safetensors_header
from bigload.load.reads import Extent
from bigload.load.store_format import (
    INDEX_FILE, ORIGIN_FILE, TMP_MARK, TensorMeta, check_entry_fields, dat_path, dtype_name, parse_dtype,
    read_index, write_file, write_json_atomic,
)
from bigload.load.store_origin import StoreOrigin, check_origin, read_origin
from bigload.sizes import dtype_width

__all__ = ["DiskStore", "StoreOrigin", "TensorMeta", "dtype_name"]


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
        self._entries = read_index(self.folder)
        if expect_fingerprint is not None:
            check_origin(self.folder, StoreOrigin.coerce(expect_fingerprint))
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
        return read_origin(self.folder)

    def meta(self, name: str) -> TensorMeta:
        """The stored dtype and shape of `name`.

        Raises:
            OffloadError: `name` is not in the store.
        """
        entry = self._entry(name)
        dtype = parse_dtype(self.folder, name, entry.get("dtype"))
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
        temp = final.with_name(final.name + TMP_MARK)
        origin = read_origin(self.folder) or StoreOrigin(fingerprint="")
        try:
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            write_file(temp, [memoryview(data.view(torch.uint8).numpy())])
            os.replace(temp, final)
            self._entries[name] = {"dtype": dtype_name(meta.dtype), "shape": list(meta.shape)}
            changed = hashlib.sha256(f"{origin.fingerprint}\0{change}".encode()).hexdigest()
            changes = f"{origin.changed}; {change}" if origin.changed else change
            write_json_atomic(self.folder / ORIGIN_FILE,
                               replace(origin, fingerprint=changed, changed=changes).to_json())
            write_json_atomic(self.folder / INDEX_FILE, self._entries)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise OffloadIOError(
                f"writing the new value of {name!r} into {self.folder} failed ({exc.strerror or exc}); the old "
                "value is still there. Free disk space or fix the folder's permissions, then merge again.",
                exc.errno,
            ) from exc
        self._files.clear()  # the old mapping of `final` views the replaced file

    def _dat_path(self, name: str) -> Path:
        return dat_path(self.folder, name)

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
        check_entry_fields(self.folder, name, entry)
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
