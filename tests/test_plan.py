"""The planner on hand-built models: exact maps per strategy, ties, no-split, headroom, reserve, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bigload

from bigload.devices import CPU, DISK, Budget, Device
from bigload.errors import DeviceError, PlanError
from bigload.plan.inventory import inventory_from_module
from bigload.plan import planner as planner
from bigload.plan.planner import Plan, choose_policy, default_gpu_headroom
from bigload.plan.reserve import SlotSpec, pinned_bytes

GiB = 2**30


def plan(*args, **kwargs):
    """The planner with no default GPU headroom: these budgets are bytes, and the default (max(1 GiB, 5 %))
    is tested on its own below."""
    return planner.plan(*args, **{"headroom": 0, **kwargs})
from planner_models import BLOCK, EMBED, HEAD, NORM, tiny_llama, tiny_llama_config, toy

TOTAL = EMBED + 4 * BLOCK + NORM + HEAD  # 12416


@pytest.fixture(scope="module")
def inv():
    return inventory_from_module(toy())


def test_everything_on_one_gpu_collapses_to_the_root(inv):
    result = plan(inv, Budget.of({0: 10**6}))
    assert result.device_map == {"": 0}
    assert result.execution_devices == {"": Device.parse(0)}
    assert result.offloaded == ()
    assert result.usage_of(0).weights == TOTAL


def test_sequential_fills_each_gpu_in_order(inv):
    result = plan(inv, Budget.of({0: 10_000, 1: 10_000}), strategy="sequential")
    assert result.device_map == {"embed": 0, "layers.0": 0, "layers.1": 0, "layers.2": 0,
                                 "layers.3": 1, "norm": 1, "head": 1}
    assert result.usage_of(0).weights == EMBED + 3 * BLOCK


def test_balanced_spreads_evenly_and_differs_from_sequential(inv):
    result = plan(inv, Budget.of({0: 10_000, 1: 10_000}), strategy="balanced")
    assert result.device_map == {"embed": 0, "layers.0": 0, "layers.1": 0, "layers.2": 1,
                                 "layers.3": 1, "norm": 1, "head": 1}
    assert result.strategy == "balanced"
    assert plan(inv, Budget.of({0: 10_000, 1: 10_000})).strategy == "balanced"  # auto, several GPUs
    assert plan(inv, Budget.of({0: 10_000, "cpu": 10_000})).strategy == "sequential"  # auto, one GPU


def test_balanced_low_0_leaves_gpu_0_empty_when_the_others_suffice(inv):
    result = plan(inv, Budget.of({0: 10_000, 1: 10_000, 2: 10_000}), strategy="balanced_low_0")
    assert result.device_map == {"embed": 1, "layers.0": 1, "layers.1": 1, "layers.2": 2,
                                 "layers.3": 2, "norm": 2, "head": 2}
    assert result.usage_of(0).total == 0


def test_balanced_low_0_gives_gpu_0_only_the_overflow(inv):
    # GPUs 1 and 2 (5,000 bytes each) cannot hold the 12,416 bytes: GPU 0 takes the two blocks that do not
    # fit there, and no more.
    result = plan(inv, Budget.of({0: 10_000, 1: 5_000, 2: 5_000}), strategy="balanced_low_0")
    assert result.device_map == {"embed": 0, "layers.0": 0, "layers.1": 1, "layers.2": 1,
                                 "layers.3": 2, "norm": 2, "head": 2}
    assert [result.usage_of(i).weights for i in range(3)] == [EMBED + BLOCK, 2 * BLOCK, BLOCK + NORM + HEAD]


def test_balanced_really_balances_uneven_layers():
    # A big embedding and layers of very different sizes (MoE-like): every GPU must get a fair share,
    # not GPU 0 empty or everything piled on the last one (transformers issue 46823).
    model = toy(hidden=(16, 128, 16, 128, 16, 128, 16, 128))
    inventory = inventory_from_module(model)
    gpus = 4
    result = plan(inventory, Budget.of({i: 10**6 for i in range(gpus)}), strategy="balanced")
    small, large = BLOCK, 2 * 16 * 128 * 4  # the 16- and 128-wide blocks
    # 77,952 bytes in all, 19,488 per GPU: each GPU stops where the next block's midpoint would pass its
    # share, so the loads differ by one small block (2,048 bytes), not by a large one (16,384).
    assert result.device_map == {"embed": 0, "layers.0": 0, "layers.1": 0, "layers.2": 1, "layers.3": 1,
                                 "layers.4": 2, "layers.5": 2, "layers.6": 2, "layers.7": 3, "norm": 3, "head": 3}
    loads = [result.usage_of(i).weights for i in range(gpus)]
    assert loads == [EMBED + small + large, small + large, 2 * small + large, large + NORM + HEAD]
    assert max(loads) - min(loads) == small


def test_tied_head_follows_the_embedding(inv):
    tied = inventory_from_module(toy(tie=True))
    assert tied.tied_groups == (("embed.weight", "head.weight"),)
    result = plan(tied, Budget.of({0: 5_000, 1: 10_000}), strategy="sequential")
    assert result.device_map == {"embed": 0, "layers.0": 0, "layers.1": 1, "layers.2": 1,
                                 "layers.3": 1, "norm": 1, "head": 0}
    assert result.usage_of(0).weights + result.usage_of(1).weights == tied.total_bytes  # tied bytes once


def test_tied_group_offloaded_together():
    tied = inventory_from_module(toy(tie=True))
    result = plan(tied, Budget.of({"cpu": 3_000, "disk": 10**6}), prefetch=0)
    assert result.device_map["embed"] == result.device_map["head"] == "disk"
    assert {"embed", "head"} <= set(result.offloaded)


def test_no_split_blocks_are_never_split_and_others_are_split_only_when_needed():
    inventory = inventory_from_module(toy(), no_split_module_classes=[])
    result = plan(inventory, Budget.of({0: EMBED + BLOCK + 1024, 1: 10**6}), strategy="sequential")
    assert result.device_map == {"embed": 0, "layers.0": 0, "layers.1.fc1": 0, "layers.1.fc2": 1,
                                 "layers.2": 1, "layers.3": 1, "norm": 1, "head": 1}
    kept = inventory_from_module(toy())  # Toy._no_split_modules = ["Block"]
    result = plan(kept, Budget.of({0: EMBED + BLOCK + 1024, 1: 10**6}), strategy="sequential")
    assert "layers.1" in result.device_map and result.device_map["layers.1"] == 1


def test_fixed_headroom_is_kept_free_and_shown(inv):
    result = plan(inv, Budget.of({0: 10_000, 1: 10**6}), strategy="sequential", headroom=3_000)
    zero = result.usage_of(0)
    assert zero.headroom == 3_000
    assert zero.weights == EMBED + 2 * BLOCK
    assert zero.total <= zero.budget
    per_device = plan(inv, Budget.of({0: 10_000, 1: 10**6}), strategy="sequential", headroom={1: "1KiB"})
    assert per_device.usage_of(1).headroom == 1024 and per_device.usage_of(0).headroom == 0


def test_a_device_holding_weights_plus_headroom_to_the_byte_takes_everything(inv):
    exact = plan(inv, Budget.of({0: TOTAL + 3_000, 1: 10**6}), strategy="sequential", headroom=3_000)
    assert exact.device_map == {"": 0}
    assert exact.usage_of(0).free == 0 and exact.usage_of(1).total == 0
    short = plan(inv, Budget.of({0: TOTAL + 2_999, 1: 10**6}), strategy="sequential", headroom=3_000)
    assert short.device_map == {"embed": 0, "layers": 0, "norm": 0, "head": 1}  # one byte short: head moves
    assert short.usage_of(0).weights == TOTAL - HEAD and short.usage_of(0).headroom == 3_000


def test_kv_cache_headroom_is_charged_where_each_layer_runs():
    model = tiny_llama()
    inventory = inventory_from_module(model)
    per_layer = 2 * 2 * 16 * 100 * 3 * 4  # K and V x kv_heads x head_dim x context x batch x fp32
    layer = inventory.size("model.layers.0")
    budget = Budget.of({0: inventory.total_bytes - 2 * layer + 2 * per_layer, 1: 10**7})
    result = plan(inventory, budget, strategy="sequential", context_length=100, batch_size=3)
    on_zero = [p for p in result.placements if p.device == Device.parse(0)]
    layers_on_zero = sum(1 for p in on_zero if p.name.startswith("model.layers."))
    assert result.usage_of(0).headroom == layers_on_zero * per_layer
    assert result.usage_of(1).headroom == (4 - layers_on_zero) * per_layer
    assert all(u.total <= u.budget for u in result.usage)
    without = plan(inventory, budget, strategy="sequential")
    assert without.usage_of(0).weights >= result.usage_of(0).weights  # the KV cache took room from weights


def test_kv_cache_of_streamed_layers_is_charged_to_the_gpu_not_to_the_cpu_holding_them():
    inventory = inventory_from_module(tiny_llama())
    per_layer = 2 * 2 * 16 * 100 * 4  # K and V x kv_heads x head_dim x context x fp32
    layer = inventory.size("model.layers.0")
    budget = {0: 400_000, "cpu": 2 * 10**6}
    result = plan(inventory, Budget.of(budget), policy="stream", context_length=100, prefetch=1)
    # cuda:0 keeps the KV cache of the 4 layers it runs plus 2 slots of a layer and the (resident) buffers of
    # the offloaded blocks: 398,464 bytes, so not even the embedding (65,536 bytes) fits beside them.
    assert set(result.device_map.values()) == {"cpu"}
    gpu = result.usage_of(0)
    assert (gpu.weights, gpu.headroom, gpu.reserve) == (0, 4 * per_layer, 2 * layer + inventory.subtree_buffer_bytes(0))
    assert result.usage_of("cpu").headroom == 0
    # The CPU holds the streamed weights and the slots' pinned staging buffers (its reserve), no KV cache:
    # a budget of exactly those is enough.
    staging = result.slots.staging_bytes
    assert result.usage_of("cpu").reserve == staging == 2 * 2 ** (result.slots.nbytes - 1).bit_length()
    exact = plan(inventory, Budget.of({**budget, "cpu": inventory.total_bytes + staging}), policy="stream",
                 context_length=100, prefetch=1)
    assert exact.device_map == result.device_map and exact.usage_of("cpu").free == 0


def test_a_split_module_running_with_its_child_needs_two_slots():
    """An offloaded module split into its own tensors and a child holds both while the child runs (its
    forward encloses the child's), so the reserve is two slots even with prefetch=0."""

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.empty(40, device="meta"))  # 160 bytes of its own
            self.inner = nn.Linear(1, 1, bias=False, device="meta")  # 4 bytes

    root = nn.Module()
    root.body = Holder()
    inventory = inventory_from_module(root)
    # 160 bytes of CPU cannot run it: one slot for body's own tensors and one for body.inner are 320.
    with pytest.raises(PlanError, match=r"cannot hold .* 160 bytes are missing"):
        plan(inventory, Budget.of({"cpu": 160, "disk": 10**6}), prefetch=0)
    assert plan(inventory, Budget.of({"cpu": 164, "disk": 10**6}), prefetch=0).device_map == {"": "cpu"}


