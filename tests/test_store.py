"""Tests for bigload.load.store: accelerate's folder layout both ways, references, atomic writes, origin checks."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from accelerate.utils import OffloadedWeightsLoader, offload_state_dict
from accelerate.utils.offload import load_offloaded_weight
from safetensors.torch import save_file

import bigload.load.store_format as store_format
from bigload.formats.discover import open_checkpoint
from bigload.errors import OffloadError
from bigload.load.store import DiskStore, StoreOrigin, TensorMeta
from bigload.load.store_writer import StoreWriter
from fixtures_ckpt import assert_bitwise_equal, mapped_file_of


def sample_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {
        "model.layers.0.w": torch.randn(4, 6),
        "model.layers.0.b16": torch.randn(3, 5).to(torch.bfloat16),
        "model.layers.0.h": torch.randn(7).half(),
        "model.mask": torch.tensor([[True, False], [False, True]]),
        "model.ids": torch.arange(5),
        "model.scale": torch.tensor(0.75),
        "model.f8": torch.randn(8).to(torch.float8_e4m3fn),
    }
    return tensors


def write_store(folder: Path, tensors: dict[str, torch.Tensor], origin: str | StoreOrigin = "fp") -> DiskStore:
    with StoreWriter(folder) as store:
        for name, tensor in tensors.items():
            store.put(name, tensor)
        store.commit(origin)
    return store


def test_round_trip_is_bitwise_and_file_backed(tmp_path: Path) -> None:
    tensors = sample_tensors() | {"model.empty": torch.empty(0, 3)}
    write_store(tmp_path, tensors)
    store = DiskStore.open(tmp_path, expect_fingerprint="fp")
    assert set(store.names) == set(tensors) and len(store) == len(tensors)
    assert "model.ids" in store and "nope" not in store
    for name, tensor in tensors.items():
        got = store.get(name)
        assert store.meta(name) == TensorMeta(tensor.dtype, tuple(tensor.shape))
        assert_bitwise_equal(got, tensor, name=name)
    weight = store.get("model.layers.0.w")
    assert mapped_file_of(weight.data_ptr()) == str(tmp_path.resolve() / "model.layers.0.w.dat")
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["model.layers.0.b16"] == {"dtype": "bfloat16", "shape": [3, 5]}
    assert index["model.scale"] == {"dtype": "float32", "shape": []}
    assert (tmp_path / "model.scale.dat").stat().st_size == 4  # 0-d stored as one element
    assert "fingerprint" not in json.dumps(index)


def test_accelerate_reads_bigloads_folder(tmp_path: Path) -> None:
    tensors = sample_tensors()
    write_store(tmp_path, tensors)
    loader = OffloadedWeightsLoader(save_folder=str(tmp_path))
    assert set(loader) == set(tensors)
    for name, tensor in tensors.items():
        assert_bitwise_equal(loader[name], tensor, name=name)
    info = json.loads((tmp_path / "index.json").read_text())["model.layers.0.w"]
    assert_bitwise_equal(load_offloaded_weight(str(tmp_path / "model.layers.0.w.dat"), info), tensors["model.layers.0.w"])


def test_bigload_reads_accelerates_folder(tmp_path: Path) -> None:
    tensors = sample_tensors()
    offload_state_dict(str(tmp_path), tensors)
    store = DiskStore.open(tmp_path)
    assert store.origin is None
    for name, tensor in tensors.items():
        assert_bitwise_equal(store.get(name), tensor, name=name)
    with pytest.raises(OffloadError, match="bigload did not write .* Use another offload_folder, or delete it"):
        DiskStore.open(tmp_path, expect_fingerprint="fp")


def test_safetensors_references_copy_no_bytes_and_accelerate_follows_them(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt" / "model.safetensors"
    ckpt.parent.mkdir()
    source = {"a.weight": torch.randn(8, 8).to(torch.bfloat16), "b.weight": torch.randn(3)}
    save_file(source, ckpt)
    index = open_checkpoint(ckpt)
    folder = tmp_path / "offload"
    with StoreWriter(folder) as store:
        store.put_reference("model.a.weight", index.tensors["a.weight"])
        store.put_reference("b.weight", index.tensors["b.weight"])
        store.commit(StoreOrigin.of(index, None))
    assert sorted(p.name for p in folder.iterdir()) == ["bigload.json", "index.json"]
    entry = json.loads((folder / "index.json").read_text())["model.a.weight"]
    assert entry["safetensors_file"] == str(ckpt.resolve()) and entry["weight_name"] == "a.weight"
    assert entry["dtype"] == "bfloat16"
    store = DiskStore.open(folder, expect_fingerprint=StoreOrigin.of(index, None))
    view = store.get("model.a.weight")
    assert mapped_file_of(view.data_ptr()) == str(ckpt.resolve())
    assert_bitwise_equal(view, source["a.weight"])
    loader = OffloadedWeightsLoader(save_folder=str(folder))
    assert_bitwise_equal(loader["model.a.weight"], source["a.weight"])
    assert_bitwise_equal(loader["b.weight"], source["b.weight"])


def test_reference_entries_written_by_accelerate_without_shape(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float16).reshape(2, 3)}, ckpt)
    (tmp_path / "index.json").write_text(json.dumps(
        {"w": {"safetensors_file": str(ckpt), "weight_name": "w", "dtype": "float32"}}))
    store = DiskStore.open(tmp_path)
    assert store.meta("w") == TensorMeta(torch.float32, (2, 3))
    assert_bitwise_equal(store.get("w"), torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_interrupted_write_leaves_no_index_and_no_files(tmp_path: Path) -> None:
    tensors = sample_tensors()
    with pytest.raises(KeyboardInterrupt, match="the test's interrupt"):
        with StoreWriter(tmp_path) as store:
            store.put("model.ids", tensors["model.ids"])
            store.put("model.mask", tensors["model.mask"])
            raise KeyboardInterrupt("the test's interrupt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OffloadError, match="no offload store here .*index.json is missing"):
        DiskStore.open(tmp_path)


def test_enospc_raises_offload_error_and_removes_temp_files(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def full_disk(fd: int, data: object) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".dat.bigload-tmp") and len(data) > 1000:  # type: ignore[arg-type]
            real_write(fd, bytes(100))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(store_format.os, "write", full_disk)
    store = StoreWriter(tmp_path)
    store.put("small", torch.ones(4))
    with pytest.raises(OffloadError, match=r"no space left in .* writing 'big' \(4.00 KiB; .* free\)\. Free disk"):
        store.put("big", torch.ones(1024))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.dat"]
    assert "big" not in store
    store.abort()
    assert list(tmp_path.iterdir()) == []


def test_store_from_another_checkpoint_or_dtype_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2)}, ckpt)
    index = open_checkpoint(ckpt)
    built = StoreOrigin.of(index, torch.float16)
    write_store(tmp_path / "off", {"w": torch.ones(2).half()}, origin=built)
    assert DiskStore.open(tmp_path / "off", expect_fingerprint=StoreOrigin.of(index, torch.float16)).names == ("w",)
    wanted = StoreOrigin.of(index, torch.bfloat16)
    with pytest.raises(OffloadError, match=r"holds weights from .*dtype float16.*not from .*dtype bfloat16.*"
                                           r"Use another offload_folder, or delete"):
        DiskStore.open(tmp_path / "off", expect_fingerprint=wanted)
    with pytest.raises(OffloadError, match=r"what differs: the stored dtypes \(float16 then, bfloat16 now\)"):
        DiskStore.open(tmp_path / "off", expect_fingerprint=wanted)


def _two_shards(folder: Path) -> Path:
    """A sharded checkpoint: `a` in s1.safetensors, `b` in s2.safetensors."""
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "s1.safetensors")
    save_file({"b": torch.zeros(2)}, folder / "s2.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    return folder


def test_refusal_names_the_shards_when_another_part_of_the_checkpoint_was_stored(tmp_path: Path) -> None:
    """A pipeline rank whose split changed reads other shards of the same checkpoint, with the same dtype:
    the refusal used to read "holds weights from X (float32) ..., not from X (float32)"."""
    ckpt = _two_shards(tmp_path / "ckpt")
    stored = StoreOrigin.of(open_checkpoint(ckpt, select={"a"}.__contains__), torch.float32)
    write_store(tmp_path / "off", {"a": torch.ones(2)}, origin=stored)
    wanted = StoreOrigin.of(open_checkpoint(ckpt, select={"b"}.__contains__), torch.float32)
    assert (stored.source, stored.dtype) == (wanted.source, wanted.dtype)
    with pytest.raises(OffloadError, match=r"what differs: the checkpoint files read \(s1.safetensors then, "
                                           r"s2.safetensors now\)\. Use another offload_folder"):
        DiskStore.open(tmp_path / "off", expect_fingerprint=wanted)


def test_refusal_names_a_shard_rewritten_since_or_says_only_the_bytes_differ(tmp_path: Path) -> None:
    ckpt = _two_shards(tmp_path / "ckpt")
    stored = StoreOrigin.of(open_checkpoint(ckpt), None)
    write_store(tmp_path / "off", {"a": torch.ones(2)}, origin=stored)
    stat = (ckpt / "s2.safetensors").stat()
    save_file({"b": torch.zeros(3)}, ckpt / "s2.safetensors")
    with pytest.raises(OffloadError, match=r"what differs: s2.safetensors rewritten since \(size "
                                           rf"{stat.st_size} -> {stat.st_size + 4} bytes\)"):
        DiskStore.open(tmp_path / "off", expect_fingerprint=StoreOrigin.of(open_checkpoint(ckpt), None))
    save_file({"b": torch.ones(2)}, ckpt / "s2.safetensors")  # same size; `cp -p` would also keep the mtime
    os.utime(ckpt / "s2.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(OffloadError, match=r"what differs: the checkpoint's bytes \(its files' names, sizes and "
                                           r"mtimes are the same\)"):
        DiskStore.open(tmp_path / "off", expect_fingerprint=StoreOrigin.of(open_checkpoint(ckpt), None))


def test_refusal_of_a_folder_from_an_older_bigload_says_what_differs_is_unrecorded(tmp_path: Path) -> None:
    ckpt = _two_shards(tmp_path / "ckpt")
    write_store(tmp_path / "off", {"a": torch.ones(2)}, origin=StoreOrigin("old", str(ckpt.resolve())))
    with pytest.raises(OffloadError, match=r"what differs: unrecorded \(an older bigload wrote this folder\)"):
        DiskStore.open(tmp_path / "off", expect_fingerprint=StoreOrigin.of(open_checkpoint(ckpt), None))


def test_existing_store_needs_overwrite(tmp_path: Path) -> None:
    write_store(tmp_path, {"a": torch.ones(3)})
    with pytest.raises(OffloadError, match="already holds an offload store.*overwrite=True"):
        StoreWriter(tmp_path)
    store = StoreWriter(tmp_path, overwrite=True)
    assert not (tmp_path / "index.json").exists(), "the old index must not describe files being rewritten"
    store.put("b", torch.zeros(2))
    store.commit("fp2")
    assert DiskStore.open(tmp_path).names == ("b",)


def test_unwritable_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OffloadError, match="cannot write to the offload folder .*file/offload"):
        StoreWriter(blocker / "offload")


def test_damaged_store_is_reported(tmp_path: Path) -> None:
    write_store(tmp_path, {"a": torch.ones(16), "b": torch.ones(2)})
    (tmp_path / "a.dat").write_bytes(bytes(10))
    with pytest.raises(OffloadError, match=r"a.dat: the data of 'a' has 10 bytes, expected 64.*Delete"):
        DiskStore.open(tmp_path)
    (tmp_path / "a.dat").unlink()
    with pytest.raises(OffloadError, match="the data of 'a' is missing"):
        DiskStore.open(tmp_path)
    (tmp_path / "index.json").write_text("[1]")
    with pytest.raises(OffloadError, match="expected an object"):
        DiskStore.open(tmp_path)


def test_read_into_copies_into_a_preallocated_buffer(tmp_path: Path) -> None:
    tensors = sample_tensors()
    write_store(tmp_path, tensors)
    store = DiskStore.open(tmp_path)
    out = torch.empty(4, 6)
    assert store.read_into("model.layers.0.w", out) is out
    assert_bitwise_equal(out, tensors["model.layers.0.w"])
    with pytest.raises(OffloadError, match=r"cannot read 'model.ids' \(int64 \[5\]\) into a float32 \[4, 6\] buffer"):
        store.read_into("model.ids", out)


def test_bad_names_and_unknown_tensors(tmp_path: Path) -> None:
    store = StoreWriter(tmp_path)
    for bad in ("a/b", "", ".hidden"):
        with pytest.raises(OffloadError, match="cannot be a file name"):
            store.put(bad, torch.ones(1))
    store.put("a", torch.ones(1))
    store.commit("fp")
    with pytest.raises(OffloadError, match="the store is committed"):
        store.put("b", torch.ones(1))
    with pytest.raises(OffloadError, match="no tensor named 'zz' in the offload store"):
        DiskStore.open(tmp_path).get("zz")


def test_torch_refs_cannot_be_referenced(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "m.bin")
    ref = open_checkpoint(tmp_path / "m.bin").tensors["w"]
    with pytest.raises(OffloadError, match=r"not a plain safetensors tensor.*put\(name, tensor\)"):
        StoreWriter(tmp_path / "off").put_reference("w", ref)
