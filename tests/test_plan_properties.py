"""Property tests: random module trees and budgets; the planner's hard constraints always hold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bigload.devices import Budget
from bigload.errors import PlanError
from bigload.inventory import inventory_from_module
from bigload.plan import STRATEGIES, plan


class NodeA(nn.Module):
    pass


class NodeB(nn.Module):
    pass


leaf = st.tuples(st.integers(1, 6), st.integers(1, 6), st.booleans())  # (in, out, bias), x4 bytes of float32
tree = st.recursive(leaf, lambda kids: st.tuples(st.sampled_from([NodeA, NodeB]), st.lists(kids, min_size=1,
                                                                                         max_size=4)),
                    max_leaves=12)


def build(spec) -> nn.Module:
    if isinstance(spec[0], int):
        fan_in, fan_out, bias = spec
        return nn.Linear(fan_in, fan_out, bias=bias, device="meta")
    cls, children = spec
    module = cls()
    for i, child in enumerate(children):
        module.add_module(f"c{i}", build(child))
    return module


@st.composite
def cases(draw):
    root = nn.Module()
    root.add_module("body", build(draw(tree)))
    if draw(st.booleans()):
        root.add_module("buf", nn.Module())
        root.buf.register_buffer("steps", torch.zeros(draw(st.integers(1, 8)), dtype=torch.int64, device="meta"))
    linears = [m for m in root.modules() if isinstance(m, nn.Linear)]
    if draw(st.booleans()):
        source = linears[draw(st.integers(0, len(linears) - 1))]
        head = nn.Linear(source.in_features, source.out_features, bias=False, device="meta")
        head.weight = source.weight  # a tie across the tree, like lm_head and the embedding
        root.add_module("head", head)
    no_split = draw(st.sets(st.sampled_from(["NodeA", "NodeB"])))
    inventory = inventory_from_module(root, no_split_module_classes=sorted(no_split))
    total = max(1, inventory.total_bytes)
    gpus = draw(st.integers(0, 3))
    # Budgets around the model's size, so most cases fit somewhere and many are split or offloaded.
    limits = {i: draw(st.integers(total // 4, total)) for i in range(gpus)}
    if draw(st.integers(0, 3)) or not gpus:
        limits["cpu"] = draw(st.integers(total // 3, 2 * total))
    if draw(st.integers(0, 6)):
        limits["disk"] = 10 * total
    kwargs = dict(
        prefetch=draw(st.integers(0, 2)),
        policy=draw(st.sampled_from([None, "stream", "local"])),
        headroom=draw(st.sampled_from([None, 0, 16])),
    )
    return root, inventory, Budget.of(limits), kwargs


def owner(device_map, name: str) -> str:
    key = name
    while key not in device_map:
        key = key.rpartition(".")[0] if "." in key else ""
        if key == "" and "" not in device_map:
            raise AssertionError(f"{name} is not covered by {device_map}")
    return key


def check_plan(root, inventory, result) -> None:
    device_map = result.device_map
    # Every tensor placed exactly once: each resolves to one entry, whose weights are exactly its tensors.
    per_entry: dict[str, int] = {}
    for entry in inventory.tensors:
        key = owner(device_map, entry.name)
        per_entry[key] = per_entry.get(key, 0) + entry.nbytes
    assert {p.name: p.weights for p in result.placements if p.weights} == {k: v for k, v in per_entry.items() if v}
    assert sum(p.weights for p in result.placements) == inventory.total_bytes
    # Every device within its budget, headroom and reserve included.
    for usage in result.usage:
        assert usage.total <= usage.budget, (usage, device_map)
    # Tied names on one device.
    for group in inventory.tied_groups:
        assert len({device_map[owner(device_map, name)] for name in group}) == 1, (group, device_map)
    # No-split modules never split.
    for name in inventory.no_split_names():
        assert not any(key.startswith(name + ".") for key in device_map), (name, device_map)
    # Reserve only when something is offloaded, and then at least one slot of the largest offloaded block.
    reserve = sum(u.reserve for u in result.usage)
    if result.offloaded:
        largest = max(p.weights for p in result.placements if p.offloaded)
        assert result.usage_of(result.main_device).reserve >= largest - inventory.subtree_buffer_bytes(0)
    else:
        assert reserve == 0
    assert all(not p.execution_device.kind.name == "DISK" for p in result.placements)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.sampled_from(STRATEGIES))
def test_hard_constraints_hold(case, strategy):
    root, inventory, budget, kwargs = case
    try:
        result = plan(inventory, budget, strategy=strategy, **kwargs)
    except PlanError as error:
        assert "missing" in str(error) or "no GPU and no CPU" in str(error)
        return
    check_plan(root, inventory, result)
    assert plan(inventory, budget, strategy=strategy, **kwargs) == result  # deterministic
    assert type(result).from_json(result.to_json()) == result


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_strategies_differ_only_in_distribution(case):
    root, inventory, budget, kwargs = case
    results = []
    for strategy in STRATEGIES:
        try:
            results.append(plan(inventory, budget, strategy=strategy, **kwargs))
        except PlanError:
            continue
    for result in results:
        check_plan(root, inventory, result)
        assert sum(u.weights for u in result.usage) == inventory.total_bytes


def test_property_harness_catches_an_uncovered_tensor():
    with pytest.raises(AssertionError, match="not covered"):
        owner({"a": 0}, "b.weight")
