"""Each decision is made once and the executors follow it: what the plan charges is what is placed and held.

- dtype: the inventory decides every tensor's dtype; the bytes the plan puts on each device are the bytes
  the loader places there (T5's fp32 `wo` at float16, a bf16 -> fp16 cast, special dtypes, float8, integer
  and complex buffers);
- reserve: the runtime's slots are the plan's (count and size), so what it holds never exceeds the plan's
  reserve, also for an offloaded split module with buffers whose children are offloaded entries too;
- policy: one `ExecutionPolicy`, accepted as a value or its name by `plan`, `load_checkpoint_and_dispatch`,
  `from_pretrained` and the CLI, and honoured with a strategy string.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bigload import load_checkpoint_and_dispatch
from bigload.devices import Device
from bigload.empty import init_empty_weights
from bigload.errors import PlanError
from bigload.devices import ExecutionPolicy
from bigload.runtime import detach, runtime_of
from bigload.plan.reserve import slot_bytes
from bigload.load.store import DiskStore
from timeouts import with_timeout

transformers = pytest.importorskip("transformers")

from fixtures_hf import ARCHS, build_model, write_model  # noqa: E402


def _owner(name: str, keys: list[str]) -> str:
    best = max((k for k in keys if k == "" or name == k or name.startswith(k + ".")), key=len)
    return best


def placed_bytes(model: nn.Module) -> dict[Device, int]:
    """Bytes of every distinct tensor of a dispatched model, by the device its map entry names.

    Offloaded tensors are meta placeholders in the dtype they were stored in (checked against the store).
    """
    keys = list(model.hf_device_map)
    out: dict[Device, int] = {}
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        device = Device.parse(model.hf_device_map[_owner(name, keys)])
        out[device] = out.get(device, 0) + tensor.numel() * tensor.element_size()
    return out


def planned_bytes(model: nn.Module) -> dict[Device, int]:
    return {device: nbytes for device, nbytes in model.bigload_plan.weight_bytes_by_device().items() if nbytes}


def _store_dtypes_match(model: nn.Module, folder: Path) -> None:
    runtime = runtime_of(model)
    assert runtime is not None
    store = DiskStore.open(folder)
    for block in runtime.blocks.values():
        for entry in block.entries:
            if entry.source is not None and isinstance(entry.source, DiskStore):
                assert store.meta(entry.key).dtype == entry.dtype, entry.key


def _save(model: nn.Module, folder: Path, convert=lambda name, t: t) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: convert(name, t.detach().contiguous()) for name, t in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return folder


def dispatch_split(build, folder: Path, offload: Path, wanted=None, **kwargs) -> nn.Module:
    """`load_checkpoint_and_dispatch` with the smallest CPU budget whose plan keeps some blocks on the CPU
    and sends the others to disk (and satisfies `wanted(plan)`); budgets are tried on dry runs first."""
    from bigload.integrations.loading import plan_for_model

    planning = {key: value for key, value in kwargs.items() if key in ("dtype", "prefetch", "special_dtypes")}
    model = build()
    for cpu in range(300, 400_000, 64):
        budget = {"cpu": cpu, "disk": "1GiB"}
        try:
            planned = plan_for_model(model, "sequential", max_memory=budget, **planning)
        except PlanError:
            continue
        if set(planned.device_map.values()) == {"cpu", "disk"} and (wanted is None or wanted(planned)):
            load_checkpoint_and_dispatch(model, folder, device_map="sequential", offload_folder=offload,
                                         max_memory=budget, progress=False, **kwargs)
            return model
    raise AssertionError("no CPU budget splits the model between cpu and disk as wanted")


def _meta_copy(model: nn.Module) -> nn.Module:
    with init_empty_weights():
        return type(model)(model.config)


def test_t5_at_float16_places_the_bytes_it_plans_and_keeps_wo_in_float32(tmp_path: Path) -> None:
    reference = build_model(ARCHS["t5"])
    folder = write_model(ARCHS["t5"], tmp_path / "t5")
    model = _meta_copy(reference)
    load_checkpoint_and_dispatch(model, folder, device_map="auto", max_memory={"cpu": "1GiB"},
                                 dtype=torch.float16, progress=False)
    assert placed_bytes(model) == planned_bytes(model)
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert model.encoder.block[0].layer[1].DenseReluDense.wi.weight.dtype == torch.float16


def test_llama_cast_from_bfloat16_to_float16_on_cpu_and_disk(tmp_path: Path) -> None:
    reference = build_model(ARCHS["llama"], dtype=torch.bfloat16)
    folder = write_model(ARCHS["llama"], tmp_path / "llama", dtype=torch.bfloat16)
    model = dispatch_split(lambda: _meta_copy(reference), folder, tmp_path / "off", dtype=torch.float16)
    placed = placed_bytes(model)
    assert set(placed) == {Device.parse("cpu"), Device.parse("disk")}
    assert placed == planned_bytes(model)
    _store_dtypes_match(model, tmp_path / "off")
    assert {p.dtype for p in detach(model).parameters()} == {torch.float16}


class Mixed(nn.Module):
    """Floating layers, an integer and a complex buffer, and one weight with a dtype of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))
        self.register_buffer("steps", torch.arange(6, dtype=torch.int64))
        self.layers[3].register_buffer("phase", torch.ones(5, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _empty_mixed() -> Mixed:
    with init_empty_weights(include_buffers=True):
        return Mixed()


def test_special_dtypes_integer_and_complex_buffers_are_placed_as_planned(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = _save(Mixed(), tmp_path / "mixed")
    model = dispatch_split(_empty_mixed, folder, tmp_path / "off", dtype=torch.float16,
                           special_dtypes={"layers.5.weight": torch.bfloat16})
    assert placed_bytes(model) == planned_bytes(model)
    detach(model)
    assert model.layers[5].weight.dtype == torch.bfloat16 and model.layers[4].weight.dtype == torch.float16
    assert model.steps.dtype == torch.int64 and model.layers[3].phase.dtype == torch.complex64
    assert torch.equal(model.layers[3].phase, torch.ones(5, dtype=torch.complex64))


def test_float8_checkpoint_is_sized_and_loaded_at_one_byte(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Mixed()
    folder = _save(source, tmp_path / "fp8",
                   convert=lambda name, t: t.to(torch.float8_e4m3fn) if name.endswith("weight") else t)
    model = dispatch_split(_empty_mixed, folder, tmp_path / "off", dtype=torch.bfloat16)
    assert placed_bytes(model) == planned_bytes(model)
    detach(model)
    assert {layer.weight.dtype for layer in model.layers} == {torch.float8_e4m3fn}
    assert {layer.bias.dtype for layer in model.layers} == {torch.bfloat16}


# -- the reserve ------------------------------------------------------------------------------------


class Nested(nn.Module):
    """`body` has a weight and a buffer of its own and two children with buffers: split, its entries nest."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Sequential(*(nn.Linear(16, 16) for _ in range(6)))
        self.body = nn.Module()
        self.body.scale = nn.Parameter(torch.ones(16))
        self.body.register_buffer("shift", torch.full((16,), 0.5))
        self.body.a = nn.Linear(16, 16)
        self.body.a.register_buffer("offset", torch.full((16,), 0.25))
        self.body.b = nn.Linear(16, 16)
        self.body.forward = self._body  # type: ignore[method-assign]
        self.head = nn.Linear(16, 4)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.b(self.body.a(x * self.body.scale + self.body.shift) + self.body.a.offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x)))


def _empty_nested() -> Nested:
    with init_empty_weights(include_buffers=False):
        return Nested().eval()


def _run_twice(model: nn.Module, reference: nn.Module) -> None:
    x = torch.randn(3, 16)
    for _ in range(2):
        torch.testing.assert_close(with_timeout(lambda: model(x)), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_runtime_holds_exactly_the_reserve_the_plan_charges(tmp_path: Path, prefetch: int) -> None:
    """A split module whose children (with buffers) are offloaded: slots plus resident buffers == reserve."""
    torch.manual_seed(0)
    reference = Nested().eval()
    folder = _save(reference, tmp_path / "nested")
    nested = lambda planned: {"body", "body.a", "body.b"} <= set(planned.offloaded)  # noqa: E731
    model = dispatch_split(_empty_nested, folder, tmp_path / "off", nested, prefetch=prefetch)
    plan = model.bigload_plan
    _run_twice(model, reference)
    stats = runtime_of(model).stats()
    reserve = plan.usage_of(plan.main_device).reserve
    # body's own entry runs around its children's: two entries at once, plus prefetch.
    assert stats.reserve_bytes == plan.slots.total and plan.slots.count == min(2 + prefetch, len(plan.offloaded))
    assert stats.reserve_bytes + stats.resident_buffer_bytes == reserve
    assert stats.peak_bytes_held + stats.resident_buffer_bytes <= reserve
    assert stats.resident_buffer_bytes == 2 * 16 * 4  # body.shift, body.a.offset stay where they run


def test_planner_counts_nested_offloaded_entries() -> None:
    """CPU-resident blocks streamed to a GPU: `body`'s own entry runs around its children's, so the plan
    keeps depth 2 + prefetch slots (a dry run; the same `reserve.slot_count` sizes the runtime)."""
    from bigload.integrations.loading import plan_for_model

    for prefetch, gpu in ((p, g) for p in (0, 1, 2) for g in range(1_000, 12_000, 100)):
        try:
            plan = plan_for_model(_empty_nested(), "sequential", max_memory={0: gpu, "cpu": "1GiB"},
                                  prefetch=prefetch, policy="stream", no_split_module_classes=[], headroom=0)
        except PlanError:
            continue
        offloaded = set(plan.offloaded)
        if not {"body", "body.a", "body.b"} <= offloaded:
            continue
        assert plan.slots.count == min(2 + prefetch, len(offloaded))
        # A Linear's parameters (each at an aligned offset), body.a's buffer excluded.
        assert plan.slots.nbytes == slot_bytes([16 * 16 * 4, 16 * 4])
        buffers = 2 * 16 * 4  # body.shift and body.a.offset stay resident on the GPU
        assert plan.usage_of(0).reserve == plan.slots.total + buffers
        break
    else:
        raise AssertionError("no plan offloads body and its children")


def test_runtime_slots_cover_nested_blocks_without_a_plan(tmp_path: Path) -> None:
    """A hand-written map nesting offloaded entries: with prefetch 0 two slots (body runs around body.a)."""
    torch.manual_seed(0)
    reference = Nested().eval()
    folder = _save(reference, tmp_path / "nested")
    model = _empty_nested()
    device_map = {"embed": "cpu", "body": "disk", "body.a": "disk", "body.b": "disk", "head": "cpu"}
    load_checkpoint_and_dispatch(model, folder, device_map=device_map, offload_folder=tmp_path / "off",
                                 prefetch=0, progress=False)
    _run_twice(model, reference)
    stats = runtime_of(model).stats()
    assert stats.reserve_bytes == 2 * 16 * 17 * 4 and stats.peak_bytes_held <= stats.reserve_bytes  # CPU: no padding


# -- the execution policy ---------------------------------------------------------------------------


def test_policy_is_one_type_accepted_by_name_everywhere() -> None:
    from bigload.plan.planner import plan
    from bigload.plan.inventory import inventory_from_module
    from bigload.devices import Budget

    inv = inventory_from_module(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)))
    budget = Budget.of({0: 60_000, "cpu": 10**6})
    by_name = plan(inv, budget, policy="stream", headroom=0)
    by_value = plan(inv, budget, policy=ExecutionPolicy.STREAM, headroom=0)
    assert by_name == by_value and by_name.policy is ExecutionPolicy.STREAM and by_name.policy == "stream"
    assert plan(inv, budget, policy="local", headroom=0).policy is ExecutionPolicy.LOCAL


def test_policy_with_a_strategy_string_reaches_the_plan(tmp_path: Path) -> None:
    """Planned for a machine with a GPU (a dry run): cpu blocks run where the given policy says."""
    from bigload.integrations.loading import plan_for_model

    torch.manual_seed(0)
    budget = {0: 12_000, "cpu": "1GiB"}
    with init_empty_weights():
        model = nn.Sequential(*(nn.Linear(32, 32) for _ in range(4)))
    for policy, runs_on in (("local", Device.parse("cpu")), (ExecutionPolicy.STREAM, Device.parse(0))):
        planned = plan_for_model(model, "sequential", max_memory=budget, policy=policy, headroom=0)
        on_cpu = [p for p in planned.placements if p.device == Device.parse("cpu")]
        assert on_cpu and {p.execution_device for p in on_cpu} == {runs_on}
        assert planned.policy == ExecutionPolicy.parse(policy)
        assert f"use policy '{ExecutionPolicy.parse(policy).value}' as requested" in planned.explain()


def test_cli_plan_takes_a_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bigload.cli.commands import main

    folder = write_model(ARCHS["llama"], tmp_path / "llama")
    for policy in ("local", "stream"):
        assert main(["plan", str(folder), "--max-memory", "0=2GiB,cpu=1GiB", "--policy", policy,
                     "--json", "-"]) == 0
        assert json.loads(capsys.readouterr().out)["policy"] == policy


def test_attach_refuses_a_model_that_already_has_a_runtime() -> None:
    from bigload.errors import BigloadError
    from planned import attach_map

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    runtime = attach_map(model, {"0": "cpu", "1": "cpu"}, execution_device="cpu")
    with pytest.raises(BigloadError, match=r"already has a bigload runtime.*detach\(model\) first"):
        attach_map(model, {"0": "cpu", "1": "cpu"}, execution_device="cpu")
    assert runtime_of(model) is runtime
    detach(model)
    attach_map(model, {"0": "cpu", "1": "cpu"}, execution_device="cpu")


# -- the transfer kind ------------------------------------------------------------------------------


def test_each_tensor_gets_one_transfer_kind(tmp_path: Path) -> None:
    """CPU same dtype: a view; CPU cast or materialize: private; disk same dtype: a store reference; disk
    cast: written; a store of the same load: reused. The store's bytes say the same."""
    from bigload.load.transfer import Transfer, transfer_kind as _transfer_kind
    from bigload.load.matching import Group as _Group
    from bigload.tensors import Registration
    from bigload.devices import CPU, DISK
    from bigload.formats.discover import open_checkpoint

    torch.manual_seed(0)
    folder = _save(Mixed(), tmp_path / "mixed")
    ref = open_checkpoint(folder).tensors["layers.0.weight"]
    tensor = torch.empty(16, 16, device="meta")

    def kind(device, dtype, reuse=False, materialize=False):
        group = _Group(("w",), (), tensor, Registration.of(tensor), True, device, dtype)
        return _transfer_kind(ref, group, reuse, materialize)

    assert kind(CPU, torch.float32) is Transfer.VIEW
    assert kind(CPU, torch.float16) is kind(CPU, torch.float32, materialize=True) is Transfer.CPU_CAST
    assert kind(DISK, torch.float32) is Transfer.STORE_REFERENCE
    assert kind(DISK, torch.float16) is Transfer.STORE_WRITE
    assert kind(DISK, torch.float16, reuse=True) is Transfer.STORE_REUSED
    assert kind(Device.parse(0), torch.float16) is Transfer.GPU_STAGE
