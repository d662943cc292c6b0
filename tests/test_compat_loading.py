"""accelerate's loading and dispatching names, run side by side with accelerate 1.15.

The same checkpoint is loaded into two models built on meta, one by accelerate and one by bigload, with the
same device map and arguments; every tensor must end on the same device with the same dtype and bytes, the
offloaded tensors must read back the same (accelerate's own reader reads bigload's offload folder), and the
warnings must be the same. Where bigload differs on purpose (`docs/accelerate.md`) the test
says how.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

accelerate = pytest.importorskip("accelerate")
from accelerate.utils.offload import OffloadedWeightsLoader  # noqa: E402

import bigload  # noqa: E402
from bigload.errors import CheckpointError  # noqa: E402


PT = {"format": "pt"}  # accelerate refuses safetensors files without it


class Net(nn.Module):
    """An embedding tied to the head, and a BatchNorm (buffers) between two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(ids))))


@pytest.fixture(scope="module")
def reference() -> Net:
    torch.manual_seed(0)
    model = Net()
    batchnorm = model.body[1]
    batchnorm.running_mean.normal_()
    batchnorm.running_var.uniform_(0.5, 2.0)
    batchnorm.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(reference: Net, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_model(reference, str(path), metadata=PT)  # tied weights saved once
    return path


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def offloaded(folder: Path) -> dict[str, torch.Tensor]:
    """What accelerate's own reader finds in an offload folder (accelerate's or bigload's)."""
    if not (folder / "index.json").exists():
        return {}
    loader = OffloadedWeightsLoader(save_folder=str(folder))
    return {name: loader[name] for name in loader.keys()}


def messages(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(logger) and r.levelno >= logging.WARNING]


def load_both(checkpoint: Path | str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
              **kwargs: Any) -> tuple[Net, Net, dict, dict, list[str], list[str]]:
    # Both built by bigload: accelerate's init_empty_weights unties the head from the embedding (tested below).
    with bigload.init_empty_weights():
        theirs, ours = Net(), Net()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        accelerate.load_checkpoint_in_model(theirs, str(checkpoint), offload_folder=str(tmp_path / "acc"), **kwargs)
        bigload.load_checkpoint_in_model(ours, str(checkpoint), offload_folder=str(tmp_path / "big"), **kwargs)
    return (theirs, ours, offloaded(tmp_path / "acc"), offloaded(tmp_path / "big"),
            messages(caplog, "accelerate"), messages(caplog, "bigload"))


def assert_same_load(theirs: nn.Module, ours: nn.Module, their_disk: dict, our_disk: dict,
                     skip: frozenset[str] = frozenset()) -> None:
    mine, other = tensors(ours), tensors(theirs)
    assert mine.keys() == other.keys()
    for name in mine.keys() - skip:
        assert (mine[name].device, mine[name].dtype) == (other[name].device, other[name].dtype), name
        if mine[name].device.type != "meta":
            assert torch.equal(mine[name], other[name]), name
    assert our_disk.keys() == their_disk.keys()
    for name, tensor in our_disk.items():
        # accelerate writes the tensor as read and casts when it runs; bigload writes it cast.
        assert torch.equal(tensor, their_disk[name].to(tensor.dtype)), name
        assert tensor.dtype == mine[name].dtype, name


DISK_BODY = {"embed": "cpu", "body": "disk", "head": "cpu"}
DISK_SPLIT = {"embed": "cpu", "body.0": "cpu", "body.1": "disk", "body.2": "disk", "head": "cpu"}


@pytest.mark.parametrize("device_map", [{"": "cpu"}, {"embed": "cpu", "body": "cpu", "head": "cpu"}])
@pytest.mark.parametrize("dtype", [None, torch.float16, "bfloat16"])
def test_cpu_loads_are_identical(checkpoint, tmp_path, caplog, device_map, dtype, reference):
    theirs, ours, their_disk, our_disk, their_msgs, our_msgs = load_both(
        checkpoint, tmp_path, caplog, device_map=device_map, dtype=dtype)
    assert_same_load(theirs, ours, their_disk, our_disk)
    assert our_msgs == their_msgs == []
    assert ours.head.weight is ours.embed.weight


def test_without_a_device_map_dtype_is_applied_where_accelerate_ignores_it(checkpoint, tmp_path, caplog):
    theirs, ours, their_disk, our_disk, _, _ = load_both(checkpoint, tmp_path, caplog, dtype=torch.float16)
    assert {t.dtype for n, t in tensors(theirs).items() if "num_batches" not in n} == {torch.float32}
    assert {t.dtype for n, t in tensors(ours).items() if "num_batches" not in n} == {torch.float16}
    for name, tensor in tensors(ours).items():
        assert torch.equal(tensor, tensors(theirs)[name].to(tensor.dtype)), name


def test_init_empty_weights_keeps_weights_tied_where_accelerate_unties_them():
    with accelerate.init_empty_weights():
        theirs = Net()
    with bigload.init_empty_weights():
        ours = Net()
    assert ours.head.weight is ours.embed.weight and theirs.head.weight is not theirs.embed.weight
    for library in (accelerate, bigload):
        with library.init_on_device("meta", include_buffers=None):
            model = Net()
        assert model.embed.weight.device.type == "meta" and model.body[1].running_mean.device.type == "cpu"


@pytest.mark.parametrize("device_map", [DISK_BODY, DISK_SPLIT])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_disk_loads_are_identical_with_offload_buffers(checkpoint, tmp_path, caplog, device_map, dtype):
    loaded = load_both(checkpoint, tmp_path, caplog, device_map=device_map, dtype=dtype, offload_buffers=True)
    assert_same_load(*loaded[:4])
    assert loaded[4] == loaded[5] == []
    assert "body.1.running_mean" in loaded[3]


@pytest.mark.parametrize("device_map", [DISK_BODY, DISK_SPLIT])
def test_disk_module_buffers_are_loaded_where_accelerate_leaves_them_unloaded(checkpoint, tmp_path, caplog,
                                                                             device_map, reference):
    theirs, ours, their_disk, our_disk, _, _ = load_both(checkpoint, tmp_path, caplog, device_map=device_map)
    buffers = frozenset(f"body.1.{name}" for name in ("running_mean", "running_var", "num_batches_tracked"))
    assert_same_load(theirs, ours, their_disk, our_disk, skip=buffers)
    for name in buffers:
        mine, other = tensors(ours)[name], tensors(theirs)[name]
        assert mine.device == other.device == torch.device("cpu")
        assert torch.equal(mine, tensors(reference)[name])  # the checkpoint's running statistics
        assert not torch.equal(other, tensors(reference)[name])  # accelerate keeps the values of __init__


def test_unexpected_tensors_are_skipped_with_accelerates_warning(reference, tmp_path, caplog):
    state = {k: v for k, v in reference.state_dict().items() if k != "head.weight"}
    state["extra.weight"] = torch.ones(3)
    path = tmp_path / "model.safetensors"
    save_file(state, path, metadata=PT)
    theirs, ours, their_disk, our_disk, their_msgs, our_msgs = load_both(path, tmp_path, caplog, device_map=DISK_BODY)
    assert_same_load(theirs, ours, their_disk, our_disk, skip=frozenset(n for n in tensors(ours) if ".1." in n))
    assert our_msgs == their_msgs and "{'extra.weight'}" in our_msgs[0]
    with pytest.raises(CheckpointError, match=r"1 unexpected: extra\.weight"):
        bigload.load_checkpoint_in_model(Net().to("meta"), str(path), strict=True)


def test_missing_tensors_are_named_where_accelerate_is_silent(reference, tmp_path, caplog):
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith(("head", "body.2"))}
    path = tmp_path / "model.safetensors"
    save_file(state, path, metadata=PT)
    theirs, ours, their_disk, our_disk, their_msgs, our_msgs = load_both(path, tmp_path, caplog)
    assert_same_load(theirs, ours, their_disk, our_disk)
    assert tensors(ours)["body.2.weight"].device.type == "meta"
    assert their_msgs == [] and len(our_msgs) == 1 and "body.2.weight, body.2.bias" in our_msgs[0]