def test_a_gpu_smaller_than_its_headroom_is_left_unused(inv):
    # Found by the property tests: the reserve check refused this plan ("0 bytes are missing") although
    # nothing is offloaded and the CPU holds everything.
    result = plan(inv, Budget.of({0: 1_000, "cpu": TOTAL + 3_000}), headroom=3_000, policy="local")
    assert result.device_map == {"": "cpu"}
    assert result.usage_of(0).total == 0 and result.usage_of("cpu").free == 0


def test_reserve_only_when_something_is_offloaded(inv):
    fits = plan(inv, Budget.of({0: 10**6, "cpu": 10**6}))
    assert fits.usage_of(0).reserve == 0
    streamed = plan(inv, Budget.of({0: 8_000, "cpu": 10**6}), policy="stream", prefetch=1)
    assert streamed.offloaded  # blocks on cpu run on cuda:0
    assert streamed.usage_of(0).reserve == 2 * BLOCK  # (1 running + 1 prefetched) x largest block
    assert all(streamed.execution_devices[name] == Device.parse(0) for name in streamed.offloaded)
    assert all(u.total <= u.budget for u in streamed.usage)
    deeper = plan(inv, Budget.of({0: 8_000, "cpu": 10**6}), policy="stream", prefetch=2)
    assert deeper.usage_of(0).reserve == 3 * BLOCK


