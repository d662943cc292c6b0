"""accelerate's planning helpers, with its names, keyword arguments, results and messages.

Code that does `from accelerate import infer_auto_device_map` switches by importing from `bigload`. These
functions answer exactly as accelerate 1.15 does (the differential tests run both on the same models and
budgets): the maps come from `compat_plan`, accelerate's strategy over bigload's inventory, not from
bigload's own planner, whose `plan()` places blocks better (see `docs/accelerate.md`).
The messages accelerate emits are emitted too: `warnings.warn` where accelerate warns, and log records on the
`bigload.integrations.device_maps` logger where accelerate logs (`verbose=True` logs the map at INFO instead of printing steps).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections import OrderedDict, defaultdict
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from bigload.plan.budget import detect_budget
from bigload.plan.accelerate_balance import balanced_memory
from bigload.plan.accelerate_map import Key, Note, Size, infer_map, module_sizes
from bigload.plan.inventory import Inventory, inventory_from_module
from bigload.sizes import parse_dtype

__all__ = ["compute_module_sizes", "find_tied_parameters", "get_balanced_memory", "infer_auto_device_map"]

logger = logging.getLogger(__name__)


def _inventory(model: nn.Module, no_split_module_classes: Iterable[str] | str | None = None) -> Inventory:
    """The model at its stored dtypes; accelerate splits everything unless told: None means no class."""
    if isinstance(no_split_module_classes, str):
        no_split_module_classes = [no_split_module_classes]
    return inventory_from_module(model, keep_in_fp32_modules=(),
                                 no_split_module_classes=tuple(no_split_module_classes or ()))


def _dtypes(dtype: str | torch.dtype | None, special_dtypes: Mapping[str, str | torch.dtype] | None,
            ) -> tuple[torch.dtype | None, dict[str, torch.dtype]]:
    target = parse_dtype(dtype) if dtype is not None else None
    return target, {name: parse_dtype(value) for name, value in (special_dtypes or {}).items()}


def compute_module_sizes(
    model: nn.Module,
    dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    buffers_only: bool = False,
) -> defaultdict[str, Size]:
    """Bytes of every module and tensor name, as accelerate counts them: `{"": total, "lm_head": ..., ...}`.

    Args:
        model: the model (meta is fine).
        dtype: the load dtype; like accelerate, a floating tensor counts at the smaller of its width and this.
        special_dtypes: tensor name -> dtype overriding that rule.
        buffers_only: count buffers only.

    Returns:
        A `defaultdict(int)`; tied tensors count once, under their first name; bool tensors 1/8 byte each.

    >>> compute_module_sizes(torch.nn.Linear(4, 4))[""]
    80
    """
    target, special = _dtypes(dtype, special_dtypes)
    return defaultdict(int, module_sizes(_inventory(model), target, special, buffers_only=buffers_only))


def _tied(inv: Inventory) -> list[list[str]]:
    parameters = {entry.name for entry in inv.tensors if not entry.buffer}
    return [sorted(group) for group in inv.tied_groups if group[0] in parameters]


def find_tied_parameters(model: nn.Module, **kwargs: Any) -> list[list[str]]:
    """Groups of parameter names that share one tensor, accelerate's format (each group sorted).

    `kwargs` are accepted and ignored, as accelerate documents (they serve its recursion).

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> model[1].weight = model[0].weight
    >>> find_tied_parameters(model)
    [['0.weight', '1.weight']]
    """
    del kwargs
    return _tied(_inventory(model))


def _max_memory(max_memory: Mapping[int | str, int | str] | None) -> dict[Key, Size]:
    """accelerate's `get_max_memory`: sizes parsed, GPUs ascending then cpu then disk; None probes. Like
    accelerate, a GPU index this machine lacks is logged and kept (a dry run for another machine)."""
    budget = detect_budget(max_memory).as_max_memory()
    if max_memory is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for key in budget:
            if isinstance(key, int) and key >= count:
                logger.warning("Device %s is not available, available devices are %s", key, list(range(count)))
    return dict(budget)


def _warn_untied(model: nn.Module, tied: list[list[str]]) -> None:
    """accelerate's warning for a transformers model whose config ties weights that are not tied yet."""
    if tied or "PreTrainedModel" not in [c.__name__ for c in inspect.getmro(type(model))]:
        return
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    tied_embeddings = (text is not None and getattr(text, "tie_word_embeddings", False)
                       and model.get_output_embeddings())
    encoder_decoder = (config is not None and getattr(config, "is_encoder_decoder", False)
                       and getattr(config, "tie_encoder_decoder", False))
    if tied_embeddings or encoder_decoder or any(hasattr(m, "_tie_weights") for m in model.modules()):
        logger.warning("The model weights are not tied. Please use the `tie_weights` method before using the "
                       "`infer_auto_device` function.")


