"""Tests for the checkpoint formats (`bigload.formats`): every format against the reference readers, zero-copy reads, malformed input."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from bad_inputs.corpus import two_shards
from bigload.formats.mapped import CheckpointReader
from bigload.formats.refs import TensorRef
from bigload.formats.discover import open_checkpoint
from bigload.formats.safetensors import read_safetensors_header
from bigload.errors import CheckpointError
from fixtures_ckpt import assert_bitwise_equal, mapped_file_of, save_bin_shards, tiny_llama, write_safetensors_raw


def odd_state_dict() -> dict[str, torch.Tensor]:
    """Dtypes and shapes that trip readers: bf16, bool, int, 0-d, empty."""
    torch.manual_seed(1)
    return {
        "w.f32": torch.randn(5, 7),
        "w.bf16": torch.randn(3, 4).to(torch.bfloat16),
        "w.f16": torch.randn(9).half(),
        "w.i64": torch.arange(6).reshape(2, 3),
        "w.bool": torch.tensor([True, False, True]),
        "w.u8": torch.arange(10, dtype=torch.uint8),
        "w.scalar": torch.tensor(2.5),
        "w.empty": torch.empty(0, 4),
    }


def read_all(path: Path) -> dict[str, torch.Tensor]:
    index = open_checkpoint(path)
    with CheckpointReader(index) as reader:
        return {name: reader.read(ref) for name, ref in index.tensors.items()}


@pytest.fixture(scope="module")
def llama_state() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tiny_llama().state_dict().items()}


@pytest.fixture(scope="module")
def sharded_safetensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sharded_st")
    tiny_llama().save_pretrained(folder, max_shard_size="20KB")
    return folder


# --- formats, checked against safetensors / torch.load -------------------------------------------------


def test_single_safetensors_matches_reference_reader(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(odd_state_dict(), path, metadata={"format": "pt"})
    index = open_checkpoint(path)
    expected = load_file(path)
    assert index.format == "safetensors" and index.files == (path.resolve(),)
    assert dict(index.metadata) == {"format": "pt"}
    assert set(index.tensors) == set(expected)
    offsets = [ref.offset for ref in index.tensors.values()]
    assert offsets == sorted(offsets)
    assert index.total_bytes == sum(t.numel() * t.element_size() for t in expected.values())
    for name, tensor in read_all(path).items():
        assert_bitwise_equal(tensor, expected[name], name=name)


def test_sharded_safetensors_from_save_pretrained(sharded_safetensors: Path) -> None:
    shards = sorted(sharded_safetensors.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = open_checkpoint(sharded_safetensors)
    assert index.files == tuple(p.resolve() for p in shards)
    expected: dict[str, torch.Tensor] = {}
    for shard in shards:
        expected.update(load_file(shard))
    assert set(index.tensors) == set(expected)
    order = [(index.files.index(ref.file), ref.offset) for ref in index.tensors.values()]
    assert order == sorted(order), "tensors must be listed in file order, then offset order"
    for name, tensor in read_all(sharded_safetensors / "model.safetensors.index.json").items():
        assert_bitwise_equal(tensor, expected[name], name=name)


def test_single_bin_with_views_and_shared_storage(tmp_path: Path) -> None:
    state = odd_state_dict()
    base = torch.randn(4, 6)
    state["w.transposed"] = base.t()  # non-contiguous view
    state["w.tied_a"] = base
    state["w.slice"] = base[1:3]  # storage offset != 0
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    index = open_checkpoint(path)
    assert index.format == "torch"
    assert index.tensors["w.transposed"].stride == (1, 6)
    assert index.tensors["w.tied_a"].offset == index.tensors["w.transposed"].offset
    expected = torch.load(path, weights_only=True)
    loaded = read_all(path)
    assert set(loaded) == set(expected)
    for name, tensor in loaded.items():
        assert_bitwise_equal(tensor, expected[name], name=name)
        assert tensor.stride() == expected[name].stride() or tensor.numel() <= 1


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_checkpoints_match_torch_load(tmp_path: Path, llama_state: dict[str, torch.Tensor],
                                          shards: int) -> None:
    entry = save_bin_shards(llama_state, tmp_path, shards)
    index = open_checkpoint(tmp_path)  # folder discovery
    assert index.format == "torch" and len(index.files) == shards
    assert entry.name in ("pytorch_model.bin", "pytorch_model.bin.index.json")
    loaded = read_all(entry)
    assert set(loaded) == set(llama_state)
    for name, tensor in loaded.items():
        assert_bitwise_equal(tensor, llama_state[name], name=name)


def test_folder_prefers_safetensors_over_bin(tmp_path: Path) -> None:
    save_file({"a": torch.ones(3)}, tmp_path / "model.safetensors")
    torch.save({"a": torch.zeros(3), "b": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    index = open_checkpoint(tmp_path)
    assert index.format == "safetensors" and list(index.tensors) == ["a"]


def test_folder_with_several_unindexed_safetensors_is_ambiguous(tmp_path: Path) -> None:
    save_file({"a": torch.ones(3)}, tmp_path / "one.safetensors")
    save_file({"b": torch.ones(3)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match=r"several files match .*one.safetensors.*pass the one"):
        open_checkpoint(tmp_path)


def test_empty_folder_says_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint found; expected model.safetensors"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        open_checkpoint(tmp_path / "nope.safetensors")


# --- zero-copy, file-backed reads ----------------------------------------------------------------------


def test_read_is_a_file_backed_view_that_never_writes_back(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, path)
    before = path.read_bytes()
    index = open_checkpoint(path)
    reader = CheckpointReader(index)
    first = reader.read(index.tensors["w"])
    second = reader.read(index.tensors["w"])
    assert first.data_ptr() == second.data_ptr(), "reads must share the mapping, not copy"
    assert mapped_file_of(first.data_ptr()) == str(path.resolve())
    reader.close()
    first.mul_(2)  # copy-on-write: private to this process, and the view outlives close()
    assert second[3].item() == 6.0
    assert path.read_bytes() == before


def test_unaligned_offsets_fall_back_to_an_aligned_copy(tmp_path: Path) -> None:
    values = torch.arange(5, dtype=torch.float32)
    header = {"x": {"dtype": "F32", "shape": [5], "data_offsets": [0, 20]}}
    path = write_safetensors_raw(tmp_path / "odd.safetensors", header, values.numpy().tobytes(), pad_to=None)
    ref = open_checkpoint(path).tensors["x"]
    assert ref.offset % 4 != 0
    with CheckpointReader(open_checkpoint(path)) as reader:
        tensor = reader.read(ref)
    assert tensor.data_ptr() % 4 == 0
    assert_bitwise_equal(tensor, values)


def test_populate_accepts_ranges_across_files(sharded_safetensors: Path) -> None:
    index = open_checkpoint(sharded_safetensors)
    with CheckpointReader(index) as reader:
        for ref in index.tensors.values():
            reader.populate(ref.file, ref.offset, ref.nbytes)
        ref = next(iter(index.tensors.values()))
        assert reader.read(ref).shape == ref.shape


def test_fingerprint_is_stable_moves_with_the_folder_and_changes_on_touch(
        tmp_path: Path, sharded_safetensors: Path) -> None:
    first = open_checkpoint(sharded_safetensors).fingerprint()
    assert first == open_checkpoint(sharded_safetensors).fingerprint()
    moved = tmp_path / "moved"
    shutil.copytree(sharded_safetensors, moved)  # copy2 keeps mtimes
    assert open_checkpoint(moved).fingerprint() == first
    shard = sorted(moved.glob("model-*.safetensors"))[0]
    os.utime(shard, ns=(0, shard.stat().st_mtime_ns + 10**9))
    assert open_checkpoint(moved).fingerprint() != first


def test_content_digests_ignore_copies_and_mtimes_and_see_other_bytes_at_either_end_of_a_tensor(
        tmp_path: Path) -> None:
    big = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB: far more than the two sampled pages
    save_file({"big": big, "small": torch.ones(3)}, tmp_path / "a.safetensors")
    first = open_checkpoint(tmp_path / "a.safetensors").content_digests()
    assert set(first) == {"a.safetensors"}
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copyfile(tmp_path / "a.safetensors", copy / "a.safetensors")  # new mtime, new folder
    os.utime(copy / "a.safetensors", ns=(0, 10**9))
    assert open_checkpoint(copy / "a.safetensors").content_digests() == first
    for where in (0, big.numel() - 1):  # the first and the last element of the large tensor
        changed = big.clone()
        changed[where] += 1
        save_file({"big": changed, "small": torch.ones(3)}, copy / "a.safetensors")
        assert open_checkpoint(copy / "a.safetensors").content_digests() != first
    middle = big.clone()
    middle[big.numel() // 2] += 1  # away from both ends: not sampled (documented in docs/reliability.md)
    save_file({"big": middle, "small": torch.ones(3)}, copy / "a.safetensors")
    assert open_checkpoint(copy / "a.safetensors").content_digests() == first


def test_tensor_ref_is_frozen(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2, 3)}, tmp_path / "m.safetensors")
    ref = open_checkpoint(tmp_path).tensors["a"]
    assert isinstance(ref, TensorRef) and ref.numel == 6 and ref.size_bytes == 24
    with pytest.raises(AttributeError, match="cannot assign to field 'offset'"):
        ref.offset = 0  # type: ignore[misc]


# --- malformed safetensors -----------------------------------------------------------------------------

F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (b"{not json", b"", "not valid UTF-8 JSON"),
        (b"\xff\xfe{}", b"", "not valid UTF-8 JSON"),
        ([1, 2], b"", "JSON list, expected an object"),
        ({"t": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), r"tensor 't': unknown dtype 'F99'"),
        ({"t": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}}, bytes(8), r"'t': shape \[-1, 2\]"),
        ({"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), "non-negative integers"),
        ({"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 32]}}, bytes(16), "outside the data section"),
        ({"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 4]}}, bytes(16), "outside the data section"),
        ({"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, bytes(16), "span 12 bytes .* needs 16"),
        ({"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}}, bytes(16), "data_offsets .* two"),
        ({"t": "nope"}, b"", "'t': header entry must be an object"),
        ({"a": F32_2x2, "b": {**F32_2x2, "data_offsets": [8, 24]}}, bytes(24), "'a' and 'b' overlap"),
        ({"__metadata__": {"k": 1}, "a": F32_2x2}, bytes(16), "'__metadata__' must map strings to strings"),
    ],
    ids=["non-json", "non-utf8", "array", "unknown-dtype", "negative-shape", "bool-shape", "past-end",
         "reversed", "length-mismatch", "one-offset", "entry-not-object", "overlap", "bad-metadata"],
)
def test_malformed_headers_raise_checkpoint_error_naming_file(tmp_path: Path, header: object, data: bytes,
                                                               message: str) -> None:
    path = write_safetensors_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message) as caught:
        open_checkpoint(path)
    assert str(path.resolve()) in str(caught.value)


def test_empty_and_tiny_files(tmp_path: Path) -> None:
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="0 bytes is too small .* truncated or empty"):
        open_checkpoint(tmp_path / "empty.safetensors")
    (tmp_path / "five.safetensors").write_bytes(b"\x01\x02\x03\x04\x05")
    with pytest.raises(CheckpointError, match="5 bytes is too small"):
        open_checkpoint(tmp_path / "five.safetensors")


def test_lying_header_length_is_refused_before_allocating(tmp_path: Path) -> None:
    path = write_safetensors_raw(tmp_path / "liar.safetensors", {"a": F32_2x2}, bytes(16), header_len=2**62)
    with pytest.raises(CheckpointError, match=r"header claims 4611686018427387904 bytes .* truncated"):
        open_checkpoint(path)


def test_truncated_file_is_caught_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(64), "b": torch.ones(64)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="tensor 'b': data_offsets .* outside the data section"):
        open_checkpoint(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=64), cut=st.integers(min_value=0, max_value=200))
def test_arbitrary_bytes_never_escape_as_other_errors(tmp_path: Path, blob: bytes, cut: int) -> None:
    valid = tmp_path / "valid.safetensors"
    if not valid.exists():
        save_file({"a": torch.ones(8), "b": torch.zeros(3, dtype=torch.int64)}, valid)
    raw = valid.read_bytes()
    for attempt, content in enumerate((blob, raw[:cut], raw[:8] + blob + raw[8 + len(blob):])):
        path = tmp_path / f"fuzz{attempt}.safetensors"
        path.write_bytes(content)
        try:
            index = open_checkpoint(path)
        except CheckpointError:
            continue
        with CheckpointReader(index) as reader:
            for ref in index.tensors.values():
                assert reader.read(ref).numel() == ref.numel


# --- sharded indexes -----------------------------------------------------------------------------------


def test_index_metadata_and_missing_shard(tmp_path: Path) -> None:
    index_path = two_shards(tmp_path)
    assert dict(open_checkpoint(index_path).metadata) == {"total_size": "16"}
    (tmp_path / "s2.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard 's2.safetensors' \(1 tensors\) is missing"):
        open_checkpoint(tmp_path)


def test_index_pointing_to_a_shard_that_lacks_the_tensor(tmp_path: Path) -> None:
    index_path = two_shards(tmp_path)
    content = json.loads(index_path.read_text())
    content["weight_map"]["c"] = "s1.safetensors"
    index_path.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=r"1 tensors are listed in the index but absent .* 'c' in 's1"):
        open_checkpoint(index_path)


def test_index_without_weight_map(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="needs a 'weight_map' object"):
        open_checkpoint(path)
    path.write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        open_checkpoint(path)


def test_duplicate_tensor_across_unindexed_shards_is_refused(tmp_path: Path) -> None:
    index_path = two_shards(tmp_path)
    save_file({"b": torch.zeros(2), "a": torch.ones(2)}, tmp_path / "s2.safetensors")
    # The index says "a" lives in s1, so the copy in s2 is ignored rather than a conflict.
    assert open_checkpoint(index_path).tensors["a"].file.name == "s1.safetensors"
    save_file({"b": torch.zeros(2), "z": torch.ones(2)}, tmp_path / "s1.safetensors")
    save_file({"a": torch.zeros(2), "z": torch.ones(2)}, tmp_path / "s2.safetensors")
    index_path.write_text(json.dumps({"weight_map": {"b": "s1.safetensors", "a": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match="'z' is stored in both"):
        open_checkpoint(index_path)


# --- unsafe or legacy PyTorch files --------------------------------------------------------------------


class RunsCode:
    """Pickles to a call of os.system: what a malicious checkpoint looks like."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "evil": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle.*could run code.*safetensors"):
        open_checkpoint(tmp_path)
    assert not marker.exists()
    legacy = tmp_path / "legacy.bin"
    torch.save({"evil": RunsCode(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="zip format"):
        open_checkpoint(legacy)
    assert not marker.exists()


def test_bin_holding_something_else_than_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.bin"
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, expected a state dict"):
        open_checkpoint(path)


def test_unknown_suffix(tmp_path: Path) -> None:
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        open_checkpoint(tmp_path / "weights.npz")


def test_read_after_the_file_shrank(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(1024)}, path)
    index = open_checkpoint(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="tensor .a. needs bytes up to .* changed after it was indexed"):
        CheckpointReader(index).read(index.tensors["a"])


def test_read_safetensors_header_returns_refs_and_metadata(tmp_path: Path) -> None:
    path = write_safetensors_raw(tmp_path / "m.safetensors", {"__metadata__": {"a": "b"}, "t": F32_2x2}, bytes(16))
    refs, metadata = read_safetensors_header(path)
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert metadata == {"a": "b"}
    assert refs[0].offset == 8 + length and refs[0].nbytes == 16


@pytest.mark.parametrize("index_name", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_index_mixing_safetensors_and_bin_shards_is_refused(tmp_path: Path, index_name: str) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    torch.save({"b": torch.zeros(2)}, tmp_path / "b.bin")
    index_path = tmp_path / index_name
    index_path.write_text(json.dumps({"weight_map": {"a": "a.safetensors", "b": "b.bin"}}))
    expected = (f"{index_path}: the index names both safetensors and PyTorch shards (e.g. 'a.safetensors' and "
                "'b.bin'); a checkpoint is in one format. Fix the index or download the checkpoint again.")
    with pytest.raises(CheckpointError, match=f"^{re.escape(expected)}$") as error:
        open_checkpoint(index_path)
    assert type(error.value) is CheckpointError
    if index_name.startswith("model.safetensors"):  # a folder prefers safetensors, so finds this index first
        with pytest.raises(CheckpointError, match="names both safetensors and PyTorch shards"):
            open_checkpoint(tmp_path)
