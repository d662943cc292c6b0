"""Writing an offload folder (`StoreWriter`): tensors as `.dat` files or references into the checkpoint, then
`commit`. Writing is all-or-nothing: `.dat` files are written under temporary names and renamed, and
`index.json` appears only at `commit` (temp file, fsync, rename). Until then the folder holds no index, so an
interrupted load never leaves a store claiming tensors it does not have."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Iterator

import torch

from bigload.errors import OffloadError, OffloadIOError
from bigload.formats.refs import TensorRef
from bigload.load.store import DiskStore
from bigload.load.store_format import (
    INDEX_FILE, ORIGIN_FILE, TMP_MARK, dat_path, dtype_name, ensure_writable, fsync_dir, write_file,
    write_json_atomic,
)
from bigload.load.store_lock import FolderLock
from bigload.load.store_origin import StoreOrigin
from bigload.sizes import dtype_width, format_size

__all__ = ["StoreWriter"]

_CHUNK_BYTES = 4 << 20  # converted bytes held at once while writing a cast copy


class StoreWriter:
    """Writes an offload folder: `put` / `put_reference`, then `commit`, which returns the `DiskStore` that
    reads it. Nothing is listed until `commit`.

    >>> with StoreWriter("offload/") as writer:  # doctest: +SKIP
    ...     writer.put("lm_head.weight", weight)
    ...     writer.put_reference("model.embed_tokens.weight", index.tensors["model.embed_tokens.weight"])
    ...     store = writer.commit(StoreOrigin(index.fingerprint(), str(index.root), "bfloat16"))

    Leaving the `with` block by an exception before `commit` removes every file this writer created. From
    creation to `commit` or `abort` the writer holds the folder's lock (`store_lock.FolderLock`): another
    load or writer of the folder waits for it.
    """

    def __init__(self, folder: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Start writing a store in `folder` (created if needed).

        Args:
            folder: the offload folder.
            overwrite: replace a store already in the folder (its index is removed first, so it never
                describes files being rewritten).

        Raises:
            OffloadError: the folder cannot be created or written, already holds a store and `overwrite` is
                False, or another process kept its lock too long (`store_lock.LOCK_TIMEOUT_S`).
        """
        self.folder = Path(folder).expanduser().resolve()
        self._entries: dict[str, dict[str, object]] = {}
        self._written: list[Path] = []
        self._scratch: torch.Tensor | None = None
        self._committed = False
        ensure_writable(self.folder)
        self._lock = FolderLock(self.folder, doing="writing").acquire()
        try:
            self._clear(overwrite)
        except BaseException:
            self._lock.release()
            raise

    def _clear(self, overwrite: bool) -> None:
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
        self._lock.release()

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
        temp = final.with_name(final.name + TMP_MARK)
        try:
            write_file(temp, self._payload(data, target))
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
            write_json_atomic(self.folder / ORIGIN_FILE, origin.to_json())
            write_json_atomic(self.folder / INDEX_FILE, self._entries)
            fsync_dir(self.folder)
        except OSError as exc:
            # The index may be in place if only the directory sync failed; the data it lists will be removed
            # by `abort`, so it must go too. The writer owns both files (see __init__).
            (self.folder / INDEX_FILE).unlink(missing_ok=True)
            (self.folder / ORIGIN_FILE).unlink(missing_ok=True)
            raise self._write_error(INDEX_FILE, 0, exc) from exc
        self._committed = True
        try:
            return DiskStore(self.folder)
        finally:
            self._lock.release()

    def abort(self) -> None:
        """Remove every file this writer created (before `commit`); the folder holds no store afterwards."""
        for path in self._written:
            path.unlink(missing_ok=True)
        for temp in self.folder.glob(f"*{TMP_MARK}"):
            temp.unlink(missing_ok=True)
        if not (self.folder / INDEX_FILE).exists():
            # An origin without an index describes nothing (a commit that failed half way).
            (self.folder / ORIGIN_FILE).unlink(missing_ok=True)
        self._written.clear()
        self._entries.clear()
        self._lock.release()

    # -- internals -------------------------------------------------------------------------------------

    def _dat_path(self, name: str) -> Path:
        return dat_path(self.folder, name)

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

