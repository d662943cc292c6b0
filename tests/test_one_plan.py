"""One plan, executed: each decision is made once, in the plan (or the inventory it was made from), and the
loader and the runtime follow it. One test per rule, each checking the executors against the plan.

- int4 byte order: the plan gives CPU-run blocks the CPU order even when a GPU is the main device (the bug the
  loader's own guess made: CUDA's order for CPU-placed blocks under the `local` policy);
- execution devices, slots, disk reads: the runtime takes them from the plan, for a given map too;
- quantization: decided once per load; a model quantized before with other settings is refused;
- the dtype rule: the bytes a GPU briefly holds while casting come from the inventory's decisions;
- tied weights split across devices: refused the same way by every entry point, before anything moves;
- buffers of offloaded blocks: where the plan keeps them (`offload_buffers`);
- re-registration: a Parameter keeps its class, gradient flag and attributes through every executor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bigload import dispatch_model, load_checkpoint_and_dispatch, load_checkpoint_in_model
from bigload.devices import CPU, Budget, Device
from bigload.empty import init_empty_weights
from bigload.errors import OffloadError, PlanError, QuantizationError
from bigload.formats.mapped import CheckpointReader
from bigload.integrations.dispatch import validate_device_map
from bigload.integrations.prepare import prepare_load, prepare_quantization, rule_for
from bigload.load.quantized import apply_layouts
from bigload.load.sources import read_source
from bigload.plan import PlanOptions, plan, plan_for_map
from bigload.plan.reserve import DiskReads
from bigload.quant import Layout, QuantLinear
from bigload.runtime import attach, detach, runtime_of
from fixtures_models import ThreeBlocks, TiedEnds
from planned import attach_map

transformers = pytest.importorskip("transformers")

from fixtures_hf import ARCHS, build_model, write_model  # noqa: E402

GiB = 2**30


def _empty_llama(folder: Path) -> nn.Module:
    config = transformers.AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The plain layout: column 2i in the high nibble, 2i+1 in the low one."""
    return torch.stack([packed >> 4, packed & 15], dim=2).reshape(packed.shape[0], -1).to(torch.int32)


# -- int4 byte order -------------------------------------------------------------------------------


def test_cpu_run_int4_blocks_get_the_cpu_byte_order_when_a_gpu_is_the_main_device(tmp_path: Path) -> None:
    """A GPU in the budget, the `local` policy at batch 1: blocks placed on the CPU run there, so their int4
    weights must be packed in the CPU kernel's order. The plan says so per block, the packer follows it, and
    the bytes are what torch's own CPU packer makes of the same codes."""
    folder = write_model(ARCHS["llama"], tmp_path / "llama", dtype=torch.bfloat16)
    model = _empty_llama(folder)
    options = PlanOptions(dtype=torch.bfloat16, policy="local", headroom=0)
    load = prepare_load(model, folder, options, quantize="int4:32")
    gpu = load.inventory.size("model.embed_tokens") + 3 * load.inventory.size("model.layers.0") // 2
    planned = plan(load.inventory, Budget.of({0: gpu, "cpu": GiB}), options)  # the embedding and one layer
    on_gpu = [p for p in planned.placements if p.device.is_gpu and p.int4_layout is not None]
    on_cpu = [p for p in planned.placements if p.device == CPU and p.int4_layout is not None]
    assert on_gpu and on_cpu, planned.device_map
    assert {p.execution_device for p in on_cpu} == {CPU} and {p.int4_layout for p in on_cpu} == {Layout.CPU}
    assert {p.int4_layout for p in on_gpu} == {Layout.NIBBLES}
    assert "packed in the CPU's byte order" in planned.explain()
    apply_layouts(model, planned)  # what the loader does before the first weight is read
    cpu_module = model.get_submodule(f"{on_cpu[0].name}.mlp.up_proj")
    gpu_module = model.get_submodule(f"{on_gpu[0].name}.mlp.up_proj")
    assert isinstance(cpu_module, QuantLinear) and cpu_module.layout is Layout.CPU
    assert isinstance(gpu_module, QuantLinear) and gpu_module.layout is Layout.NIBBLES
    # The bytes the packer builds for the CPU-run block are torch's own CPU packing of its codes.
    weight = load.table.tensors[f"{on_cpu[0].name}.mlp.up_proj.weight"]
    with CheckpointReader(load.table.index) as reader:
        cpu_bytes = read_source(reader, weight)
        cpu_module.layout = Layout.NIBBLES
        nibble_bytes = read_source(reader, weight)
    assert torch.equal(cpu_bytes, torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpack_nibbles(nibble_bytes), 1))
    assert not torch.equal(cpu_bytes, nibble_bytes)  # the orders differ: packing for the wrong device is wrong


