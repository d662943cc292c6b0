"""accelerate's checkpoint-loading names, on bigload's pipeline: prepare, plan, stream, hook.

`load_checkpoint_and_dispatch` reads like the pipeline: prepare the load once (quantization, dtype rule,
source table, inventory), make its one plan (for a strategy, a dict map, a `Plan` or a device), check the
devices, stream the checkpoint straight to the planned places (`load.loader.load_plan`), attach the runtime
(`runtime.attach`). `load_checkpoint_in_model` is the same without the hooks. Each keeps accelerate's keyword
arguments and sets what transformers and accelerate set on the model.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bigload.devices import ExecutionPolicy
from bigload.errors import BudgetError, DeviceError, OffloadError
from bigload.formats.refs import CheckpointIndex
from bigload.integrations.prepare import prepare_and_plan, rule_for
from bigload.load.loader import DEFAULT_WINDOW_BYTES, LoadResult, load_plan
from bigload.load.sources import TensorSources
from bigload.plan.budget import detect_budget
from bigload.plan.inventory import inventory_from_module
from bigload.plan.options import PlanOptions
from bigload.plan.planner import plan
from bigload.plan.reserve import DiskReads
from bigload.plan.value import Plan
from bigload.quant import Quantization
from bigload.runtime.runtime import Runtime, attach, check_not_attached

__all__ = ["load_checkpoint_and_dispatch", "load_checkpoint_in_model", "plan_for_model", "set_device_map"]


def load_checkpoint_and_dispatch(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | CheckpointIndex,
    device_map: str | Mapping[str, Any] | Plan | int | torch.device | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    no_split_module_classes: Sequence[str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    offload_buffers: bool = False,
    dtype: str | torch.dtype | None = None,
    offload_state_dict: bool | None = None,
    skip_keys: str | Sequence[str] | None = None,
    preload_module_classes: Sequence[str] | None = None,
    force_hooks: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
    *,
    prefetch: int = 1,
    context_length: int | None = None,
    batch_size: int = 1,
    policy: ExecutionPolicy | str | None = None,
    keep_in_fp32_modules: Sequence[str] | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    progress: bool | None = None,
    sources: TensorSources | None = None,
    materialize: bool = False,
    only: Sequence[str] | None = None,
    quantize: str | Quantization | None = None,
    quantize_skip: Sequence[str] | None = None,
    disk_reads: DiskReads | str | None = None,
) -> nn.Module:
    """Prepare, plan, stream, hook: load `checkpoint` into a model built with `init_empty_weights()` and run it
    where the plan says.

    Args:
        model: built on meta (`init_empty_weights()`); weights are streamed straight to their device.
        checkpoint: a safetensors/`.bin` file, a sharded folder or its index (or an open `CheckpointIndex`).
        device_map: "auto", "balanced", "balanced_low_0", "sequential" (planned by bigload), a dict in
            transformers' format (planned as given: `plan.given.plan_for_map`), a bigload `Plan` (checked against
            this load), one device, or None (everything on the CPU, no hooks).
        max_memory: per-device budgets for planning, e.g. `{0: "20GiB", "cpu": "60GiB"}`.
        no_split_module_classes: module classes the planner keeps whole (e.g. `["LlamaDecoderLayer"]`).
        offload_folder: where "disk" tensors go (a `DiskStore`, accelerate's layout).
        offload_buffers: offload the buffers of offloaded blocks with them (else they stay where the block runs).
        dtype: cast floating-point weights to this dtype while streaming.
        offload_state_dict: accepted for accelerate compatibility; bigload never holds a whole state dict.
        skip_keys: forward keyword arguments never moved between devices (default: cache arguments).
        preload_module_classes: accepted for accelerate compatibility; blocks are materialized whole.
        force_hooks: hook the model even when it all lands on one device.
        strict: accelerate's default False skips checkpoint tensors the model lacks (with accelerate's
            warning) and warns about model tensors the checkpoint lacks; True makes both an error (raised
            before any byte is read). Mis-shaped tensors are always an error.
        full_state_dict, broadcast_from_rank0: accelerate's options for sharded (DTensor) models; accepted,
            and change nothing (see `load_checkpoint_in_model`).
        prefetch: offloaded blocks loaded ahead of the one running (the planner reserves room for them).
        context_length: tokens of KV cache the planner keeps room for on each GPU.
        batch_size: sequences of that length (the KV reserve scales with it).
        policy: where cpu blocks run when a GPU exists (`ExecutionPolicy` or "stream"/"local"); None: the
            planner's choice with a strategy, STREAM (accelerate's behaviour) with a dict map.
        keep_in_fp32_modules: modules kept in float32 whatever `dtype` says; None: transformers' default for
            the model (see `plan.dtypes.DtypeRule.for_model`).
        special_dtypes: tensor name -> dtype for those tensors (planned and loaded so).
        progress: show a progress bar (None: for long loads on a terminal).
        sources: where model tensors are when the checkpoint names or lays them out differently (see
            `load.sources.TensorSources`; `integrations.hf` builds one from transformers' conversion mapping).
        materialize: copy CPU-placed tensors into private memory instead of keeping them as views of the
            checkpoint files, for a checkpoint that may move or change, or for a first forward that must
            not wait on the disk after the page cache was dropped (costs the model's size in RAM).
        only: load only the tensors under these module names (a pipeline stage).
        quantize: "int8", "int4" or "int4:GROUP": the Linear layers of the model's blocks are swapped for
            `bigload.quant.QuantLinear`s before planning (so the plan sizes quantized bytes) and quantized
            while streaming; the output head, embeddings and norms stay as they are.
        quantize_skip: module names whose Linears stay unquantized.
        disk_reads: how disk blocks are brought in: "mapped" (in place from the page cache, zero-copy) or
            "read" (explicit reads into the slots, for disk blocks bigger than the memory left); None: decided
            from the CPU memory the plan leaves and shown in `explain()` (`reserve.choose_disk_reads`).

    Returns:
        `model`, weights in place, hooked, with `hf_device_map`, `bigload_plan` (the plan it runs) and
        `bigload_load` (the loader's `LoadResult`: bytes read, what went to disk).

    Raises:
        PlanError: the model does not fit, a dict map splits a tied group or misses a module, or a `Plan`
            made for another load.
        DeviceError: the plan names a GPU this machine does not have.
        CheckpointError: the checkpoint is malformed or (with `strict`) does not match the model.
        OffloadError: disk tensors without `offload_folder`, or a folder holding another checkpoint (or
            the same one under another quantization scheme).
        QuantizationError: an unknown scheme, a model without Linear layers, a Linear the scheme's
            kernels cannot run.
        BigloadError: the model is dispatched already (`bigload.detach(model)` first).
        All of these are raised before any weight is read.

    >>> with init_empty_weights():  # doctest: +SKIP
    ...     model = AutoModelForCausalLM.from_config(config)
    >>> load_checkpoint_and_dispatch(model, "llama/", device_map="auto", offload_folder="offload/")  # doctest: +SKIP
    """
    del offload_state_dict, preload_module_classes, full_state_dict, broadcast_from_rank0  # see the docstring
    check_not_attached(model)
    options = PlanOptions(
        dtype=dtype, max_memory=max_memory, offload_folder=offload_folder, context_length=context_length,
        batch_size=batch_size, prefetch=prefetch, policy=policy, keep_in_fp32_modules=keep_in_fp32_modules,
        special_dtypes=special_dtypes, no_split_module_classes=no_split_module_classes, disk_reads=disk_reads,
        offload_buffers=offload_buffers)
    load, planned = prepare_and_plan(model, checkpoint, device_map, options, quantize=quantize,
                                     quantize_skip=quantize_skip, sources=sources, only=only)
    result = load_plan(model, load.table, planned, load.inventory, offload_folder=offload_folder, strict=strict,
                       materialize=materialize, progress=progress, only=only,
                       label=None if isinstance(checkpoint, CheckpointIndex) else checkpoint)
    runtime = None
    if force_hooks or len({p.device for p in planned.placements}) > 1 or planned.offloaded or result.store is not None:
        runtime = attach(model, planned, store=result.store,
                         skip_keys=[skip_keys] if isinstance(skip_keys, str) else skip_keys)
    set_device_map(model, planned, runtime, device_map)
    model.bigload_load = result  # type: ignore[assignment]
    if runtime is not None:
        runtime.owned_attributes.append("bigload_load")
    return model


def set_device_map(model: nn.Module, planned: Plan, runtime: Runtime | None, given: Any = None) -> None:
    """Set what transformers and accelerate read (`hf_device_map`: the caller's own dict as given, values
    included, else the plan's map) and bigload's `bigload_plan`; `detach` drops both."""
    model.hf_device_map = dict(given) if isinstance(given, Mapping) else planned.device_map  # type: ignore[assignment]
    model.bigload_plan = planned  # type: ignore[assignment]
    if runtime is not None:
        runtime.owned_attributes.extend(["hf_device_map", "bigload_plan"])


def load_checkpoint_in_model(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | CheckpointIndex,
    device_map: Mapping[str, Any] | Plan | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    offload_state_dict: bool = False,
    offload_buffers: bool = False,
    keep_in_fp32_modules: Sequence[str] | None = None,
    offload_8bit_bnb: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
    *,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    materialize: bool = False,
    pin_memory: bool | None = None,
    progress: bool | None = None,
    only: Sequence[str] | None = None,
    sources: TensorSources | None = None,
    quantize: str | Quantization | None = None,
    quantize_skip: Sequence[str] | None = None,
) -> LoadResult:
    """Stream `checkpoint` into `model`, each tensor straight to its device (accelerate's function: no hooks).

    The map is planned as given (`plan_for_map`: where each entry runs, the int4 byte order of its blocks) and
    the load executes that plan, as `load_checkpoint_and_dispatch` does.

    Args:
        model: typically built under `init_empty_weights()`; its parameters are replaced, not copied into.
        checkpoint: a checkpoint file, index or folder (see `open_checkpoint`), or an already open index.
        device_map: transformers' format (`{"model.layers.0": 0, "lm_head": "cpu", "model.layers.9": "disk"}`,
            `""` for the whole model) or a bigload `Plan`; a tensor goes where its longest dotted prefix says.
            None puts everything on the CPU.
        dtype: cast floating-point tensors to this dtype; None casts them to the dtype the model was built
            with. Integer, bool, complex and float8 tensors are never cast (`plan.dtypes.DtypeRule`).
        offload_folder: where tensors mapped to "disk" go (a `DiskStore`). A store already there for the same
            checkpoint and dtypes is reused as is.
        offload_state_dict: accepted for accelerate compatibility and ignored: bigload never holds a whole
            state dict in memory, so there is nothing to offload while loading.
        offload_buffers: also send the buffers of offloaded modules to disk; by default they are loaded where
            their module runs, as accelerate keeps them in memory.
        keep_in_fp32_modules: module names (or name components, e.g. "wo") kept in float32. None:
            transformers' default for the model (its `_keep_in_fp32_modules` at float16,
            `_keep_in_fp32_modules_strict` at float16 and bfloat16), as the planner sizes them; accelerate
            keeps none unless given the list (pass `[]` for that).
        offload_8bit_bnb: accelerate's bitsandbytes 8-bit offload; bigload has none (True raises).
        strict: accelerate's default False: checkpoint tensors the model lacks are skipped with accelerate's
            warning naming them, and model tensors the checkpoint lacks stay on meta with a warning naming
            them (both returned in the LoadResult). True: either is an error, raised before any byte is read.
            Mis-shaped tensors are always an error (accelerate raises for them too).
        full_state_dict, broadcast_from_rank0: accelerate's options for sharded (DTensor) models loaded
            through `torch.distributed.checkpoint`; bigload loads plain tensors and every rank maps the files
            itself, so both are accepted and change nothing.
        special_dtypes: tensor name -> dtype for those tensors, whatever `dtype` says.
        window_bytes: cap on the bytes of temporaries in flight (cast results not yet placed, readahead,
            pinned staging for GPUs).
        materialize: copy CPU tensors into private memory instead of keeping memory-mapped views.
        pin_memory: pin the GPU staging buffers; None pins when the map names a GPU.
        progress: a progress bar over bytes; None shows it for loads over 1 GiB when stderr is a terminal.
        only: load only tensors under these module names (one pipeline stage of a bigger plan); the rest of
            the model is left alone and not reported.
        sources: where model tensors are when the checkpoint names or lays them out differently (renamed
            keys, per-expert tensors of a fused MoE weight); see `TensorSources`. None: matched by name.
        quantize: "int8", "int4" or "int4:GROUP" (see `bigload.quant`): the model's Linear layers (not the
            output head) become `QuantLinear`s and each weight is quantized as it streams in, one tensor at a
            time. A model already holding `QuantLinear`s is loaded into as it is.
        quantize_skip: module names whose Linears stay unquantized.

    Returns:
        LoadResult with the missing/unexpected/mismatched names, the disk store and what went to disk.

    Raises:
        DeviceError: the map names a GPU this machine lacks, or is not a dict (checked before reading).
        PlanError: a map that cannot place the model (a key naming no module, tensors on no entry, tied
            tensors split), or a `Plan` made for another load.
        CheckpointError: a malformed checkpoint, a strict mismatch, or a meta buffer that cannot be rebuilt.
        OffloadError: the map names disk without `offload_folder`, or the folder belongs to another
            checkpoint, dtype or quantization scheme, or cannot be written.
        QuantizationError: an unknown scheme, or a model it cannot apply to (see `bigload.quant`).
        BigloadError: the model is dispatched already (`bigload.detach(model)` first).

    >>> with init_empty_weights():  # doctest: +SKIP
    ...     model = LlamaForCausalLM(config)
    >>> result = load_checkpoint_in_model(model, "llama/", {"": "cpu"}, dtype=torch.bfloat16)  # doctest: +SKIP
    """
    del offload_state_dict, full_state_dict, broadcast_from_rank0  # see the docstring
    check_not_attached(model)
    if offload_8bit_bnb:
        raise OffloadError(
            "offload_8bit_bnb=True asks for bitsandbytes 8-bit offload, which bigload does not do; load without it "
            "(weights are offloaded in their dtype), or use accelerate for bitsandbytes models."
        )
    if window_bytes <= 0:
        raise BudgetError(f"window_bytes must be positive, got {window_bytes}.")
    if device_map is not None and not isinstance(device_map, Plan):
        device_map = getattr(device_map, "device_map", device_map)  # anything carrying a map (a HostPlan's plan)
    if device_map is not None and not isinstance(device_map, (Plan, Mapping)):
        raise DeviceError(
            f"device_map={device_map!r} must be planned first: load_checkpoint_in_model takes a dict of module name "
            "to device (or a bigload Plan); plan a strategy with bigload.plan_model, or use load_checkpoint_and_dispatch."
        )
    options = PlanOptions(dtype=dtype, keep_in_fp32_modules=keep_in_fp32_modules, special_dtypes=special_dtypes,
                          offload_buffers=offload_buffers)
    load, planned = prepare_and_plan(model, checkpoint, device_map, options, quantize=quantize,
                                     quantize_skip=quantize_skip, sources=sources, only=only)
    return load_plan(model, load.table, planned, load.inventory, offload_folder=offload_folder, strict=strict,
                     materialize=materialize, window_bytes=window_bytes, pin_memory=pin_memory, progress=progress,
                     only=only, label=None if isinstance(checkpoint, CheckpointIndex) else checkpoint)


def plan_for_model(
    model: nn.Module,
    strategy: str = "auto",
    *,
    max_memory: Mapping[int | str, int | str] | None = None,
    no_split_module_classes: Sequence[str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    prefetch: int = 1,
    context_length: int | None = None,
    batch_size: int = 1,
    keep_in_fp32_modules: Sequence[str] | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    policy: ExecutionPolicy | str | None = None,
    headroom: int | str | Mapping[Any, int | str] | None = None,
    disk_reads: DiskReads | str | None = None,
    offload_buffers: bool = False,
) -> Plan:
    """Plan an `nn.Module` you built (meta is fine): inventory -> budget -> plan, without reading a weight.

    The three planning entry points: this one for a module in hand; `bigload.plan_model` for what a name
    points to (catalog name, model folder, config.json, checkpoint headers); `bigload.plan.plan` for an
    `Inventory` and `Budget` you built yourself (pure, no probing).

    `max_memory=None` plans for what this machine has free now; an `offload_folder` with no "disk" entry
    in `max_memory` contributes its free space as the disk budget. `headroom` is kept free per device (see
    `PlanOptions`; None: max(1 GiB, 5 %) on each GPU). The other keywords are `load_checkpoint_and_dispatch`'s.
    """
    options = PlanOptions(
        strategy=strategy, dtype=dtype, max_memory=max_memory, offload_folder=offload_folder,
        context_length=context_length, batch_size=batch_size, prefetch=prefetch, policy=policy,
        keep_in_fp32_modules=keep_in_fp32_modules, special_dtypes=special_dtypes,
        no_split_module_classes=no_split_module_classes, headroom=headroom, disk_reads=disk_reads,
        offload_buffers=offload_buffers)
    inventory = inventory_from_module(model, rule=rule_for(model, options),
                                      no_split_module_classes=options.no_split_module_classes)
    return plan(inventory, detect_budget(options.max_memory, offload_folder=options.offload_folder), options)