def _emit(notes: Iterable[Note]) -> None:
    for note in notes:
        if note.kind == "warning":
            warnings.warn(note.text, stacklevel=3)
        else:
            logger.info("%s", note.text)


def infer_auto_device_map(
    model: nn.Module,
    max_memory: Mapping[int | str, int | str] | None = None,
    no_split_module_classes: Iterable[str] | str | None = None,
    dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
    fallback_allocation: bool = False,
) -> "OrderedDict[str, int | str]":
    """accelerate's device map: GPUs in order, then the CPU, then disk, keeping room on the first GPU and on
    the CPU for the largest layer still to place.

    Args:
        model: the model (meta is fine).
        max_memory: device -> bytes or size string; None probes this machine. GPU indices this machine lacks
            are planned for (a dry run), with accelerate's warning.
        no_split_module_classes: class names never split (default: none, as in accelerate).
        dtype: the load dtype (sizes as `compute_module_sizes`).
        special_dtypes: tensor name -> dtype overriding `dtype`.
        verbose: log the map at INFO on `bigload.integrations.device_maps` (accelerate prints each step).
        clean_result: merge entries whose whole parent sits on one device.
        offload_buffers: buffers of offloaded modules go with them (else the warning below may be raised).
        fallback_allocation: when a device would get nothing, put there the first module (depth first)
            that fits.

    Returns:
        An `OrderedDict` module name -> GPU index, "cpu" or "disk". accelerate's warnings: a `UserWarning`
        when the buffers of offloaded modules fit no GPU; INFO records naming devices that got nothing.

    Raises:
        BudgetError, DeviceError: a malformed `max_memory`.
        PlanError: where accelerate fails with an IndexError (a tied parameter whose module was already
            placed elsewhere); give a device map by hand.

    >>> infer_auto_device_map(model, max_memory={0: "10GiB", "cpu": "30GiB"},
    ...                       no_split_module_classes=["LlamaDecoderLayer"])  # doctest: +SKIP
    OrderedDict([('model.embed_tokens', 0), ...])
    """
    budget = _max_memory(max_memory)
    inv = _inventory(model, no_split_module_classes)
    tied = _tied(inv)
    _warn_untied(model, tied)
    target, special = _dtypes(dtype, special_dtypes)
    result = infer_map(inv, budget, tied, dtype=target, special_dtypes=special, clean_result=clean_result,
                       offload_buffers=offload_buffers, fallback_allocation=fallback_allocation)
    _emit(result.notes)
    if verbose:
        logger.info("device map: %s", dict(result.device_map))
    return result.device_map


def get_balanced_memory(
    model: nn.Module,
    max_memory: Mapping[int | str, int | str] | None = None,
    no_split_module_classes: Iterable[str] | str | None = None,
    dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    low_zero: bool = False,
) -> dict[int | str, Size]:
    """accelerate's `max_memory` that makes `infer_auto_device_map` spread the model over the GPUs.

    Each GPU but the last gets the model's size divided by the GPU count plus 1.25 x the larger of the first
    no-split block and the mean final module; the last GPU, the CPU and the disk keep their budgets.

    Args:
        model, max_memory, no_split_module_classes, dtype, special_dtypes: as `infer_auto_device_map`.
        low_zero: keep GPU 0 as empty as possible (room for generation outputs).

    Returns:
        accelerate's `max_memory` format: `{0: bytes, 1: bytes, "cpu": bytes}`. With one GPU and no
        `max_memory`, 90% of its free memory (logged at INFO, as accelerate does). A "disk" entry is kept
        (accelerate fails on one with a RuntimeError).

    >>> get_balanced_memory(model, max_memory={0: "24GiB", 1: "24GiB", "cpu": "64GiB"})  # doctest: +SKIP
    """
    budget = _max_memory(max_memory)
    inv = _inventory(model, no_split_module_classes)
    target, special = _dtypes(dtype, special_dtypes)
    balanced, notes = balanced_memory(inv, module_sizes(inv, target, special), budget, low_zero=low_zero,
                                      probed=max_memory is None)
    _emit(notes)
    return balanced