def test_a_given_map_runs_cpu_blocks_where_the_policy_says_and_packs_them_so(tmp_path: Path) -> None:
    """accelerate-style dict maps get the same decision: with the GPU as main device, `local` runs cpu blocks
    on the CPU (CPU order, loadable and runnable here), `stream` on the GPU (CUDA order)."""
    folder = write_model(ARCHS["llama"], tmp_path / "llama", dtype=torch.bfloat16)
    model = _empty_llama(folder)
    options = PlanOptions(dtype=torch.bfloat16, main_device=0)
    load = prepare_load(model, folder, options, quantize="int4:32")
    for policy, layout in (("local", Layout.CPU), ("stream", Layout.NIBBLES)):
        planned = plan_for_map(load.inventory, {"": "cpu"}, Budget.of({}), options.with_settings(policy=policy))
        assert planned.placements[0].int4_layout is layout


# -- execution devices, slots, disk reads ------------------------------------------------------------


def _three() -> tuple[ThreeBlocks, ThreeBlocks]:
    torch.manual_seed(0)
    reference, model = ThreeBlocks(), ThreeBlocks()
    model.load_state_dict(reference.state_dict())
    return reference, model


def test_the_runtime_runs_each_block_where_the_plan_says_and_holds_its_slots(monkeypatch) -> None:
    # Toward a GPU without one: streams and events are stand-ins, buffers are not made (as in test_hooks).
    from bigload.runtime.prefetch import Prefetcher
    from planned import planned as make

    class Stream:  # what close() asks of a side stream
        def __init__(self, device: object) -> None:
            pass

        def synchronize(self) -> None:
            pass

    monkeypatch.setattr(Prefetcher, "_allocate_cuda_slots", lambda self: None)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", lambda **kwargs: object())
    for policy, offloaded in (("local", []), ("stream", ["first", "second", "third", ""])):
        _, model = _three()
        plan_ = make(model, {"first": "cpu", "second": "cpu", "third": "cpu", "": "cpu"}, execution_device="cuda:0",
                     policy=policy, offload_buffers=True)  # no buffer moves to a GPU there is not
        runtime = attach(model, plan_)
        assert {name: block.execution_device for name, block in runtime.blocks.items()} == \
            {name: device.torch_device() for name, device in plan_.execution_devices.items()}
        assert [name for name, block in runtime.blocks.items() if block.offloaded] == offloaded
        assert len(runtime.prefetcher.all_slots) == plan_.slots.count
        assert {(slot.nbytes, slot.staged) for slot in runtime.prefetcher.all_slots} <= \
            {(plan_.slots.nbytes, plan_.slots.staged)}
        detach(model)


def test_a_plan_whose_slots_are_too_small_is_refused_not_grown() -> None:
    _, model = _three()
    from planned import planned as make

    device_map = {"first": "disk", "second": "disk", "third": "disk", "": "cpu"}
    good = make(model, device_map, execution_device="cpu")
    small = dataclasses.replace(good, slots=dataclasses.replace(good.slots, nbytes=good.slots.nbytes - 1))
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    from bigload.runtime import HostWeights

    with pytest.raises(OffloadError, match=r"needs \d+ bytes in a slot but the plan's slots hold \d+.*Plan again"):
        attach(model, small, store=HostWeights(state))
    assert runtime_of(model) is None


