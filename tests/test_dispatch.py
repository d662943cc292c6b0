"""dispatch_model, cpu_offload, disk_offload and device-map validation (before any byte is read)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bigload.integrations.dispatch import cpu_offload, disk_offload, dispatch_model, remove_hook_from_submodules, validate_device_map
from bigload.integrations.loading import load_checkpoint_and_dispatch
from bigload.errors import DeviceError, OffloadError, PlanError
from bigload.runtime import runtime_of
from fixtures_models import HasPreloaded, ThreeBlocks, TiedEnds, WithBufferBlock


def _pair(cls: type[nn.Module], seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    reference = cls().eval()
    model = cls().eval()
    model.load_state_dict(reference.state_dict())
    return reference, model


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- validation -------------------------------------------------------------------------------------


def test_split_tied_group_is_refused_before_anything_is_written(tmp_path):
    reference, model = _pair(TiedEnds)
    folder = tmp_path / "offload"
    with pytest.raises(PlanError, match=r"tied weights would be split.*embed.weight on cpu.*head.weight on disk"):
        dispatch_model(model, {"embed": "cpu", "body": "cpu", "head": "disk"}, offload_dir=folder)
    assert not folder.exists()
    assert _no_hooks(model) and not hasattr(model, "hf_device_map")


def test_tied_groups_given_by_name_are_checked_too():
    reference, model = _pair(ThreeBlocks)
    with pytest.raises(PlanError, match="tied weights"):
        validate_device_map(model, {"first": "cpu", "second": "cpu", "third": "disk", "": "cpu"},
                            gpu_count=0, tied_groups=[("first.weight", "third.weight")])


def test_map_missing_a_module_is_refused():
    reference, model = _pair(ThreeBlocks)
    with pytest.raises(PlanError, match=r"places no module holding .*'third.weight'.*add their modules"):
        dispatch_model(model, {"first": "cpu", "second": "cpu"})


def test_map_naming_a_gpu_that_does_not_exist_is_refused(tmp_path):
    reference, model = _pair(ThreeBlocks)
    missing = torch.cuda.device_count()  # one past the last GPU: no GPU on a CPU-only machine
    with pytest.raises(DeviceError, match=rf"cuda:{missing} does not exist on this machine"):
        dispatch_model(model, {"first": missing, "second": "cpu", "third": "disk", "": "cpu"},
                       offload_dir=tmp_path / "offload")
    assert not (tmp_path / "offload").exists()
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_map_key_naming_no_module_is_refused():
    reference, model = _pair(ThreeBlocks)
    with pytest.raises(PlanError, match="'fourth' names no module of ThreeBlocks"):
        validate_device_map(model, {"fourth": "cpu", "": "cpu"}, gpu_count=0)


def test_unknown_device_value_is_refused():
    reference, model = _pair(ThreeBlocks)
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        validate_device_map(model, {"": "gpu0"}, gpu_count=0)


def test_disk_map_without_offload_dir_is_refused():
    reference, model = _pair(ThreeBlocks)
    with pytest.raises(OffloadError, match="no offload_dir was given"):
        dispatch_model(model, {"first": "cpu", "second": "disk", "third": "cpu", "": "cpu"})


# -- dispatch_model ---------------------------------------------------------------------------------


def test_dispatch_model_writes_disk_blocks_in_accelerates_layout_and_runs(tmp_path):
    reference, model = _pair(ThreeBlocks)
    device_map = {"first": "cpu", "second": "disk", "third": "cpu", "": "cpu"}
    dispatch_model(model, device_map, offload_dir=tmp_path)
    assert model.hf_device_map == device_map
    index = json.loads((tmp_path / "index.json").read_text())
    assert set(index) == {"second.0.weight", "second.0.bias", "second.2.weight", "second.2.bias"}
    assert index["second.0.weight"] == {"dtype": "float32", "shape": [32, 16]}
    assert all(p.device.type == "meta" for p in model.second.parameters())
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_remove_hook_from_submodules_gives_back_a_plain_model(tmp_path):
    reference, model = _pair(ThreeBlocks)
    dispatch_model(model, {"first": "disk", "second": "disk", "third": "cpu", "": "cpu"}, offload_dir=tmp_path)
    plain = remove_hook_from_submodules(model)
    assert plain is model and runtime_of(model) is None and _no_hooks(model)
    assert not hasattr(model, "hf_device_map")
    assert all(p.device.type == "cpu" for p in model.parameters())
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_single_device_map_needs_no_hooks():
    reference, model = _pair(ThreeBlocks)
    dispatch_model(model, {"": "cpu"})
    assert _no_hooks(model) and model.hf_device_map == {"": "cpu"}
    dispatch_model(model, {"": "cpu"}, force_hooks=True)
    assert runtime_of(model) is not None


def test_dispatch_reads_a_folder_accelerate_wrote(tmp_path):
    from accelerate.utils import offload_state_dict

    reference, model = _pair(ThreeBlocks)
    state = {k: v for k, v in reference.state_dict().items() if k.startswith("second.")}
    offload_state_dict(str(tmp_path), state)
    for name in state:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = nn.Parameter(module._parameters[attr].to("meta"))
    dispatch_model(model, {"first": "cpu", "second": "disk", "third": "cpu", "": "cpu"}, offload_dir=tmp_path,
                   offload_index=json.loads((tmp_path / "index.json").read_text()))
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


# -- cpu_offload / disk_offload ---------------------------------------------------------------------


def test_cpu_offload_with_a_state_dict_for_a_meta_model():
    reference, _ = _pair(ThreeBlocks)
    with torch.device("meta"):
        model = ThreeBlocks()
    model.register_buffer("scale", torch.tensor(2.0))
    cpu_offload(model, execution_device="cpu", state_dict=reference.state_dict())
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_disk_offload_hooks_every_module_with_weights(tmp_path):
    reference, model = _pair(ThreeBlocks)
    disk_offload(model, tmp_path, execution_device="cpu")
    runtime = runtime_of(model)
    assert [name for name, block in runtime.blocks.items() if block.offloaded] == [
        "first", "second.0", "second.2", "third"]
    assert model.scale.device.type == "cpu"  # a buffer, not offloaded by default
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    stats = runtime.stats()
    largest = max(block.slot_bytes for block in runtime.blocks.values())
    assert stats.reserve_bytes == 2 * largest and stats.peak_bytes_held <= stats.reserve_bytes


def test_disk_offload_reuses_a_folder_holding_the_weights(tmp_path):
    reference, model = _pair(ThreeBlocks)
    disk_offload(model, tmp_path, execution_device="cpu")
    remove_hook_from_submodules(model)
    with torch.device("meta"):
        fresh = ThreeBlocks()
    fresh.register_buffer("scale", torch.tensor(2.0))
    disk_offload(fresh, tmp_path, execution_device="cpu")
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_disk_offload_buffers(tmp_path, offload_buffers):
    reference, model = _pair(WithBufferBlock)
    disk_offload(model, tmp_path, execution_device="cpu", offload_buffers=offload_buffers)
    assert (model.norm.shift.device.type == "meta") is offload_buffers
    assert ("norm.shift" in json.loads((tmp_path / "index.json").read_text())) is offload_buffers
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_preload_module_classes_loads_a_module_with_its_children(tmp_path):
    reference, model = _pair(HasPreloaded)
    x = torch.randn(2, 4)
    # Without it, UsesChildWeight reads proj.weight without calling proj: the weight is not there, and the
    # error names it (torch's own would be "Tensor on device meta is not on the expected device cpu!").
    disk_offload(model, tmp_path / "plain", execution_device="cpu")
    with pytest.raises(OffloadError, match=r"'inner.proj.(weight|bias)' is offloaded by bigload \(on disk in .*plain\)"):
        with torch.no_grad():
            model(x)
    remove_hook_from_submodules(model)
    disk_offload(model, tmp_path / "preload", execution_device="cpu", preload_module_classes=["UsesChildWeight"])
    assert [name for name, b in runtime_of(model).blocks.items() if b.offloaded] == ["inner", "out"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_offloaded_placeholders_name_themselves_when_read_outside_the_forward(tmp_path):
    import io

    from fixtures_models import empty_llama, llama_map, reference_llama, save_sharded

    reference = reference_llama()
    model = load_checkpoint_and_dispatch(empty_llama(), save_sharded(reference, tmp_path / "ckpt"),
                                         device_map=llama_map([1, 2]), offload_folder=tmp_path / "off")
    weight = model.model.layers[1].mlp.up_proj.weight
    assert isinstance(weight, torch.nn.Parameter) and weight.device.type == "meta"
    assert repr(weight).startswith("OffloadedParameter('model.layers.1.mlp.up_proj.weight', size=(128, 64)")
    state = model.state_dict()  # meta for offloaded weights, as accelerate's
    assert state["model.layers.1.mlp.up_proj.weight"].device.type == "meta"
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], reference.state_dict()["model.layers.0.mlp.up_proj.weight"])
    message = r"'model.layers.1.mlp.up_proj.weight' is offloaded by bigload \(on disk in .*off\)"
    with pytest.raises(OffloadError, match=message):
        state["model.layers.1.mlp.up_proj.weight"].cpu()  # torch: "Cannot copy out of meta tensor"
    assert repr(state["model.layers.1.mlp.up_proj.weight"].T).startswith("OffloadedBuffer('model.layers.1.mlp")
    with pytest.raises(OffloadError, match=r"'model.layers.1.self_attn.q_proj.weight' is offloaded"):
        torch.save(state, io.BytesIO())  # torch would save the meta tensors, no data, silently
    torch.testing.assert_close(model(torch.tensor([[3, 5, 7]])).logits, reference(torch.tensor([[3, 5, 7]])).logits,
                               rtol=0, atol=1e-5)


def test_a_placing_hook_bigload_cannot_take_off_is_refused_with_the_fix(tmp_path):
    from types import SimpleNamespace

    from fixtures_models import empty_llama, llama_map, reference_llama, save_sharded

    model = load_checkpoint_and_dispatch(empty_llama(), save_sharded(reference_llama(), tmp_path / "ckpt"),
                                         device_map=llama_map([1]), offload_folder=tmp_path / "off")
    model.model.layers[1].mlp._hf_hook = SimpleNamespace(offload=True)  # another runtime's, no detach_hook
    runtime_of(model).changed = True  # as a state-dict load or a registration leaves it
    with pytest.raises(OffloadError, match=r"hooks of another library were put on model.layers.1.mlp after.*"
                                           r"device_map=\{'': DEVICE\}"):
        model(torch.tensor([[3, 5, 7]]))


# -- load_checkpoint_and_dispatch: bad maps fail before any byte is read ---------------------------


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory) -> Path:
    from fixtures_models import reference_llama, save_sharded

    return save_sharded(reference_llama(tie=True), tmp_path_factory.mktemp("tied"))


def _good_map() -> dict[str, int | str]:
    from fixtures_models import llama_map

    return llama_map([1, 2])


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"lm_head": "disk"}, PlanError, "tied weights would be split"),
        ({"model.layers.3": None}, PlanError, r"places no module holding .*model\.layers\.3\."),
        ({"model.layers.0": torch.cuda.device_count()}, DeviceError, "does not exist on this machine"),
        ({"model.layers.9": "cpu"}, PlanError, "'model.layers.9' names no module"),
    ],
    ids=["split_tied_group", "missing_module", "nonexistent_gpu", "unknown_module"],
)
def test_bad_map_fails_before_any_byte_is_read(tied_checkpoint, tmp_path, monkeypatch, change, error, match):
    from bigload.formats.mapped import CheckpointReader
    from bigload.integrations.loading import load_checkpoint_and_dispatch
    from fixtures_models import empty_llama

    reads: list[str] = []
    real_read = CheckpointReader.read

    def spy(self, ref):
        reads.append(ref.name)
        return real_read(self, ref)

    monkeypatch.setattr(CheckpointReader, "read", spy)
    device_map = _good_map()
    for key, value in change.items():
        if value is None:
            del device_map[key]
        else:
            device_map[key] = value
    model = empty_llama(tie=True)
    offload = tmp_path / "offload"
    with pytest.raises(error, match=match):
        load_checkpoint_and_dispatch(model, tied_checkpoint, device_map=device_map, offload_folder=offload)
    assert reads == []
    assert not offload.exists()
    assert all(p.device.type == "meta" for p in model.parameters())
    # The spy is live: the good map does read.
    load_checkpoint_and_dispatch(model, tied_checkpoint, device_map=_good_map(), offload_folder=offload)
    assert reads and (offload / "index.json").is_file()


def test_disk_offload_on_cpu_runs_on_memory_mapped_views_without_copying(tmp_path):
    from bigload.load.store import DiskStore

    reference, model = _pair(ThreeBlocks)
    disk_offload(model, tmp_path, execution_device="cpu")
    store = runtime_of(model).blocks["second.2"].entries[0].source
    assert isinstance(store, DiskStore)
    seen: dict[str, int] = {}

    def record(module: nn.Module, args: tuple) -> None:
        seen["ptr"] = module.weight.data_ptr()

    model.second[2].register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.randn(1, 8))
    # The very bytes of the store's memory-mapped file: no copy into private memory.
    assert seen["ptr"] == store.get("second.2.weight").data_ptr()
    assert runtime_of(model).stats().buffers == 0


@pytest.mark.parametrize("materialize", [False, True])
def test_materialize_copies_cpu_weights_out_of_the_checkpoint_files(tied_checkpoint, tmp_path, materialize):
    from bigload.integrations.loading import load_checkpoint_and_dispatch
    from fixtures_ckpt import mapped_file_of
    from fixtures_models import empty_llama

    model = load_checkpoint_and_dispatch(empty_llama(tie=True), tied_checkpoint, device_map=_good_map(),
                                         offload_folder=tmp_path / "offload", materialize=materialize)
    cpu_weights = [p for p in model.parameters() if p.device.type == "cpu"]
    assert cpu_weights
    backing = {mapped_file_of(p.data_ptr()) for p in cpu_weights}
    from_checkpoint = {b for b in backing if b is not None and b.endswith(".safetensors")}
    assert bool(from_checkpoint) is not materialize