# -- finding 5 of issue 15: the GPU slots' pinned staging is charged to the cpu -------------------------


def test_gpu_slots_pinned_staging_is_the_cpus_reserve(inv):
    result = plan(inv, Budget.of({0: 8_000, "cpu": 10**6}), policy="stream", prefetch=1)
    assert result.offloaded and all(p.execution_device == Device.parse(0) for p in result.placements)
    slots = result.slots
    # One page-locked buffer per slot, the slot's size, as torch's pinned allocator takes it (a power of two).
    assert slots.staged and slots.count == 2 and slots.nbytes == BLOCK
    assert result.usage_of("cpu").reserve == slots.staging_bytes == 2 * pinned_bytes(BLOCK) == 4096
    cpu = result.usage_of("cpu")
    assert cpu.weights + cpu.reserve == cpu.total <= cpu.budget
    assert "pinned host staging" in result.explain() and "the cpu's reserve" in result.explain()
    assert Plan.from_json(result.to_json()) == result
    deeper = plan(inv, Budget.of({0: 10_000, "cpu": 10**6}), policy="stream", prefetch=2)
    assert deeper.usage_of("cpu").reserve == 3 * pinned_bytes(deeper.slots.nbytes)


def test_pinned_staging_rounds_up_as_torch_pins():
    assert [pinned_bytes(n) for n in (0, 1, 4096, 4097, 3 << 20)] == [0, 1, 4096, 8192, 4 << 20]
    assert SlotSpec(2, 3 << 20, staged=True).staging_bytes == 8 << 20
    assert SlotSpec(2, 3 << 20).staging_bytes == 0  # slots on the CPU have no staging


