"""A corpus of bad checkpoints and offload folders, generated on demand (nothing binary is committed).

Each `Case` writes one bad input into a folder and says what bigload must do with it: the error class and
a regular expression its message must match. The reliability tests run every case through several entry
points (`open_checkpoint`, the loader, a sharded index, the CLI); the fuzzers use the files as seeds.

Valid building blocks (`tiny_state`, `write_valid`) are here too, so a case is "a valid file, then one
thing wrong with it".
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from bigload.errors import BigloadError, CheckpointError, OffloadError

F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def tiny_state() -> dict[str, torch.Tensor]:
    """Two small tensors of different dtypes (a valid safetensors payload)."""
    return {"a": torch.arange(8, dtype=torch.float32), "b": torch.arange(3, dtype=torch.int64)}


def write_valid(path: Path) -> Path:
    save_file(tiny_state(), path)
    return path


def raw_safetensors(path: Path, header: object, data: bytes = b"", *, header_len: int | None = None,
                    pad: bool = True) -> Path:
    """A safetensors file from a header object (or raw header bytes) and a data section.

    `header_len` overrides the 8-byte length field (to make it lie).
    """
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


def _entry(**changes: object) -> dict[str, object]:
    return {"t": {**F32_2x2, **changes}}


@dataclass(frozen=True)
class Case:
    """One bad input: `build(folder)` writes it and returns the path to hand to bigload."""

    id: str
    build: Callable[[Path], Path]
    error: type[BigloadError]
    match: str
    names: str = ""  # a substring the message must contain besides the file (e.g. the tensor)


def _header_case(case_id: str, header: object, data: bytes, match: str, *, names: str = "",
                 header_len: int | None = None, pad: bool = True) -> Case:
    def build(folder: Path) -> Path:
        return raw_safetensors(folder / "model.safetensors", header, data, header_len=header_len, pad=pad)

    return Case(case_id, build, CheckpointError, match, names)


def _truncated_in_data(folder: Path) -> Path:
    path = write_valid(folder / "model.safetensors")
    path.write_bytes(path.read_bytes()[:-5])
    return path


def _truncated_in_header(folder: Path) -> Path:
    path = write_valid(folder / "model.safetensors")
    path.write_bytes(path.read_bytes()[:20])
    return path


def _empty(folder: Path) -> Path:
    path = folder / "model.safetensors"
    path.write_bytes(b"")
    return path


def _header_one_past_end(folder: Path) -> Path:
    path = write_valid(folder / "model.safetensors")
    raw = path.read_bytes()
    return _with_length(path, raw, len(raw) - 8 + 1)


def _with_length(path: Path, raw: bytes, length: int) -> Path:
    path.write_bytes(struct.pack("<Q", length) + raw[8:])
    return path


# Every malformed safetensors header we know of. Messages are matched loosely on the gist; the file name
# is always checked by the tests.
SAFETENSORS_CASES: tuple[Case, ...] = (
    Case("empty-file", _empty, CheckpointError, r"0 bytes is too small .*truncated or empty"),
    Case("five-bytes", lambda f: _bytes(f, b"\x01\x02\x03\x04\x05"), CheckpointError, "5 bytes is too small"),
    Case("truncated-in-data", _truncated_in_data, CheckpointError, "outside the data section", "tensor 'a'"),
    Case("truncated-in-header", _truncated_in_header, CheckpointError, r"header claims \d+ bytes .*truncated"),
    Case("header-one-past-end", _header_one_past_end, CheckpointError, r"header claims \d+ bytes"),
    _header_case("header-len-2**60", {"t": F32_2x2}, bytes(16), r"header claims 1152921504606846976 bytes",
                 header_len=2**60),
    _header_case("header-len-u64-max", {"t": F32_2x2}, bytes(16), r"header claims 18446744073709551615",
                 header_len=2**64 - 1),
    _header_case("not-json", b"{not json", b"", "not valid UTF-8 JSON"),
    _header_case("not-utf8", b'{"\xff": 1}', b"", "not valid UTF-8 JSON"),
    _header_case("json-array", [1, 2], b"", "JSON list, expected an object"),
    _header_case("json-string", "hello", b"", "JSON str, expected an object"),
    _header_case("json-number", 7, b"", "JSON int, expected an object"),
    _header_case("json-null", None, b"", "JSON NoneType, expected an object"),
    # Python's json module raises RecursionError / a plain ValueError for these, not JSONDecodeError.
    _header_case("json-deeply-nested", b"[" * 100_000, b"", "not valid UTF-8 JSON"),
    _header_case("json-5000-digit-int", b'{"t": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], '
                 b'"data_offsets": [0, 4]}}', bytes(4), "not valid UTF-8 JSON"),
    _header_case("unknown-dtype", _entry(dtype="F99"), bytes(16), r"unknown dtype 'F99'", names="'t'"),
    _header_case("dtype-not-a-string", _entry(dtype=["F32"]), bytes(16), r"unknown dtype \['F32'\]",
                 names="'t'"),
    _header_case("dtype-object", _entry(dtype={"F32": 1}), bytes(16), "unknown dtype", names="'t'"),
    _header_case("negative-shape", _entry(shape=[-2, -2]), bytes(16), r"shape \[-2, -2\] must be",
                 names="'t'"),
    _header_case("float-shape", _entry(shape=[2.0, 2]), bytes(16), "non-negative integers", names="'t'"),
    _header_case("string-shape", _entry(shape=["2", "2"]), bytes(16), "non-negative integers", names="'t'"),
    _header_case("shape-not-a-list", _entry(shape=4), bytes(16), "non-negative integers", names="'t'"),
    _header_case("bool-shape", _entry(shape=[True, 4]), bytes(16), "non-negative integers", names="'t'"),
    _header_case("nan-shape", b'{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', bytes(8),
                 "non-negative integers", names="'t'"),
    _header_case("huge-shape", _entry(shape=[2**40, 2**40]), bytes(16), r"needs \d+", names="'t'"),
    _header_case("offsets-past-end", _entry(data_offsets=[0, 32]), bytes(16), "outside the data section",
                 names="'t'"),
    _header_case("offsets-far-past-end", _entry(data_offsets=[2**62, 2**62 + 16]), bytes(16),
                 "outside the data section", names="'t'"),
    _header_case("offsets-reversed", _entry(data_offsets=[16, 0]), bytes(16), "outside the data section",
                 names="'t'"),
    _header_case("offsets-negative", _entry(data_offsets=[-16, 0]), bytes(16), "two non-negative integers",
                 names="'t'"),
    _header_case("offsets-float", _entry(data_offsets=[0.0, 16.0]), bytes(16), "two non-negative integers",
                 names="'t'"),
    _header_case("offsets-three", _entry(data_offsets=[0, 8, 16]), bytes(16), "two non-negative integers",
                 names="'t'"),
    _header_case("offsets-missing", {"t": {"dtype": "F32", "shape": [2, 2]}}, bytes(16),
                 "two non-negative integers", names="'t'"),
    _header_case("offsets-not-shape-x-width", _entry(data_offsets=[0, 12]), bytes(16),
                 r"span 12 bytes .* needs 16", names="'t'"),
    _header_case("offsets-overlap", {"a": F32_2x2, "b": {**F32_2x2, "data_offsets": [8, 24]}}, bytes(24),
                 "'a' and 'b' overlap"),
    _header_case("entry-not-object", {"t": [1, 2]}, b"", "header entry must be an object", names="'t'"),
    _header_case("metadata-not-strings", {"__metadata__": {"k": 1}, "t": F32_2x2}, bytes(16),
                 "'__metadata__' must map strings to strings"),
    _header_case("metadata-list", {"__metadata__": ["x"], "t": F32_2x2}, bytes(16),
                 "'__metadata__' must map strings to strings"),
)


def _bytes(folder: Path, content: bytes, name: str = "model.safetensors") -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


# --- sharded indexes ----------------------------------------------------------------------------------


def two_shards(folder: Path) -> Path:
    """A valid two-shard safetensors checkpoint with its index; returns the index path."""
    save_file({"a": torch.ones(2)}, folder / "s1.safetensors")
    save_file({"b": torch.zeros(2)}, folder / "s2.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 16},
                                 "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    return index


def _index_with(folder: Path, weight_map: dict[str, str]) -> Path:
    index = two_shards(folder)
    index.write_text(json.dumps({"weight_map": weight_map}))
    return index


def _index_raw(folder: Path, text: str) -> Path:
    index = two_shards(folder)
    index.write_text(text)
    return index


def _index_with_outside_shard(folder: Path) -> Path:
    inner = folder / "ckpt"
    inner.mkdir()
    index = two_shards(inner)
    save_file({"c": torch.ones(1)}, folder / "outside.safetensors")
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors",
                                                "c": "../outside.safetensors"}}))
    return index


def _index_with_absolute_shard(folder: Path) -> Path:
    inner = folder / "ckpt"
    inner.mkdir()
    index = two_shards(inner)
    outside = folder / "elsewhere.safetensors"
    save_file({"c": torch.ones(1)}, outside)
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "c": str(outside.resolve())}}))
    return index


def _index_with_bad_shard(folder: Path) -> Path:
    index = two_shards(folder)
    path = folder / "s2.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    return index


INDEX_CASES: tuple[Case, ...] = (
    Case("index-missing-shard",
         lambda f: _index_with(f, {"a": "s1.safetensors", "b": "s3.safetensors"}),
         CheckpointError, r"shard 's3.safetensors' \(1 tensors\) is missing"),
    Case("index-tensor-absent-from-shard",
         lambda f: _index_with(f, {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"}),
         CheckpointError, r"listed in the index but absent .*'c' in 's2.safetensors'"),
    Case("index-not-json", lambda f: _index_raw(f, "{"), CheckpointError, "not valid JSON"),
    Case("index-deeply-nested", lambda f: _index_raw(f, "[" * 100_000), CheckpointError, "not valid JSON"),
    Case("index-no-weight-map", lambda f: _index_raw(f, json.dumps({"metadata": {}})), CheckpointError,
         "needs a 'weight_map' object"),
    Case("index-weight-map-values-not-strings",
         lambda f: _index_raw(f, json.dumps({"weight_map": {"a": 1}})), CheckpointError,
         "needs a 'weight_map' object"),
    Case("index-json-array", lambda f: _index_raw(f, "[]"), CheckpointError, "needs a 'weight_map' object"),
    Case("index-shard-malformed", _index_with_bad_shard, CheckpointError, r"s2.safetensors.*outside the data"),
    # A stranger's index must not make bigload read files outside the checkpoint folder.
    Case("index-shard-outside-folder", _index_with_outside_shard, CheckpointError,
         r"'\.\./outside\.safetensors'.*outside"),
    Case("index-shard-absolute-path", _index_with_absolute_shard, CheckpointError, r"elsewhere.*outside"),
)


# --- PyTorch pickles that try to run code -------------------------------------------------------------


class RunsCode:
    """Unpickles to a call of os.system creating `marker`: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


