"""Reliability fuzzing: the header parser, the shard-index reader and the offload-store index reader under
random and mutated input. Each returns a valid result or raises its own error class (CheckpointError /
OffloadError); never another exception, never a hang, never an allocation sized by a lying length field.

`test_checkpoint.py::test_arbitrary_bytes_never_escape_as_other_errors` covers short random blobs; these
tests mutate real files and generate structured headers, which is what finds parser escapes.
The longer campaign is `python tests/fuzz/header_fuzz.py` (plain loop, or `--atheris`).
"""

from __future__ import annotations

import json
import random
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bad_inputs.corpus import raw_safetensors, two_shards, write_valid
from bigload.formats.safetensors import SAFETENSORS_DTYPES
from bigload.formats.discover import open_checkpoint
from bigload.errors import CheckpointError, OffloadError
from bigload.load.store import DiskStore
from bigload.load.store_writer import StoreWriter
from fuzz.header_fuzz import FRAGMENTS, check_file, check_store_index, mutate, plain_loop, seed_files

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SEEDS = seed_files()


def _checked(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    started = time.monotonic()
    outcome = check_file(path)
    assert time.monotonic() - started < 5, "parsing one small file took seconds"
    return outcome


@FUZZ
@given(seed=st.sampled_from(range(len(SEEDS))), rng=st.randoms(use_true_random=False))
def test_mutated_real_files_give_an_index_or_checkpoint_error(tmp_path: Path, seed: int, rng: random.Random) -> None:
    _checked(tmp_path / "m.safetensors", mutate(SEEDS[seed], rng))


_JUNK = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=4),
                  st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
_DTYPE = st.one_of(st.sampled_from(sorted(SAFETENSORS_DTYPES)), st.sampled_from(["F4", "f32", "", "I128"]), _JUNK)
_SHAPE = st.one_of(st.lists(st.integers(-2, 6), max_size=4), st.lists(st.integers(0, 2**64), max_size=2), _JUNK)
_OFFSETS = st.one_of(st.lists(st.integers(-8, 256), min_size=2, max_size=2),
                     st.tuples(st.integers(0, 64), st.integers(2**62, 2**64)).map(list), _JUNK)
_ENTRY = st.one_of(st.fixed_dictionaries({"dtype": _DTYPE, "shape": _SHAPE, "data_offsets": _OFFSETS}), _JUNK)
_HEADER = st.dictionaries(st.text(min_size=1, max_size=6), _ENTRY, max_size=5)


@FUZZ
@given(header=_HEADER, data=st.binary(max_size=300), metadata=st.one_of(st.none(), st.just({"format": "pt"}), _JUNK),
       fragment=st.one_of(st.none(), st.sampled_from(FRAGMENTS)))
def test_structured_headers_give_an_index_or_checkpoint_error(tmp_path: Path, header: dict, data: bytes,
                                                              metadata: object, fragment: bytes | None) -> None:
    body = dict(header)
    if metadata is not None:
        body["__metadata__"] = metadata
    raw = json.dumps(body).encode()
    if fragment is not None:  # spliced JSON: deep nesting, huge numbers, broken syntax
        raw = raw[:-1] + b',"x":' + fragment + b"}"
    path = raw_safetensors(tmp_path / "s.safetensors", raw, data)
    _checked(path, path.read_bytes())


@pytest.mark.parametrize("claimed", [None, 2**31, 2**40, 2**60, 2**64 - 1, 100_000_001], ids=str)
def test_lying_length_field_fails_fast_without_allocating(tmp_path: Path, claimed: int | None) -> None:
    path = write_valid(tmp_path / "m.safetensors")
    raw = path.read_bytes()
    length = len(raw) - 8 + 1 if claimed is None else claimed  # None: one byte more than the file has
    path.write_bytes(struct.pack("<Q", length) + raw[8:])
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(CheckpointError, match=rf"header claims {length} bytes"):
            open_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 1.0
    assert peak < 1 << 20, f"{peak} bytes allocated for a {len(raw)}-byte file"


def test_header_at_the_size_limit_is_refused_before_reading_it(tmp_path: Path) -> None:
    """A file really 100 MB + 1 long with a header claiming all of it: refused by the limit, not read."""
    path = tmp_path / "big.safetensors"
    length = 100_000_001
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", length))
        handle.truncate(8 + length)  # sparse: no disk used
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"limit 100000000"):
            open_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                     max_leaves=12)


@FUZZ
@given(weight_map=st.one_of(st.dictionaries(st.sampled_from(["a", "b", "c"]),
                                            st.one_of(st.sampled_from(["s1.safetensors", "s2.safetensors",
                                                                       "s3.safetensors", "", "."]), _JSON),
                                            max_size=3), _JSON),
       extra=st.one_of(st.none(), st.sampled_from(FRAGMENTS)))
def test_shard_index_gives_an_index_or_checkpoint_error(tmp_path: Path, weight_map: object,
                                                       extra: bytes | None) -> None:
    index = tmp_path / "model.safetensors.index.json"
    if not index.exists():
        two_shards(tmp_path)
    text = json.dumps({"metadata": {"total_size": 16}, "weight_map": weight_map})
    if extra is not None:
        text = text[:-1] + ', "x": ' + extra.decode("latin-1") + "}"
    index.write_text(text)
    try:
        result = open_checkpoint(index)
    except CheckpointError:
        return
    assert set(result.tensors) <= {"a", "b"}


@FUZZ
@given(entries=st.one_of(
    st.dictionaries(st.sampled_from(["w", "v", "x"]),
                    st.one_of(st.fixed_dictionaries({"dtype": st.one_of(st.sampled_from(["float32", "bfloat16", "int8"]),
                                                                        _JSON),
                                                     "shape": st.one_of(st.lists(st.integers(-2, 4), max_size=3),
                                                                        _JSON)}),
                              st.fixed_dictionaries({"safetensors_file": st.one_of(st.text(max_size=8), _JSON),
                                                     "weight_name": _JSON, "dtype": _JSON}),
                              _JSON),
                    max_size=3),
    _JSON))
def test_store_index_gives_a_store_or_offload_error(tmp_path: Path, entries: object) -> None:
    folder = tmp_path / "store"
    if not folder.exists():
        with StoreWriter(folder) as store:
            store.put("w", torch.ones(3))
            store.put("v", torch.arange(4, dtype=torch.int8))
            store.commit("fp")
    check_store_index(folder, json.dumps(entries).encode())


def test_plain_mutation_loop_finds_nothing() -> None:
    """A bounded, deterministic run of the script's fuzzer (about a second)."""
    counts = plain_loop(0, seed=0, iterations=1500)
    assert counts["ok"] > 0 and counts["refused"] > 0, counts


def test_atheris_harness_runs_when_atheris_is_installed(tmp_path: Path) -> None:
    """The libFuzzer harness in tests/fuzz stays runnable (skipped where atheris is not installed)."""
    pytest.importorskip("atheris")
    import subprocess
    import sys

    script = Path(__file__).parent / "fuzz" / "header_fuzz.py"
    done = subprocess.run([sys.executable, str(script), "--atheris", "--", "-runs=2000", "-seed=1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(Path(__file__).parent), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