def test_no_staging_when_offloaded_blocks_run_on_the_cpu(inv):
    on_cpu = plan(inv, Budget.of({"cpu": 7_000, "disk": 10**6}), prefetch=1)
    assert on_cpu.offloaded and not on_cpu.slots.staged and on_cpu.slots.staging_bytes == 0
    assert on_cpu.usage_of("cpu").reserve == on_cpu.slots.total  # the slots themselves, nothing pinned
    assert "pinned host staging" not in on_cpu.explain()
    resident = plan(inv, Budget.of({0: 10**6, "cpu": 10**6}))
    assert resident.usage_of("cpu").reserve == 0 and not resident.slots.staged
    local = plan(inv, Budget.of({0: 6_000, "cpu": 10**6}), policy="local")
    assert not local.offloaded and local.usage_of("cpu").reserve == 0


def test_weights_the_cpu_cannot_hold_beside_the_staging_move_to_disk(inv):
    exact = plan(inv, Budget.of({0: 8_000, "cpu": 10_368 + 4_096, "disk": 10**6}), policy="stream")
    assert DISK not in {p.device for p in exact.placements} and exact.usage_of("cpu").free == 0
    short = plan(inv, Budget.of({0: 8_000, "cpu": 10_368 + 4_096 - 1, "disk": 10**6}), policy="stream")
    assert short.device_map["head"] == "disk"  # one byte short: the last block goes to disk
    cpu = short.usage_of("cpu")
    assert cpu.reserve == 4_096 and cpu.total <= cpu.budget


def test_a_cpu_budget_below_the_staging_is_refused_naming_the_fix(inv):
    with pytest.raises(PlanError, match=r"cpu cannot hold the pinned staging buffers .* 4.00 KiB .* "
                                        r"Fix: give the cpu more memory \(max_memory\), use prefetch=0"):
        plan(inv, Budget.of({0: 8_000, "cpu": 4_095, "disk": 10**6}), policy="stream")
    assert plan(inv, Budget.of({0: 8_000, "cpu": 4_096, "disk": 10**6}), policy="stream").usage_of("cpu").weights == 0
    # Without a disk, the weights do not fit beside the staging: the usual error, the staging named in it.
    with pytest.raises(PlanError, match=r"(?s)cpu: budget .*kept free 4.00 KiB \(pinned staging 4.00 KiB\).*"
                                        r"fix: add a disk budget.*prefetch=0 \(fewer pinned staging buffers"):
        plan(inv, Budget.of({0: 8_000, "cpu": 10_000}), policy="stream")


def test_local_policy_runs_cpu_blocks_on_the_cpu_without_reserve(inv):
    result = plan(inv, Budget.of({0: 6_000, "cpu": 10**6}), policy="local")
    assert result.offloaded == ()
    assert result.usage_of(0).reserve == 0
    cpu_blocks = [p for p in result.placements if p.device == CPU]
    assert cpu_blocks and all(p.execution_device == CPU for p in cpu_blocks)