@pytest.mark.parametrize("cpu, reads", [("1GiB", DiskReads.MAPPED), ("200KB", DiskReads.READ)])
def test_a_given_map_brings_disk_blocks_in_as_its_plan_decides(tmp_path: Path, cpu: str, reads: DiskReads) -> None:
    """A dict map with disk blocks: the plan decides mapped or read from the CPU memory left (`max_memory`),
    and the runtime reads its blocks that way."""
    folder = write_model(ARCHS["llama"], tmp_path / "llama")
    reference = build_model(ARCHS["llama"])
    model = _empty_llama(folder).float()
    layers = {f"model.layers.{i}": "disk" for i in range(reference.config.num_hidden_layers)}
    device_map = {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    load_checkpoint_and_dispatch(model, folder, device_map=device_map, offload_folder=tmp_path / "off",
                                 max_memory={"cpu": cpu}, dtype=torch.float32, progress=False)
    assert model.bigload_plan.slots.reads is reads and model.bigload_plan.strategy == "given"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    stats = runtime_of(model).stats()
    assert stats.disk_reads == reads.value
    assert {path.split(" ")[0] for path in stats.paths.values()} == {"read" if reads is DiskReads.READ else "mapped"}


# -- quantization -------------------------------------------------------------------------------------


def test_quantization_is_prepared_once_per_load(tmp_path: Path, monkeypatch) -> None:
    import bigload.integrations.prepare as prepare

    folder = write_model(ARCHS["llama"], tmp_path / "llama", dtype=torch.bfloat16)
    calls: list[str] = []
    real = prepare.quantize_model
    monkeypatch.setattr(prepare, "quantize_model", lambda *args: calls.append("swap") or real(*args))
    import bigload

    bigload.from_pretrained(folder, device_map={"": "cpu"}, quantize="int8", progress=False)
    assert calls == ["swap"]


def test_a_model_quantized_with_other_settings_is_refused(tmp_path: Path) -> None:
    folder = write_model(ARCHS["llama"], tmp_path / "llama", dtype=torch.bfloat16)
    model = _empty_llama(folder)
    rule = rule_for(model, PlanOptions(dtype=torch.bfloat16))
    prepare_quantization(model, "int8", ["model.layers.0"], rule=rule)
    prepare_quantization(model, "int8", ["model.layers.0"], rule=rule)  # the same settings: nothing to do
    with pytest.raises(QuantizationError, match=r"quantized already with another quantize_skip: \['model.layers.1"):
        prepare_quantization(model, "int8", ["model.layers.1"], rule=rule)
    with pytest.raises(QuantizationError, match=r"another quantize_skip: \['model.layers.0.* would be quantized now"):
        prepare_quantization(model, "int8", None, rule=rule)
    with pytest.raises(QuantizationError, match=r"quantized with int8 already"):
        prepare_quantization(model, "int4", ["model.layers.0"], rule=rule)


# -- the dtype rule ------------------------------------------------------------------------------------


def test_the_cast_a_gpu_holds_while_loading_follows_the_dtype_rule(tmp_path: Path) -> None:
    """Tensors kept in float32 (special dtypes, keep-in-fp32 modules) are not cast, so they never land on a GPU
    in another dtype: the largest cast is the largest tensor the rule casts."""
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    save_file(dict(source.state_dict()), tmp_path / "model.safetensors")
    with init_empty_weights():
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    cast = prepare_load(model, tmp_path, PlanOptions(dtype=torch.bfloat16)).inventory.cast_bytes
    assert cast == 64 * 64 * 4
    kept = prepare_load(model, tmp_path, PlanOptions(dtype=torch.bfloat16,
                                                     special_dtypes={"0.weight": torch.float32}))
    assert kept.inventory.cast_bytes == 64 * 8 * 4 and kept.inventory.dtype_of("0.weight") == torch.float32
    by_module = prepare_load(model, tmp_path, PlanOptions(dtype=torch.bfloat16, keep_in_fp32_modules=["0"]))
    assert by_module.inventory.cast_bytes == 64 * 8 * 4


# -- tied weights split across devices -----------------------------------------------------------------


def test_every_entry_point_refuses_a_split_tie_the_same_way_before_anything_moves(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in TiedEnds().state_dict().items() if k != "head.weight"},
              tmp_path / "model.safetensors")
    split = {"embed": "cpu", "body": "cpu", "head": "disk"}
    message = r"tied weights would be split across devices \(embed.weight on cpu, head.weight on disk\)"

    def empty() -> nn.Module:
        with init_empty_weights():
            return TiedEnds()

    calls = [
        lambda: load_checkpoint_and_dispatch(empty(), tmp_path, device_map=split, offload_folder=tmp_path / "off"),
        lambda: load_checkpoint_in_model(empty(), tmp_path, split, offload_folder=tmp_path / "off"),
        lambda: dispatch_model(TiedEnds(), split, offload_dir=tmp_path / "off"),
        lambda: validate_device_map(TiedEnds(), split),
        lambda: attach_map(TiedEnds(), split, execution_device="cpu"),
    ]
    for call in calls:
        with pytest.raises(PlanError, match=message):
            call()
    assert not (tmp_path / "off").exists()