def test_mismatched_shapes_fail_in_both(reference, tmp_path):
    state = {k: v for k, v in reference.state_dict().items() if k != "head.weight"}
    state["body.0.bias"] = torch.ones(5)
    path = tmp_path / "model.safetensors"
    save_file(state, path, metadata=PT)
    with pytest.raises(ValueError, match="shape"):
        accelerate.load_checkpoint_in_model(Net().to("meta"), str(path), device_map={"": "cpu"})
    with pytest.raises(CheckpointError, match=r"body\.0\.bias \(checkpoint \[5\], model \[8\]\)"):
        bigload.load_checkpoint_in_model(Net().to("meta"), str(path))


@pytest.mark.parametrize("nested", [False, True])
def test_flat_index_under_any_name(reference, tmp_path, caplog, nested):
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "head.weight"}
    names = sorted(state)
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({k: state[k] for k in names[:4]}, folder / "a.safetensors", metadata=PT)
    save_file({k: state[k] for k in names[4:]}, folder / "b.safetensors", metadata=PT)
    weight_map = {k: "a.safetensors" if i < 4 else "b.safetensors" for i, k in enumerate(names)}
    (folder / "weight_map.index.json").write_text(json.dumps({"weight_map": weight_map} if nested else weight_map))
    for where in (folder, folder / "weight_map.index.json"):
        # Offload folders beside the checkpoint's, never inside it (refused: `bigload.load.folder`).
        loaded = load_both(where, tmp_path / "offload" / where.name, caplog, device_map=DISK_SPLIT,
                           offload_buffers=True)
        assert_same_load(*loaded[:4])
        assert loaded[4] == loaded[5] == []