def test_without_gpu_disk_blocks_run_on_the_cpu_with_a_cpu_reserve(inv):
    result = plan(inv, Budget.of({"cpu": 7_000, "disk": 10**6}), prefetch=0)
    assert result.main_device == CPU
    disk = [p for p in result.placements if p.device == DISK]
    assert disk and all(p.execution_device == CPU for p in disk)
    assert result.usage_of("cpu").reserve == max(p.weights for p in disk)
    assert result.usage_of("cpu").total <= 7_000


def test_default_policy_follows_the_bandwidth_model():
    assert choose_policy(1, 2)[0] == "local"
    assert choose_policy(256, 2)[0] == "stream"
    inventory = inventory_from_module(toy())
    assert plan(inventory, Budget.of({0: 6_000, "cpu": 10**6}), batch_size=1).policy == "local"
    big_batch = plan(inventory, Budget.of({0: 9_000, "cpu": 10**6}), batch_size=512)
    assert big_batch.policy == "stream" and big_batch.offloaded
    assert any("stream" in reason for reason in big_batch.reasons)


def test_nothing_fits_says_what_is_missing_and_how_to_fix_it(inv):
    with pytest.raises(PlanError, match=r"cuda:0: budget .* missing for 'embed'") as error:
        plan(inv, Budget.of({0: 1_000}))
    message = str(error.value)
    assert "add a disk budget and an offload folder" in message
    assert "1048 bytes" in message  # embed is 2048 bytes, cuda:0 has 1000


def test_context_length_too_long_suggests_lowering_it():
    inventory = inventory_from_module(tiny_llama())
    with pytest.raises(PlanError, match="lower context_length"):
        plan(inventory, Budget.of({0: inventory.total_bytes + 10_000}), context_length=10_000)


def test_reserve_that_does_not_fit_the_main_device_is_an_error(inv):
    with pytest.raises(PlanError, match="cannot hold what offloaded blocks need.*prefetch=0"):
        plan(inv, Budget.of({0: 3_000, "cpu": 10**6}), policy="stream")


@pytest.mark.parametrize("kwargs, match", [
    ({"strategy": "greedy"}, "unknown strategy 'greedy'"),
    ({"prefetch": -1}, "prefetch=-1 is negative"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"policy": "gpu"}, "unknown execution policy"),
    ({"headroom": {3: 10}}, "headroom names cuda:3, which has no budget"),
    ({"dtype": torch.float16}, "differs from the inventory"),
    ({"context_length": 128}, "KV-cache shape"),
])
def test_bad_arguments(kwargs, match):
    inventory = inventory_from_module(toy(), dtype=torch.float32)
    with pytest.raises(PlanError, match=match):
        plan(inventory, Budget.of({0: 10**6}), **kwargs)


def test_budget_without_a_place_to_run(inv):
    with pytest.raises(PlanError, match="no GPU and no CPU"):
        plan(inv, Budget.of({"disk": 10**6}))


def test_json_round_trip_and_explain(inv):
    result = plan(inventory_from_module(tiny_llama()), Budget.of({0: 400_000, "cpu": 10**7}),
                  context_length=64, policy="stream")
    again = Plan.from_json(result.to_json())
    assert again == result
    assert again.device_map == result.device_map
    table = result.explain()
    assert "model.layers.0-3" in table and "(run on cuda:0)" in table
    assert "why:" in table and "reserve" in table
    with pytest.raises(PlanError, match="not a bigload plan"):
        Plan.from_json('{"version": 2}')
    # bigload's errors are ValueErrors too: one raised while reading a field is not re-wrapped as "not a plan"
    broken = json.loads(result.to_json())
    broken["main_device"] = "tpu"
    with pytest.raises(DeviceError, match="^unknown device 'tpu'"):
        Plan.from_json(json.dumps(broken))


def test_collapse_merges_a_split_module_that_landed_on_one_device():
    inventory = inventory_from_module(toy(), no_split_module_classes=[])
    budget = Budget.of({0: 3_000, 1: 10**6})
    # layers.0 was split (its fc1 did not fit next to the embedding), then all of it went to cuda:1.
    assert plan(inventory, budget, strategy="sequential", collapse=False).device_map == {
        "embed": 0, "layers.0.fc1": 1, "layers.0.fc2": 1, "layers.1": 1, "layers.2": 1, "layers.3": 1,
        "norm": 1, "head": 1}
    collapsed = plan(inventory, budget, strategy="sequential")
    assert collapsed.device_map == {"embed": 0, "layers": 1, "norm": 1, "head": 1}
    assert collapsed.usage_of(1).weights == TOTAL - EMBED


