"""What every loading entry point does before any weight is read, once each: quantization decided (Linears
swapped on the meta model), the dtype rule built, the checkpoint's source table computed, the inventory taken,
and the one plan made — for a strategy, a map the caller gave, a `Plan` handed back, or one device — then the
devices it names checked on this machine.

    check_named_devices(device_map, options)               # GPUs named by the caller exist
    load = prepare_load(model, checkpoint, options, ...)   # rule, quantization, table, inventory
    plan = plan_load(load.inventory, device_map, options)  # the decisions
    check_devices(plan, load.quantization)                 # the probes
    (`prepare_and_plan` is the four in order; `load.loader.load_plan` and `runtime.attach` execute the plan.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bigload.devices import Device
from bigload.errors import DeviceError, PlanError
from bigload.formats.refs import CheckpointIndex
from bigload.formats.discover import open_checkpoint
from bigload.load.quantized import quantized_sources
from bigload.load.sources import SourceTable, TensorSources
from bigload.plan.budget import check_cgroup_room, check_devices_exist, detect_budget, parse_max_memory
from bigload.plan.dtypes import DtypeRule
from bigload.plan.given import check_plan, plan_for_map
from bigload.plan.inventory import Inventory, inventory_from_module, sub_inventory
from bigload.plan.options import STRATEGIES, PlanOptions
from bigload.plan.planner import plan
from bigload.plan.value import Plan
from bigload.quant import Layout, Quantization, check_device, quantize_model

__all__ = ["PreparedLoad", "check_devices", "check_named_devices", "prepare_and_plan", "prepare_load", "prepare_quantization", "plan_load",
           "rule_for"]


@dataclass(frozen=True)
class PreparedLoad:
    """A load's inputs, each computed once: the dtype rule, the quantization, where every tensor is in the
    checkpoint (`SourceTable`), and the inventory the plan is made from."""

    rule: DtypeRule
    quantization: Quantization | None
    table: SourceTable
    inventory: Inventory


def rule_for(model: nn.Module, options: PlanOptions) -> DtypeRule:
    """The load's dtype rule, from its options (`DtypeRule.for_model`)."""
    return DtypeRule.for_model(model, options.dtype, options.special_dtypes, options.keep_in_fp32_modules)


def prepare_quantization(model: nn.Module, quantize: str | Quantization | None,
                         quantize_skip: Sequence[str] | None = None, *, rule: DtypeRule) -> Quantization | None:
    """Read `quantize=`/`quantize_skip=` and swap the model's Linears for `QuantLinear`s, keeping scales, zeros
    and biases in the dtype `rule` gives each float weight; Linears the rule keeps in float32 stay unquantized.
    Called once per load, before planning, so the inventory sizes quantized bytes.

    Raises:
        QuantizationError: see `bigload.quant.Quantization.parse`, `choose_linears` and `quantize_model` (a model
            quantized before with other settings).
    """
    quantization = Quantization.parse(quantize, quantize_skip)
    if quantization is not None:
        # Modules kept in float32 are kept so for accuracy (T5's `wo` in float16), and their callers cast
        # activations to their weight's dtype: they stay unquantized.
        kept = tuple(name for name, module in model.named_modules()
                     if isinstance(module, nn.Linear) and rule.keeps_fp32(f"{name}.weight"))
        quantization = Quantization(quantization.scheme, quantization.group_size, quantization.skip + kept)
        quantize_model(model, quantization, lambda name, built: rule.dtype_of(name, built, built))
    return quantization


def prepare_load(model: nn.Module, checkpoint: str | os.PathLike[str] | CheckpointIndex, options: PlanOptions, *,
                 quantize: str | Quantization | None = None, quantize_skip: Sequence[str] | None = None,
                 sources: TensorSources | None = None, only: Sequence[str] | None = None) -> PreparedLoad:
    """Quantization (first: a bad scheme is reported before the checkpoint is opened), the checkpoint's source
    table, and the inventory at the load's dtypes (of the modules under `only` when given: a pipeline stage).

    Raises:
        QuantizationError, CheckpointError, BudgetError: bad settings or a malformed checkpoint.
    """
    rule = rule_for(model, options)
    quantization = prepare_quantization(model, quantize, quantize_skip, rule=rule)
    index = checkpoint if isinstance(checkpoint, CheckpointIndex) else open_checkpoint(checkpoint)
    table = SourceTable.of(index, quantized_sources(model, index, sources))
    inventory = inventory_from_module(model, rule=rule, no_split_module_classes=options.no_split_module_classes,
                                      stored_dtypes=table.dtypes)
    if only is not None:
        inventory = sub_inventory(inventory, only)
    return PreparedLoad(rule, quantization, table, inventory)