def test_unsupported_bitsandbytes_offload_is_refused():
    with pytest.raises(bigload.OffloadError, match="offload_8bit_bnb"):
        bigload.load_checkpoint_in_model(Net().to("meta"), "unused", offload_8bit_bnb=True)


# --------------------------------------------------------------------------------------------------
# Dispatching: the same outputs as accelerate's dispatched model


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]).view(-1))


@pytest.mark.parametrize("device_map", [DISK_BODY, DISK_SPLIT, {"": "cpu"}])
@pytest.mark.parametrize("offload_buffers", [False, True])
def test_load_checkpoint_and_dispatch_runs_like_accelerate(checkpoint, tmp_path, reference, device_map,
                                                           offload_buffers):
    outputs = {}
    for name, library in (("accelerate", accelerate), ("bigload", bigload)):
        with bigload.init_empty_weights():  # accelerate's would untie the head (tested above)
            model = Net().eval()
        model = library.load_checkpoint_and_dispatch(model, str(checkpoint), device_map=device_map,
                                                     offload_folder=str(tmp_path / name),
                                                     offload_buffers=offload_buffers)
        assert model.hf_device_map == device_map
        outputs[name] = run(model)
    torch.testing.assert_close(outputs["bigload"], run(reference))
    # accelerate leaves the BatchNorm statistics of a disk module unloaded unless offload_buffers=True.
    if offload_buffers or device_map == {"": "cpu"}:
        torch.testing.assert_close(outputs["bigload"], outputs["accelerate"])


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "dispatch_model"])
def test_offload_entry_points_run_like_accelerate(reference, tmp_path, how):
    outputs = {}
    for name, library in (("accelerate", accelerate), ("bigload", bigload)):
        model = Net().eval()
        model.load_state_dict(reference.state_dict())
        if how == "cpu_offload":
            model = library.cpu_offload(model, execution_device="cpu", offload_buffers=True)
        elif how == "disk_offload":
            model = library.disk_offload(model, str(tmp_path / name), execution_device="cpu", offload_buffers=True)
        else:
            model = library.dispatch_model(model, DISK_SPLIT, main_device="cpu", offload_dir=str(tmp_path / name),
                                           offload_buffers=True)
        outputs[name] = run(model)
    torch.testing.assert_close(outputs["bigload"], outputs["accelerate"])
    torch.testing.assert_close(outputs["bigload"], run(reference))
    if how != "cpu_offload":
        ours, theirs = offloaded(tmp_path / "bigload"), offloaded(tmp_path / "accelerate")
        # The same tensors go to disk; disk_offload in accelerate writes a tied tensor under each of its names.
        assert theirs.keys() - ours.keys() == ({"head.weight"} if how == "disk_offload" else set())
        assert all(torch.equal(tensor, theirs[name]) for name, tensor in ours.items())
