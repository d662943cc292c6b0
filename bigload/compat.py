"""accelerate's planning helpers, with its names, keyword arguments and return formats, over bigload's planner.

Code that does `from accelerate import infer_auto_device_map` switches by importing from `bigload.compat`.
The maps come from `bigload.plan`, so they differ from accelerate's where bigload plans differently on
purpose (each difference is covered by tests):

- accelerate keeps the largest layer free on the main GPU and on the CPU even when nothing is offloaded;
  bigload keeps an offload reserve only when something is offloaded, sized as the runtime really uses it.
- An offloaded entry is what the runtime brings in at once, so bigload keeps offloaded entries at block
  granularity (`model.layers.7`), where accelerate may merge them (`model.layers`).
- With `dtype`, floating tensors are sized at that dtype (they are loaded cast to it); accelerate sizes each
  at the smaller of the two widths.
- `max_memory=None` probes this machine (`budget.detect_budget`); like accelerate, a disk of unbounded size is
  the last resort when `max_memory` names no disk.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from typing import Iterable, Mapping

import torch
from torch import nn

from bigload.budget import detect_budget
from bigload.devices import DISK, Budget
from bigload.inventory import Inventory, inventory_from_module
from bigload.plan import Plan, plan

__all__ = ["compute_module_sizes", "find_tied_parameters", "get_balanced_memory", "infer_auto_device_map"]

logger = logging.getLogger(__name__)

# accelerate treats a missing disk entry as a disk without limit.
UNBOUNDED_DISK = 2**62


def compute_module_sizes(
    model: nn.Module,
    dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
) -> defaultdict[str, int]:
    """Bytes of every module and tensor name, accelerate's format: `{"": total, "lm_head": ..., ...}`.

    Args:
        model: the model (meta is fine).
        dtype: the dtype floating tensors will be loaded in.
        special_dtypes: tensor name -> dtype overriding `dtype`.

    Returns:
        A `defaultdict(int)` keyed by "" (the whole model), each module that holds tensors and each tensor
        name; tied tensors are counted once, under their first name.

    >>> compute_module_sizes(torch.nn.Linear(4, 4))[""]
    80
    """
    inventory = inventory_from_module(model, dtype=dtype, special_dtypes=special_dtypes, no_split_module_classes=())
    sizes: defaultdict[str, int] = defaultdict(int)
    for entry in inventory.tensors:
        parts = entry.name.split(".")
        for depth in range(len(parts) + 1):
            sizes[".".join(parts[:depth])] += entry.nbytes
    return sizes


def find_tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor, accelerate's format (each group sorted).

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> model[1].weight = model[0].weight
    >>> find_tied_parameters(model)
    [['0.weight', '1.weight']]
    """
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    inventory = inventory_from_module(model, keep_in_fp32_modules=(), no_split_module_classes=())
    groups = []
    for group in inventory.tied_groups:
        names = sorted(name for name in group if name in parameters)
        if len(names) > 1:
            groups.append(names)
    return groups


def infer_auto_device_map(
    model: nn.Module,
    max_memory: Mapping[int | str, int | str] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
) -> "OrderedDict[str, int | str]":
    """A device map filling GPUs, then the CPU, then disk, in execution order (bigload's `sequential`).

    Args:
        model: the model (meta is fine).
        max_memory: device -> bytes or size string; None probes this machine.
        no_split_module_classes: class names never split (accelerate's default: none).
        dtype: the dtype floating tensors will be loaded in.
        special_dtypes: tensor name -> dtype overriding `dtype`.
        verbose: log the plan table (logger `bigload.compat`, level INFO).
        clean_result: merge entries whose whole parent sits on one device (offloaded entries stay blocks).
        offload_buffers: accepted for accelerate compatibility; the map is the same either way (the reserve
            already counts buffers of offloaded blocks as resident on the execution device).

    Returns:
        An `OrderedDict` module name -> GPU index, "cpu" or "disk".

    Raises:
        PlanError: the main device cannot hold what offloaded blocks need while they run (the disk is
            unbounded when `max_memory` names none, so everything else fits).
        BudgetError, DeviceError: a malformed `max_memory`.

    >>> infer_auto_device_map(model, max_memory={0: "10GiB", "cpu": "30GiB"},
    ...                       no_split_module_classes=["LlamaDecoderLayer"])  # doctest: +SKIP
    OrderedDict([('model.embed_tokens', 0), ...])
    """
    result = _plan(model, max_memory, no_split_module_classes, dtype, special_dtypes, "sequential",
                   collapse=clean_result)
    if verbose:
        logger.info("%s", result.explain())
    return OrderedDict(result.device_map)


def get_balanced_memory(
    model: nn.Module,
    max_memory: Mapping[int | str, int | str] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    low_zero: bool = False,
) -> dict[int | str, int]:
    """A `max_memory` that makes `infer_auto_device_map` spread the model over the GPUs.

    Each GPU but the last gets exactly what bigload's `balanced` (or `balanced_low_0` with `low_zero`) plan
    puts on it; the last GPU, the CPU and the disk keep their budgets, as in accelerate.

    Args:
        model, max_memory, no_split_module_classes, dtype, special_dtypes: as `infer_auto_device_map`.
        low_zero: keep GPU 0 as empty as possible (room for generation outputs).

    Returns:
        accelerate's `max_memory` format: `{0: bytes, 1: bytes, "cpu": bytes}`.

    >>> get_balanced_memory(model, max_memory={0: "24GiB", 1: "24GiB", "cpu": "64GiB"})  # doctest: +SKIP
    {0: 7516192768, 1: 25769803776, 'cpu': 68719476736}
    """
    budget = detect_budget(max_memory)
    gpus = [device for device, nbytes in budget if device.is_gpu and nbytes > 0]
    if len(gpus) < 2:
        return budget.as_max_memory()
    strategy = "balanced_low_0" if low_zero else "balanced"
    result = _plan(model, max_memory, no_split_module_classes, dtype, special_dtypes, strategy, collapse=True,
                   budget=budget)
    balanced = budget.as_max_memory()
    for device in gpus[:-1]:
        balanced[device.key] = result.usage_of(device).weights
    return balanced


def _plan(model: nn.Module, max_memory: Mapping[int | str, int | str] | None,
          no_split_module_classes: Iterable[str] | None, dtype: str | torch.dtype | None,
          special_dtypes: Mapping[str, str | torch.dtype] | None, strategy: str, *, collapse: bool,
          budget: Budget | None = None) -> Plan:
    inventory: Inventory = inventory_from_module(
        model, dtype=dtype, special_dtypes=special_dtypes,
        # accelerate splits everything unless told otherwise: None means no class, not `_no_split_modules`.
        no_split_module_classes=tuple(no_split_module_classes or ()),
    )
    budget = budget if budget is not None else detect_budget(max_memory)
    if DISK not in budget.devices:
        budget = Budget((*budget.limits, (DISK, UNBOUNDED_DISK)), budget.sources)
    return plan(inventory, budget, strategy=strategy, dtype=dtype, collapse=collapse)
