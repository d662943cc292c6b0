"""What an offload folder was built from (`bigload.json`): the source checkpoint's fingerprint, the dtypes,
the quantization, and what changed its bytes since. A folder built from another checkpoint, dtype or scheme is
refused instead of silently used, with a message naming what differs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from bigload.errors import OffloadError
from bigload.formats.refs import CheckpointIndex
from bigload.load.store_format import ORIGIN_FILE, dtype_name
from bigload.messages import Setting, Text, setting
from bigload.tensors import summarize_names

__all__ = ["StoreOrigin", "check_origin", "read_origin", "summarize_changes"]


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



def read_origin(folder: Path) -> StoreOrigin | None:
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


def check_origin(folder: Path, expected: StoreOrigin) -> None:
    found = read_origin(folder)
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