_PLANS_IN_A_FRESH_PROCESS = """
import sys
sys.path.insert(0, {tests!r})
from bigload.devices import Budget
from bigload.plan.inventory import inventory_from_module
from bigload.plan.planner import plan
from planner_models import toy

print(hash("layers.0"))  # differs between the seeds when hash randomization is on
for tie in (False, True):
    for split in ({{}}, {{"no_split_module_classes": []}}):  # Block kept whole, or split to fill a device
        inventory = inventory_from_module(toy(layers=6, tie=tie), **split)
        for budget in {budgets!r}:
            for strategy in ("sequential", "balanced"):
                result = plan(inventory, Budget.of(budget), strategy=strategy, policy="stream", headroom=0)
                print(result.to_json().replace("\\n", " "))  # one line per plan
"""


def test_plan_is_deterministic_across_hash_seeds():
    """The same inventory and budget give the same plan in every process: no set or dict order that depends on
    PYTHONHASHSEED (string hashes) reaches a decision. Each seed plans in its own interpreter; the plans span
    GPUs, CPU and disk, ties and split blocks."""
    tests = str(Path(__file__).parent)
    budgets = [{0: 7_000, 1: 4_000, "cpu": 8_000, "disk": 10**6}, {0: 9_000, "cpu": 9_000, "disk": 10**6},
               {0: 6_000, 1: 6_000, 2: 6_000, "cpu": 10**5}]
    script = _PLANS_IN_A_FRESH_PROCESS.format(tests=tests, budgets=budgets)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(bigload.__file__).parent.parent), tests])}
    runs = [subprocess.Popen([sys.executable, "-c", script], env={**env, "PYTHONHASHSEED": seed},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed in ("0", "1", "12345")]
    outputs = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        outputs.append(out.splitlines())
    assert len({lines[0] for lines in outputs}) == 3, "the seeds did not change string hashes"
    plans = [lines[1:] for lines in outputs]
    assert len(plans[0]) == 2 * 2 * len(budgets) * 2
    assert plans[0] == plans[1] == plans[2]


def test_405b_plan_across_8_gpus_and_cpu_fills_every_gpu():
    """How long it takes is measured by benchmarks/bench_plan.py (this model and budget, and 200,000 modules
    for how planning time grows with the module count), not asserted here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bigload.empty import init_empty_weights

    config = LlamaConfig(hidden_size=16384, num_hidden_layers=126, num_attention_heads=128,
                         num_key_value_heads=8, intermediate_size=53248, vocab_size=128256,
                         tie_word_embeddings=False)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    inventory = inventory_from_module(model, dtype=torch.bfloat16)
    budget = Budget.of({**{i: 80 * GiB for i in range(8)}, "cpu": 512 * GiB})
    result = plan(inventory, budget, context_length=8192)
    assert all(result.usage_of(i).weights > 70 * GiB for i in range(8))
    assert all(u.total <= u.budget for u in result.usage)
    assert sum(p.weights for p in result.placements) == inventory.total_bytes
    assert result.usage_of(0).headroom >= 32 * 2**20  # KV cache of its layers at 8192 tokens


def test_tiny_llama_config_helper_matches_kv():
    assert inventory_from_module(tiny_llama()).kv.kv_heads == tiny_llama_config().num_key_value_heads


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder, max_shard_size="200KB")
    return folder


@pytest.mark.parametrize("strategy, budget", [
    ("sequential", {0: 400_000, 1: 400_000, "cpu": 10**7}),
    ("balanced", {0: 10**6, 1: 10**6, 2: 10**6}),
    ("balanced_low_0", {0: 10**6, 1: 10**6, 2: 10**6}),
    ("sequential", {0: 500_000, "cpu": 700_000, "disk": 10**8}),  # less cpu: disk blocks need 512 KiB pinned staging
    ("auto", {0: 10**7}),
])
def test_header_only_plan_equals_the_model_plan(saved_llama, strategy, budget):
    from bigload.formats.discover import open_checkpoint
    from bigload.plan.headers import inventory_from_checkpoint
    from planner_models import device_of

    index = open_checkpoint(saved_llama)
    assert len(index.files) > 1
    from_headers = plan(inventory_from_checkpoint(index, config=tiny_llama_config()), Budget.of(budget),
                        strategy=strategy, context_length=32, policy="stream")
    from_model = plan(inventory_from_module(tiny_llama()), Budget.of(budget), strategy=strategy,
                      context_length=32, policy="stream")
    for name in index.tensors:
        assert device_of(from_headers.device_map, name) == device_of(from_model.device_map, name), name
    assert from_headers.offloaded == tuple(n for n in from_model.offloaded if n != "model.rotary_emb")


# -- the default GPU headroom (the rest of this file plans with headroom=0) ---------------------------


def test_each_gpu_keeps_a_default_headroom_shown_in_explain():
    inventory = inventory_from_module(tiny_llama())
    budget = Budget.of({0: 8 * GiB, 1: 40 * GiB, "cpu": 64 * GiB})
    result = planner.plan(inventory, budget, strategy="sequential")
    assert default_gpu_headroom(8 * GiB) == GiB and default_gpu_headroom(40 * GiB) == 2 * GiB
    assert result.usage_of(0).headroom == GiB  # layers ran only on GPU 0, but GPU 1 is in the plan too
    assert result.usage_of("cpu").headroom == 0
    text = result.explain()
    assert "default max(1 GiB, 5 % of its budget)" in text and "cuda:0 1.00 GiB" in text
    # A GPU smaller than the default keeps nothing for weights: the model goes elsewhere.
    small = planner.plan(inventory, Budget.of({0: GiB // 2, "cpu": 64 * GiB}))
    assert set(small.device_map.values()) == {"cpu"}


def test_the_default_headroom_stops_a_gpu_from_being_planned_full():
    inventory = inventory_from_module(tiny_llama())
    total = inventory.total_bytes
    budget = Budget.of({0: GiB + total // 2, "cpu": 64 * GiB})
    full = planner.plan(inventory, budget, headroom=0)
    assert set(full.device_map.values()) == {0}  # planned 100 % full, as before
    kept = planner.plan(inventory, budget)
    assert kept.usage_of(0).headroom == GiB and kept.usage_of(0).total <= budget.get(0)
    assert kept.usage_of(0).weights <= total // 2 and "cpu" in kept.device_map.values()


def test_the_largest_cast_while_loading_is_kept_free_on_gpus():
    model = tiny_llama()
    stored = {name: torch.float32 for name in model.state_dict()}
    inventory = inventory_from_module(model, dtype=torch.bfloat16, stored_dtypes=stored)
    largest = max(tensor.numel() for tensor in model.state_dict().values()) * 4
    assert inventory.cast_bytes == largest  # the float32 bytes land on the GPU before the cast there
    assert inventory_from_module(model, dtype=torch.float32, stored_dtypes=stored).cast_bytes == 0
    assert inventory_from_module(model, dtype=torch.bfloat16).cast_bytes == 0  # stored dtypes unknown
    budget = Budget.of({0: 16 * GiB, "cpu": 64 * GiB})
    kept = planner.plan(inventory, budget)
    assert kept.usage_of(0).headroom == GiB  # max(runtime headroom, load-time cast), not their sum
    assert "largest cast while loading" in kept.explain()
    explicit = planner.plan(inventory, budget, headroom=0)
    assert explicit.usage_of(0).headroom == largest


def test_dry_run_of_a_float32_checkpoint_loaded_as_bfloat16_charges_its_largest_cast(tmp_path):
    from bigload.formats.discover import open_checkpoint
    from bigload.integrations.hf import inventory_for, plan_model
    from fixtures_models import reference_llama

    reference_llama().save_pretrained(tmp_path, max_shard_size="60KB")  # float32
    largest = max(ref.nbytes for ref in open_checkpoint(tmp_path).tensors.values())
    assert inventory_for(tmp_path, dtype="bfloat16").cast_bytes == largest
    assert inventory_for(tmp_path).cast_bytes == 0
    budget = {0: f"{2 * GiB}", "cpu": "1GiB"}
    as_bf16 = plan_model(tmp_path, max_memory=budget, dtype="bfloat16")
    assert as_bf16.usage_of(0).headroom == GiB  # the default covers this small cast
    assert "largest cast while loading" in as_bf16.explain()
    assert "largest cast while loading" not in plan_model(tmp_path, max_memory=budget).explain()
