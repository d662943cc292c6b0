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

import errno
import hashlib
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from bigload.errors import CheckpointError, OffloadError, OffloadIOError
from bigload.formats.mapped import Identity, MappedFiles, identity_of
from bigload.formats.refs import TensorRef
from bigload.formats.safetensors import read_safetensors_header
from bigload.load.reads import Extent
from bigload.load.store_format import (
    INDEX_FILE, ORIGIN_FILE, TensorMeta, check_entry_fields, dat_path, dtype_name, json_payload, parse_dtype,
    read_index, replace_together,
)
from bigload.load.store_lock import FolderLock
from bigload.load.store_origin import StoreOrigin, check_origin, read_origin
from bigload.messages import Text, setting
from bigload.sizes import dtype_width, format_size
from bigload.tensors import summarize_names

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
        self._files = MappedFiles(self._check_mapped, error=OffloadError)
        self._headers: dict[Path, dict[str, TensorRef]] = {}
        self._checked: dict[Path, Identity] = {}  # each file's identity when it was checked (size included)
        with FolderLock(self.folder, doing="opening"):  # no writer changes the folder while it is checked
            self._entries = read_index(self.folder)
            self._origin = read_origin(self.folder)  # as checked; a rewrite through this store updates it
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
            OffloadError: `name` is not in the store, or its file is missing or truncated, or was replaced
                or changed since the store was opened (another load, dispatch or merge wrote the folder).
        """
        tensor = self.view(name)
        dtype = self.meta(name).dtype
        return tensor if tensor.dtype == dtype else tensor.to(dtype)

    def view(self, name: str) -> torch.Tensor:
        """`name`'s bytes as they are in their file: what `get` returns, before any cast. Reads no data.

        Raises:
            OffloadError: as `get`.
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
            return self._files.view(ref.file, ref.offset, ref.dtype, ref.shape, what=f"tensor {ref.name!r}",
                                    error=OffloadError)
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

    def verify(self, names: Iterable[str]) -> None:
        """Refuse if a file holding these tensors is not the one checked when the store was opened (one `stat`
        per file): for explicit reads, which open files by name when they first read them.

        Raises:
            OffloadError: such a file was replaced, changed or removed since (naming it and the fix).
        """
        for path in {self._file_of(name) for name in names}:
            checked = self._checked.get(path)
            try:
                found = identity_of(path.stat())
            except OSError:
                found = None
            if checked is not None and found != checked and not self._same_bytes(path, found):
                raise self._changed_error(path, checked, found)

    def rewrite(self, tensors: Mapping[str, torch.Tensor], *, change: str) -> None:
        """Replace the stored bytes of these tensors in a committed store, all or none (e.g. the weights of a
        layer an adapter was merged into).

        The new bytes go to `<name>.dat` files, and `bigload.json` records `change` (chained into the
        fingerprint, so a later load of the source checkpoint rebuilds this folder instead of reusing it);
        `store_format.replace_together` writes every new file before renaming any, `bigload.json` first and
        `index.json` last, under the folder's lock. A reference entry into the source checkpoint becomes a
        `.dat` entry (the checkpoint itself is never written). Views of the old bytes stay valid.

        Args:
            tensors: new values by tensor name, each of the stored dtype and shape.
            change: what changed them, e.g. "merged ['default'] into"; recorded as "<change> <name>" per tensor.

        Raises:
            OffloadError: a name is not in the store, or a tensor has another dtype or shape than the stored
                one. OffloadIOError: writing failed (a full disk); nothing in the folder changed.
        """
        for name, tensor in tensors.items():
            self._check_replacement(name, tensor)
        entries = dict(self._entries)
        with FolderLock(self.folder, doing="rewriting"):
            origin = read_origin(self.folder) or StoreOrigin(fingerprint="")
            files: list[tuple[Path, Iterable[memoryview]]] = []
            for name, tensor in tensors.items():
                meta = self.meta(name)
                entries[name] = {"dtype": dtype_name(meta.dtype), "shape": list(meta.shape)}
                origin = _chain(origin, f"{change} {name}")
                data = tensor.detach().to("cpu").contiguous().reshape(-1)
                files.append((self._dat_path(name), [memoryview(data.view(torch.uint8).numpy())]))
            try:
                replace_together([(self.folder / ORIGIN_FILE, json_payload(origin.to_json())), *files,
                                  (self.folder / INDEX_FILE, json_payload(entries))])
            except OSError as exc:
                raise _rewrite_error(self.folder, tensors, exc) from exc
            self._entries, self._origin = entries, origin
            for path, _ in files:
                self._checked[path] = identity_of(path.stat())
        self._files.clear()  # the old mappings view the replaced files

    def _check_replacement(self, name: str, tensor: torch.Tensor) -> None:
        meta = self.meta(name)
        if tensor.dtype != meta.dtype or tuple(tensor.shape) != meta.shape:
            raise OffloadError(
                f"{self.folder}: cannot replace {name!r} ({dtype_name(meta.dtype)} {list(meta.shape)}) with a "
                f"{dtype_name(tensor.dtype)} {list(tensor.shape)} tensor."
            )

    def _dat_path(self, name: str) -> Path:
        return dat_path(self.folder, name)

    def _file_of(self, name: str) -> Path:
        """The file holding `name`'s bytes: its `.dat` file, or the safetensors file its entry points into."""
        entry = self._entry(name)
        if "safetensors_file" in entry:
            return Path(entry["safetensors_file"])  # type: ignore[arg-type]
        return self._dat_path(name)

    def _check_mapped(self, path: Path, stat: os.stat_result) -> None:
        """Before a file's mapping is first used: it must be the file checked when the store was opened (a
        writer that renamed its own file over it since would hand this store bytes it never checked)."""
        checked = self._checked.get(path)
        if checked is not None and identity_of(stat) != checked and not self._same_bytes(path, identity_of(stat)):
            raise self._changed_error(path, checked, identity_of(stat))

    def _same_bytes(self, path: Path, found: Identity | None) -> bool:
        """Whether a file replaced since it was checked still holds the same bytes: another load of the same
        origin rewrote the folder (another plan of the same load sends other tensors to disk) and committed it,
        so its bigload.json has the fingerprint this store was opened with and the file has the size checked.
        Such a file is accepted (and checked from now on as it is)."""
        now = read_origin(self.folder)
        if found is None or self._origin is None or now is None or now.fingerprint != self._origin.fingerprint:
            return False
        if found[2] != self._checked[path][2]:
            return False
        self._checked[path] = found
        return True

    def _changed_error(self, path: Path, checked: Identity, found: Identity | None) -> OffloadError:
        if found is None:
            what = "it is gone"
        elif found[:2] != checked[:2]:
            what = "another file now has its name"
        else:
            what = f"size {checked[2]} -> {found[2]} bytes, mtime {checked[3]} -> {found[3]} ns"
        return OffloadError(Text(
            f"{path} was replaced or changed after the offload store {self.folder} was opened ({what}): another "
            "load, dispatch or merge wrote into the folder while this model used it, so these are not the bytes "
            "that were checked; load the model again, and give loads that run at the same time their own ",
            setting("offload_folder"), "."))

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
        path = self._file_of(name)
        try:
            stat = path.stat() if path.is_file() else None
        except OSError:
            stat = None
        if stat is not None:
            self._checked[path] = identity_of(stat)
        if "safetensors_file" in entry:
            if stat is None:
                raise OffloadError(
                    f"{self.folder}: {name!r} points into {entry['safetensors_file']}, which no longer exists; "
                    "delete the offload folder and load again."
                )
            return
        meta = self.meta(name)
        stored_elements = math.prod(meta.shape) if meta.shape else 1  # 0-d tensors are stored as one element
        expected = stored_elements * dtype_width(meta.dtype)
        size = stat.st_size if stat is not None else -1
        if size != expected:
            found = "is missing" if size < 0 else f"has {size} bytes, expected {expected}"
            raise OffloadError(
                f"{path}: the data of {name!r} {found}; the store is damaged. Delete {self.folder} and load "
                "again."
            )


def _chain(origin: StoreOrigin, change: str) -> StoreOrigin:
    """`origin` after `change`: the change is recorded and chained into the fingerprint."""
    fingerprint = hashlib.sha256(f"{origin.fingerprint}\0{change}".encode()).hexdigest()
    return replace(origin, fingerprint=fingerprint, changed=f"{origin.changed}; {change}" if origin.changed else change)


def _rewrite_error(folder: Path, tensors: Mapping[str, torch.Tensor], exc: OSError) -> OffloadIOError:
    names = summarize_names(list(tensors), limit=3)
    if exc.errno == errno.ENOSPC:
        nbytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        return OffloadIOError(
            f"no space left in {folder} while writing the new values of {names} ({format_size(nbytes)}; "
            f"{format_size(shutil.disk_usage(folder).free)} free); nothing in the folder was changed. Free disk "
            "space, then merge again.", exc.errno)
    return OffloadIOError(
        f"writing the new values of {names} into {folder} failed ({exc.strerror or exc}); nothing in the folder "
        "was changed. Fix the folder (permissions, disk), then merge again.", exc.errno)
