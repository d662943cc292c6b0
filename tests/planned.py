"""Attaching the runtime to a hand-written device map, planned the way `dispatch_model` plans one."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from bigload.devices import Budget, ExecutionPolicy
from bigload.plan import PlanOptions, plan_for_map
from bigload.plan.inventory import inventory_from_module
from bigload.plan.reserve import DiskReads
from bigload.runtime import Runtime, attach


def planned(model: nn.Module, device_map: dict, *, execution_device: Any, prefetch: int = 1,
            policy: ExecutionPolicy = ExecutionPolicy.STREAM, offload_buffers: bool = False,
            disk_reads: DiskReads | str = DiskReads.MAPPED, slots: Any = None):
    """`plan_for_map` of `device_map` for `model` (no budget: disk blocks come in as `disk_reads` says);
    `slots` replaces the plan's slots (to test that the runtime takes them from the plan)."""
    options = PlanOptions(main_device=execution_device, policy=policy, prefetch=prefetch,
                          offload_buffers=offload_buffers, disk_reads=disk_reads)
    result = plan_for_map(inventory_from_module(model), device_map, Budget.of({}), options)
    return dataclasses.replace(result, slots=slots) if slots is not None else result


def attach_map(model: nn.Module, device_map: dict, *, execution_device: Any, store: Any = None,
               host_weights: Any = None, order: Any = None, skip_keys: Any = None, **planning: Any) -> Runtime:
    """`attach` with the plan of `device_map` (see `planned`)."""
    result = planned(model, device_map, execution_device=execution_device, **planning)
    return attach(model, result, store=store, host_weights=host_weights, order=order, skip_keys=skip_keys)