def check_named_devices(device_map: Any, options: PlanOptions) -> None:
    """Refuse GPUs the machine does not have that a map, a plan or `max_memory` names, and a `max_memory` CPU
    budget above the room the memory cgroup leaves, before the checkpoint is even opened.

    Raises:
        DeviceNotFoundError: naming the GPU and how many this machine has.
        BudgetError: the CPU budget and the cgroup's room (`plan.budget.check_cgroup_room`).
    """
    if isinstance(device_map, Plan):
        check_devices_exist([d for p in device_map.placements for d in (p.device, p.execution_device)])
    elif isinstance(device_map, Mapping):
        check_devices_exist(device_map.values())
    elif isinstance(device_map, str) and device_map in STRATEGIES and options.max_memory is not None:
        # Loading, unlike a dry run, needs every GPU the budget names to be here, and the CPU memory.
        given = parse_max_memory(options.max_memory)
        check_devices_exist(given)
        check_cgroup_room(given)


def prepare_and_plan(model: nn.Module, checkpoint: str | os.PathLike[str] | CheckpointIndex, device_map: Any,
                     options: PlanOptions, *, quantize: str | Quantization | None = None,
                     quantize_skip: Sequence[str] | None = None, sources: TensorSources | None = None,
                     only: Sequence[str] | None = None) -> tuple[PreparedLoad, Plan]:
    """The steps every loading entry point takes before reading a weight, in order: the devices the caller
    named, the load's inputs (`prepare_load`), its one plan (`plan_load`), the devices the plan runs on.

    Raises:
        DeviceError, PlanError, QuantizationError, CheckpointError, BudgetError: see the steps.
    """
    check_named_devices(device_map, options)
    load = prepare_load(model, checkpoint, options, quantize=quantize, quantize_skip=quantize_skip, sources=sources,
                        only=only)
    planned = plan_load(load.inventory, device_map, options)
    check_devices(planned, load.quantization)
    return load, planned


def plan_load(inventory: Inventory, device_map: Any, options: PlanOptions) -> Plan:
    """The one plan of a load: for a strategy name, planned under the budget (`max_memory`, else what the
    machine has free); for a dict map, that map planned (`plan_for_map`); a `Plan`, checked against this
    inventory; one device (0, "cuda:1", "cpu", a `torch.device`), the whole model there; None, the CPU.

    Raises:
        PlanError: the model does not fit, a map that cannot place it, a plan made for another load, or a
            `device_map` that is none of these.
    """
    if isinstance(device_map, Plan):
        check_plan(device_map, inventory)
        return device_map
    budget = detect_budget(options.max_memory, offload_folder=options.offload_folder)
    if device_map is None:
        return plan_for_map(inventory, {"": "cpu"}, budget, options)
    if isinstance(device_map, (int, torch.device)) or (isinstance(device_map, str) and device_map not in STRATEGIES):
        # transformers accepts one device for the whole model ("cpu", "cuda:1", 0); so do we.
        try:
            return plan_for_map(inventory, {"": Device.parse(device_map).key}, budget, options)
        except DeviceError:
            raise PlanError(
                f"device_map={device_map!r} is neither a strategy ({', '.join(STRATEGIES)}) nor a device "
                "(0, 'cuda:N', 'cpu'); pass one of those or a dict such as {'': 'cpu'}."
            ) from None
    if isinstance(device_map, str):
        return plan(inventory, budget, options.with_settings(strategy=device_map))
    if isinstance(device_map, Mapping):
        return plan_for_map(inventory, device_map, budget, options)
    raise PlanError(f"device_map must be a strategy name, a dict, a bigload Plan, a device or None, not "
                    f"{type(device_map).__name__}.")


def check_devices(plan_: Plan, quantization: Quantization | None) -> None:
    """Probe this machine for what `plan_` runs on, before any byte is read.

    Raises:
        DeviceNotFoundError: a GPU the machine does not have (the main device included: `main_device=`).
        QuantizationError: int4 blocks on a GPU whose compute capability its kernels do not support.
    """
    check_devices_exist([plan_.main_device, *(d for p in plan_.placements for d in (p.device, p.execution_device))])
    if quantization is None:
        return
    for placement in plan_.placements:
        if placement.int4_layout is Layout.NIBBLES:
            check_device(quantization, placement.execution_device.torch_device(),
                         f" ({placement.name!r} runs on {placement.execution_device})")
