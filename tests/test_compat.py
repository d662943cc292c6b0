"""accelerate's planning helpers over bigload's planner, side by side with accelerate itself.

Documented, tested differences (see bigload/compat.py):
- accelerate keeps the largest layer free on GPU 0 and on the CPU even when nothing is offloaded; bigload
  charges a reserve only when something is offloaded. Given that same amount as headroom, bigload's
  sequential map is accelerate's map.
"""

from __future__ import annotations

import logging

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
from accelerate.utils import compute_module_sizes as acc_sizes  # noqa: E402
from accelerate.utils import find_tied_parameters as acc_tied  # noqa: E402

from bigload import compat  # noqa: E402
from bigload.devices import Budget  # noqa: E402
from bigload.inventory import inventory_from_module  # noqa: E402
from bigload.plan import plan  # noqa: E402
from planner_models import tensor_devices, tiny_llama, toy  # noqa: E402

NO_SPLIT = ["LlamaDecoderLayer"]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def test_compute_module_sizes_matches_accelerate(llama):
    for model in (llama, toy(tie=True)):
        assert dict(compat.compute_module_sizes(model)) == dict(acc_sizes(model))
        assert dict(compat.compute_module_sizes(model, dtype=torch.float32)) == \
            dict(acc_sizes(model, dtype=torch.float32))
    assert compat.compute_module_sizes(llama)["no.such.module"] == 0  # a defaultdict, like accelerate's


def test_compute_module_sizes_casts_up_where_accelerate_takes_the_smaller_width():
    model = toy()
    model.half()
    # bigload loads floats cast to dtype, so a float32 load of float16 weights takes 4 bytes per element.
    assert compat.compute_module_sizes(model, dtype=torch.float32)[""] == 2 * acc_sizes(model, dtype="float32")[""]


def test_find_tied_parameters_matches_accelerate(llama):
    tied = tiny_llama(tie=True)
    assert compat.find_tied_parameters(tied) == acc_tied(tied) == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert compat.find_tied_parameters(llama) == acc_tied(llama) == []


def test_roomy_budget_gives_the_same_map(llama):
    budget = {0: 10**7, "cpu": 10**7}
    assert dict(compat.infer_auto_device_map(llama, max_memory=budget, no_split_module_classes=NO_SPLIT)) == \
        dict(accelerate.infer_auto_device_map(llama, max_memory=budget, no_split_module_classes=NO_SPLIT)) == {"": 0}


@pytest.mark.parametrize("budget", [
    {0: 300_000, "cpu": 10**6},
    {0: 500_000, "cpu": 10**6},
    {0: 700_000, "cpu": 10**6},
    {0: 400_000, 1: 400_000, "cpu": 10**6},
])
def test_sequential_equals_accelerate_given_its_upfront_reserve_as_headroom(llama, budget):
    inventory = inventory_from_module(llama, no_split_module_classes=NO_SPLIT)
    largest_layer = inventory.size("model.layers.0")
    theirs = accelerate.infer_auto_device_map(llama, max_memory=budget, no_split_module_classes=NO_SPLIT)
    ours = plan(inventory, Budget.of(budget), strategy="sequential", policy="local",
                headroom={0: largest_layer, "cpu": largest_layer})
    assert ours.device_map == dict(theirs)


def test_sequential_differs_where_accelerate_reserves_a_layer_for_nothing(llama):
    budget = {0: 700_000, "cpu": 10**6}
    inventory = inventory_from_module(llama, no_split_module_classes=NO_SPLIT)
    theirs = accelerate.infer_auto_device_map(llama, max_memory=budget, no_split_module_classes=NO_SPLIT)
    ours = compat.infer_auto_device_map(llama, max_memory=budget, no_split_module_classes=NO_SPLIT)
    gpu = lambda device_map: sum(p.numel() * 4 for n, p in llama.named_parameters()  # noqa: E731
                                 if tensor_devices(llama, device_map)[n] == 0)
    assert gpu(ours) > gpu(theirs)
    # accelerate stopped filling GPU 0 one layer early: what it left free is the largest layer it reserved.
    assert gpu(theirs) + 2 * inventory.size("model.layers.0") > budget[0] >= gpu(ours)


def test_balanced_memory_then_infer_reproduces_bigloads_balanced_plan(llama):
    budget = {0: 10**6, 1: 10**6, "cpu": 10**7}
    balanced = compat.get_balanced_memory(llama, max_memory=budget, no_split_module_classes=NO_SPLIT)
    inventory = inventory_from_module(llama, no_split_module_classes=NO_SPLIT)
    layer = inventory.size("model.layers.0")
    # 723,264 bytes over two equal GPUs: GPU 0 gets the embedding and two layers (361,472 bytes, the half is
    # 361,632), and get_balanced_memory caps it at exactly that.
    assert balanced == {0: inventory.size("model.embed_tokens") + 2 * layer, 1: 10**6, "cpu": 10**7}
    device_map = compat.infer_auto_device_map(llama, max_memory=balanced, no_split_module_classes=NO_SPLIT)
    expected = plan(inventory, Budget.of(budget), strategy="balanced")
    assert dict(device_map) == expected.device_map == {
        "model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
        "model.layers.3": 1, "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}


def test_balanced_memory_low_zero_keeps_gpu_0_empty(llama):
    budget = {0: 10**6, 1: 10**6, 2: 10**6}
    balanced = compat.get_balanced_memory(llama, max_memory=budget, no_split_module_classes=NO_SPLIT,
                                          low_zero=True)
    assert balanced[0] == 0


def test_balanced_memory_with_one_gpu_is_the_budget(llama):
    assert compat.get_balanced_memory(llama, max_memory={0: "1GiB", "cpu": "2GiB"}) == {0: 2**30, "cpu": 2 * 2**30}


def test_unbounded_disk_is_the_last_resort_like_accelerate(llama):
    device_map = compat.infer_auto_device_map(llama, max_memory={"cpu": 400_000}, no_split_module_classes=NO_SPLIT)
    assert "disk" in device_map.values()


def test_no_max_memory_probes_this_machine(llama):
    assert dict(compat.infer_auto_device_map(llama)) in ({"": "cpu"}, {"": 0})


def test_clean_result_false_and_verbose(llama, caplog):
    budget = {0: 500_000, "cpu": 10**6}
    with caplog.at_level(logging.INFO, logger="bigload.compat"):
        raw = compat.infer_auto_device_map(llama, max_memory=budget, no_split_module_classes=NO_SPLIT,
                                           clean_result=False, verbose=True)
    assert "model.layers.0" in raw and "weights" in caplog.text
