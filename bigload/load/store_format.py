"""The offload folder's format: accelerate's layout, and the file operations every write goes through.

A store folder holds `index.json`, mapping each tensor name to `{"dtype": "float16", "shape": [...]}`, and
one raw `<name>.dat` per tensor (bfloat16 written as its int16 bits, float8 as int8 bits, a 0-d tensor as
one element), exactly what `accelerate.utils.offload_state_dict` writes, so accelerate reads bigload's
folders and bigload reads accelerate's. A tensor that needs no conversion is instead an entry
`{"safetensors_file": ..., "weight_name": ..., "dtype": ...}` pointing into the original checkpoint: no byte
is copied. bigload's own metadata (`store_origin.StoreOrigin`) sits in `bigload.json` beside the index.

Every file is written under a temporary name, fsync'd and renamed into place, so a reader never sees a
partly written file under a name the index lists.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

import torch

from bigload.errors import OffloadError, OffloadIOError
from bigload.messages import Setting, Text, setting

__all__ = ["DTYPES", "INDEX_FILE", "ORIGIN_FILE", "TMP_MARK", "TensorMeta", "check_entry_fields", "dat_path",
           "dtype_name", "ensure_writable", "fsync_dir", "json_payload", "parse_dtype", "read_index",
           "replace_together", "write_file", "write_json_atomic"]

INDEX_FILE = "index.json"
ORIGIN_FILE = "bigload.json"
TMP_MARK = ".bigload-tmp"

# index.json dtype names (numpy's, plus "bfloat16"/"float8_*" which accelerate stores as integer bits).
DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
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


def dtype_name(dtype: torch.dtype) -> str:
    """index.json's name for a dtype: "float32", "bfloat16", "bool", ..."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(folder: Path, name: str, value: object) -> torch.dtype:
    if not isinstance(value, str) or value not in DTYPES:
        raise OffloadError(
            f"{folder / INDEX_FILE}: tensor {name!r} has unknown dtype {value!r}; the index is corrupt. "
            "Delete the folder and load again."
        )
    return DTYPES[value]


def dat_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.dat"


def write_file(path: Path, payload: Iterable[memoryview]) -> None:
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


def json_payload(content: object) -> list[memoryview]:
    """`content` as the bytes of a JSON file (index.json, bigload.json)."""
    return [memoryview(json.dumps(content, indent=2).encode())]


def write_json_atomic(path: Path, content: object) -> None:
    temp = path.with_name(path.name + TMP_MARK)
    try:
        write_file(temp, json_payload(content))
        os.replace(temp, path)
    except OSError:
        temp.unlink(missing_ok=True)
        raise


def replace_together(files: Sequence[tuple[Path, Iterable[memoryview]]]) -> None:
    """Give each file its new content, all or none.

    Every new content is written to a temporary file and fsync'd first: that is where a full disk fails, and
    then nothing in the folder has changed. Only then are the temporaries renamed over the files, in the given
    order (so a crash part way leaves the earlier files new and the later ones old: callers put the record
    that refuses reuse first and the index last). Each existing file is first hard-linked to a backup name, so
    that a rename failing part way puts back every file renamed before it.

    Raises:
        OSError: the first failure; the files are as they were, and no temporary or backup is left.
    """
    temps: list[Path] = []
    backups: list[Path | None] = []
    try:
        for path, payload in files:
            temps.append(path.with_name(path.name + TMP_MARK))
            write_file(temps[-1], payload)
        for path, _ in files:
            backups.append(_backup(path))
    except OSError:
        _remove(temps + [backup for backup in backups if backup is not None])
        raise
    for done, ((path, _), temp) in enumerate(zip(files, temps)):
        try:
            os.replace(temp, path)
        except OSError:
            _put_back([path for path, _ in files[:done]], backups[:done])
            _remove(temps[done:] + [backup for backup in backups if backup is not None])
            raise
    fsync_dir(files[0][0].parent)
    _remove([backup for backup in backups if backup is not None])


def _backup(path: Path) -> Path | None:
    """A second name for `path`'s current file (None when there is none); the folder's own disk, no copy."""
    if not path.exists():
        return None
    backup = path.with_name(path.name + ".old" + TMP_MARK)
    backup.unlink(missing_ok=True)  # left by a crash
    try:
        os.link(path, backup)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            return None  # a filesystem without hard links: a failed rename cannot be undone there
        raise
    return backup


def _put_back(paths: list[Path], backups: list[Path | None]) -> None:
    for path, backup in zip(paths, backups):
        if backup is None:
            path.unlink(missing_ok=True)
        else:
            os.replace(backup, path)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_writable(folder: Path) -> None:
    probe = folder / f"probe-{os.getpid()}-{threading.get_ident()}{TMP_MARK}"  # its own: loads may probe at once
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OSError as exc:
        raise OffloadIOError(
            Text(f"cannot write to the offload folder {folder} ({exc.strerror or exc}); pass an ",
                 Setting("offload_folder", "--offload-folder DIR"), " you can write to."),
            exc.errno,
        ) from None


def read_index(folder: Path) -> dict[str, dict[str, object]]:
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


def check_entry_fields(folder: Path, name: str, entry: object) -> None:
    """Refuse an index entry `meta`/`get` could not read: checked at `open`, so damage shows up front."""
    where = f"{folder / INDEX_FILE}: the entry of {name!r}"
    fix = "the index is corrupt. Delete the folder and load again."
    if not isinstance(entry, dict):
        raise OffloadError(f"{where} is not an object; {fix}")
    parse_dtype(folder, name, entry.get("dtype"))
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