# -- buffers of offloaded blocks ---------------------------------------------------------------------


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_buffers_of_offloaded_blocks_live_where_the_plan_keeps_them(tmp_path: Path, offload_buffers: bool) -> None:
    reference, model = _three()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "model.safetensors")
    with init_empty_weights(include_buffers=True):
        empty = ThreeBlocks()
    load_checkpoint_and_dispatch(empty, tmp_path, device_map={"": "disk"}, offload_folder=tmp_path / "off",
                                 offload_buffers=offload_buffers, progress=False)
    planned = empty.bigload_plan
    assert planned.offload_buffers is offload_buffers
    assert planned.home_of("scale", buffer=True) == (Device.parse("disk") if offload_buffers else CPU)
    assert (empty.scale.device.type == "meta") is offload_buffers
    stats = runtime_of(empty).stats()
    assert stats.resident_buffer_bytes == (0 if offload_buffers else reference.scale.numel() * 4)
    assert stats.reserve_bytes + stats.resident_buffer_bytes == planned.usage_of(CPU).reserve
    assert ("scale" in empty.bigload_load.store) is offload_buffers
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(empty(x), reference(x), rtol=0, atol=0)


# -- re-registration ----------------------------------------------------------------------------------


class Tagged(nn.Parameter):
    """A Parameter subclass with an attribute of its own, as libraries add (transformers' `_is_hf_initialized`)."""


def test_parameters_keep_their_class_gradient_flag_and_attributes_through_every_executor(tmp_path: Path) -> None:
    reference, _ = _three()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "model.safetensors")

    def tagged() -> nn.Module:
        with init_empty_weights():
            model = ThreeBlocks()
        model.first.weight = Tagged(model.first.weight.data, requires_grad=False)
        model.first.weight.note = "kept"
        return model

    seen: list[tuple[type, bool, str]] = []

    def look(module: nn.Module, args: tuple) -> None:
        seen.append((type(module.weight), module.weight.requires_grad, getattr(module.weight, "note", "")))

    loaded = tagged()
    load_checkpoint_in_model(loaded, tmp_path)  # the loader
    assert (type(loaded.first.weight), loaded.first.weight.requires_grad, loaded.first.weight.note) == \
        (Tagged, False, "kept")
    offloaded = tagged()
    load_checkpoint_and_dispatch(offloaded, tmp_path, device_map={"first": "disk", "": "cpu"},
                                 offload_folder=tmp_path / "off", progress=False)  # the runtime installs it
    offloaded.first.register_forward_pre_hook(look)
    with torch.no_grad():
        offloaded(torch.randn(2, 8))
    assert seen == [(Tagged, False, "kept")]
    detach(offloaded)
    assert (type(offloaded.first.weight), offloaded.first.weight.note) == (Tagged, "kept")


class TiedHeadWithBias(nn.Module):
    """The head shares the embedding's weight and has a bias of its own: offloaded apart, its slot holds both."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(ids))))


def test_a_slot_holds_the_tied_tensors_a_block_brings_in_under_another_name() -> None:
    """The inventory counts a tied tensor once, at its first name; a block that uses it under another name
    still brings it into its slot, and the plan sizes the slots with it (the runtime never grows one)."""
    torch.manual_seed(0)
    reference = TiedHeadWithBias()
    model = TiedHeadWithBias()
    model.load_state_dict(reference.state_dict())
    from bigload.runtime import HostWeights
    from planned import planned as make

    result = make(model, {"embed": "disk", "body": "disk", "head": "disk"}, execution_device="cpu")
    head_needs = 16 * 8 * 4 + 16 * 4  # the tied weight and its own bias
    assert result.slots.nbytes == max(head_needs, 8 * 8 * 4 + 8 * 4)
    state = {name: tensor.detach().clone() for name, tensor in reference.state_dict().items()}
    runtime = attach(model, result, store=HostWeights(state))
    assert runtime.blocks["head"].slot_bytes == head_needs
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=0)
    assert runtime.stats().reserve_bytes == result.slots.total