class EvalsCode:
    """Unpickles to builtins.exec of Python source creating `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def malicious_zip(folder: Path, marker: Path, name: str = "pytorch_model.bin") -> Path:
    path = folder / name
    torch.save({"w": torch.ones(2), "evil": RunsCode(marker)}, path)
    return path


def malicious_zip_exec(folder: Path, marker: Path, name: str = "pytorch_model.bin") -> Path:
    path = folder / name
    torch.save({"w": torch.ones(2), "evil": EvalsCode(marker)}, path)
    return path


def malicious_legacy(folder: Path, marker: Path, name: str = "pytorch_model.bin") -> Path:
    path = folder / name
    torch.save({"evil": RunsCode(marker)}, path, _use_new_zipfile_serialization=False)
    return path


def malicious_raw_pickle(folder: Path, marker: Path, name: str = "pytorch_model.bin") -> Path:
    path = folder / name
    path.write_bytes(pickle.dumps({"evil": RunsCode(marker)}))
    return path


def malicious_shard_in_index(folder: Path, marker: Path) -> Path:
    """A sharded .bin checkpoint whose second shard carries the payload."""
    torch.save({"a": torch.ones(2)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.ones(2), "evil": RunsCode(marker)}, folder / "pytorch_model-00002-of-00002.bin")
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                                                "b": "pytorch_model-00002-of-00002.bin"}}))
    return index


PICKLE_BUILDERS: dict[str, Callable[[Path, Path], Path]] = {
    "zip-os-system": malicious_zip,
    "zip-exec": malicious_zip_exec,
    "legacy-format": malicious_legacy,
    "raw-pickle": malicious_raw_pickle,
    "shard-of-index": malicious_shard_in_index,
}


# --- offload folders ----------------------------------------------------------------------------------

OFFLOAD_ENTRY_CASES: tuple[tuple[str, object, str], ...] = (
    # (id, index.json content for a store holding "w" = ones(3) float32, message gist)
    ("index-deeply-nested", "[" * 100_000, "not valid JSON"),
    ("index-5000-digit-int", '{"w": {"dtype": "float32", "shape": [' + "9" * 5000 + "]}}", "not valid JSON"),
    ("dtype-list", {"w": {"dtype": ["x"], "shape": [3]}}, "unknown dtype"),
    ("dtype-unknown", {"w": {"dtype": "float13", "shape": [3]}}, "unknown dtype 'float13'"),
    ("shape-string", {"w": {"dtype": "float32", "shape": "abc"}}, "shape"),
    ("shape-null", {"w": {"dtype": "float32", "shape": None}}, "shape"),
    ("shape-negative", {"w": {"dtype": "float32", "shape": [-3]}}, "shape"),
    ("no-shape-no-file", {"w": {"dtype": "float32"}}, "'w'"),
    ("entry-not-object", {"w": [1]}, "not an object"),
    ("wrong-size", {"w": {"dtype": "float32", "shape": [5]}}, "has 12 bytes, expected 20"),
    ("reference-to-missing-file", {"w": {"safetensors_file": "/nonexistent/x.safetensors", "weight_name": "w",
                                         "dtype": "float32"}}, "no longer exists"),
)

__all__ = [
    "Case",
    "F32_2x2",
    "INDEX_CASES",
    "OFFLOAD_ENTRY_CASES",
    "OffloadError",
    "PICKLE_BUILDERS",
    "SAFETENSORS_CASES",
    "raw_safetensors",
    "tiny_state",
    "two_shards",
    "write_valid",
]
