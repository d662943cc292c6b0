"""Short compositions with accelerate's names: plan, stream, hook.

`load_checkpoint_and_dispatch` reads like the pipeline: plan where each block goes (or check the map the
caller gave), stream the checkpoint straight there, attach the runtime hooks. `dispatch_model`,
`cpu_offload` and `disk_offload` do the same for a model whose weights are already real. Each keeps
accelerate's keyword arguments and sets `model.hf_device_map` as transformers does; the work happens in
`plan`, `stream`, `store` and `hooks`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from bigload.devices import CPU, Device, DeviceKind, DeviceLike, ExecutionPolicy
from bigload.errors import DeviceError, OffloadError, PlanError
from bigload.runtime.hooks import (
    HostWeights,
    Runtime,
    attach,
    detach,
)
from bigload.sizes import parse_dtype
from bigload.plan.budget import check_cgroup_room, check_devices_exist, detect_budget, parse_max_memory
from bigload.plan.inventory import DtypeRule, Inventory, inventory_from_module
from bigload.plan.planner import STRATEGIES, Plan, PlanOptions, plan
from bigload.plan.reserve import DiskReads, choose_disk_reads
from bigload.load.folder import check_offload_folder, model_folder
from bigload.load.store import DiskStore, StoreOrigin, StoreWriter
from bigload.formats.checkpoint import CheckpointIndex, open_checkpoint
from bigload.quant import Quantization
from bigload.load.stream import SourcePlan, gpu_cast_bytes, load_checkpoint_in_model, prepare_quantization, source_dtypes
from bigload.tensors import owner_of, tensor_groups

__all__ = [
    "cpu_offload",
    "detach",
    "disk_offload",
    "dispatch_model",
    "load_checkpoint_and_dispatch",
    "plan_for_model",
    "remove_hook_from_submodules",
    "validate_device_map",
]

logger = logging.getLogger(__name__)

DeviceMap = Mapping[str, DeviceLike]


# --------------------------------------------------------------------------------------------------
# Checking a device map against a model, before any byte is read


def validate_device_map(
    model: nn.Module,
    device_map: DeviceMap,
    *,
    gpu_count: int | None = None,
    tied_groups: Iterable[Sequence[str]] = (),
) -> dict[str, Device]:
    """Check that `device_map` can place `model`: raise before anything is read or moved.

    Args:
        model: the model (meta or real).
        device_map: transformers' format, module name -> GPU index, "cpu" or "disk".
        gpu_count: GPUs on this machine (default: `torch.cuda.device_count()`).
        tied_groups: extra groups of tensor names that must share a device (the model's own ties, found by
            identity, are always checked; pass transformers' `_tied_weights_keys` pairs for a meta model
            whose ties are not made yet).

    Returns:
        The map's values parsed into `Device`s.

    Raises:
        PlanError: a key names no module, a tensor is on no key, or a tied group spans devices.
        DeviceError: a value is no device, or names a GPU this machine does not have.
    """
    if not device_map:
        raise PlanError("the device map is empty; map at least '' (the whole model) to a device.")
    placed = {key: Device.parse(value) for key, value in device_map.items()}
    check_devices_exist(placed.values(), gpu_count=gpu_count)
    keys = list(device_map)
    _check_keys_exist(model, keys)
    groups = [list(group.names) for group in tensor_groups(model)]
    uncovered = [names[0] for names in groups if all(owner_of(name, placed) is None for name in names)]
    if uncovered:
        raise PlanError(
            f"the device map places no module holding {len(uncovered)} tensor(s), e.g. {uncovered[:3]}; add "
            f"their modules (e.g. {_module_of(uncovered[0])!r}) to the map, or map '' for the rest."
        )
    for names in [*groups, *(list(group) for group in tied_groups)]:
        _check_tied(names, placed)
    return placed


def _module_of(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def _check_keys_exist(model: nn.Module, keys: Sequence[str]) -> None:
    modules = {name for name, _ in model.named_modules()}
    for key in keys:
        if key in modules:
            continue
        raise PlanError(
            f"device-map key {key!r} names no module of {type(model).__name__}; keys are module names such as "
            f"{sorted(modules - {''})[:3]}."
        )


def _check_tied(names: Sequence[str], placed: Mapping[str, Device]) -> None:
    devices = {name: placed[owner] for name in names if (owner := owner_of(name, placed)) is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise PlanError(
            f"tied weights would be split across devices ({where}); a tied group must live on one device. "
            "Map the modules holding them to the same device."
        )


# --------------------------------------------------------------------------------------------------
# Placing real weights


def _move_resident(model: nn.Module, device_map: DeviceMap, placed: Mapping[str, Device]) -> None:
    """Move the tensors of GPU blocks to their GPU, once per tensor (tied weights stay one object)."""
    for group in tensor_groups(model):
        owner = owner_of(group.names[0], placed)
        if owner is None or not placed[owner].is_gpu:
            continue
        tensor = group.tensor
        moved = tensor.data.to(placed[owner].torch_device())
        value = nn.Parameter(moved, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else moved
        for site in group.sites:
            site.set(value)


def _write_disk_blocks(model: nn.Module, device_map: DeviceMap, placed: Mapping[str, Device], folder: Path,
                       offload_buffers: bool) -> DiskStore:
    """Write the real tensors of disk blocks into a DiskStore in `folder` (accelerate's layout)."""
    keys = list(device_map)
    disk_keys = {key for key in keys if placed[key].kind is DeviceKind.DISK}
    writer = StoreWriter(folder, overwrite=True)
    digest = hashlib.sha256()
    with writer:
        for group in tensor_groups(model):
            names, tensor = group.names, group.tensor
            if owner_of(names[0], placed) not in disk_keys:
                continue
            if not offload_buffers and not isinstance(tensor, nn.Parameter):
                continue  # buffers of offloaded blocks stay on the execution device (hooks.attach)
            if tensor.device.type == "meta":
                raise OffloadError(
                    f"tensor {names[0]!r} is on the meta device, so there is nothing to write to {folder}; load "
                    "the checkpoint first (load_checkpoint_and_dispatch), or pass offload_index for weights "
                    "already offloaded there."
                )
            writer.put(names[0], tensor)
            digest.update(f"{names[0]}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        return writer.commit(StoreOrigin(digest.hexdigest(), source=f"dispatch_model({type(model).__name__})"))


def _main_device(placed: Mapping[str, Device], main_device: DeviceLike | None) -> Device:
    """accelerate's rule: the first GPU of the map, or the CPU when the map has none."""
    if main_device is not None:
        return Device.parse(main_device)
    gpus = [device for device in placed.values() if device.is_gpu]
    return gpus[0] if gpus else CPU


def _set_device_map(model: nn.Module, device_map: DeviceMap, runtime: Runtime | None) -> None:
    model.hf_device_map = dict(device_map)  # type: ignore[assignment]
    if runtime is not None:
        runtime.owned_attributes.append("hf_device_map")


# --------------------------------------------------------------------------------------------------
# Entry points


def dispatch_model(
    model: nn.Module,
    device_map: DeviceMap,
    main_device: DeviceLike | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    offload_dir: str | os.PathLike[str] | None = None,
    offload_index: Mapping[str, Any] | None = None,
    offload_buffers: bool = False,
    skip_keys: str | Sequence[str] | None = None,
    preload_module_classes: Sequence[str] | None = None,
    force_hooks: bool = False,
    *,
    prefetch: int = 1,
    policy: ExecutionPolicy = ExecutionPolicy.STREAM,
    execution_devices: Mapping[str, DeviceLike] | None = None,
) -> nn.Module:
    """Spread a model whose weights are real (on the CPU) over GPUs, CPU and disk, and hook it.

    GPU blocks move to their GPU; cpu blocks stay in host memory (running on the main device or the CPU,
    as `policy` says); disk blocks are written to a `DiskStore` in `offload_dir` and dropped from memory.

    Args:
        model: the model, weights real (or on meta for blocks whose weights `state_dict` / `offload_index`
            provide).
        device_map: transformers' format, in execution order, e.g. `{"model.embed_tokens": 0, ...}`.
        main_device: where offloaded blocks run; default the map's first GPU, else the CPU.
        state_dict: weights of the cpu blocks (accelerate's meaning), used instead of the model's.
        offload_dir: the folder disk blocks go to (required when the map has "disk").
        offload_index: the disk blocks are already in `offload_dir` (accelerate's or bigload's folder).
        offload_buffers: offload buffers of offloaded blocks too, instead of keeping them resident.
        skip_keys: forward keyword arguments never moved between devices (default: cache arguments).
        preload_module_classes: accepted for accelerate compatibility; bigload materializes a whole block
            before it runs, so modules that read their children's weights directly always find them.
        force_hooks: hook the model even when it all fits on one device.
        prefetch: blocks loaded ahead of the one running.
        policy: where cpu blocks run when a GPU exists (`STREAM` to it, or `LOCAL` on the CPU).
        execution_devices: per-block execution devices (a `Plan`'s), overriding `main_device`/`policy`.

    Returns:
        `model`, with `hf_device_map` set.

    Raises:
        PlanError, DeviceError: the map cannot place this model (checked before anything moves).
        OffloadError: the map has disk blocks but no `offload_dir`.

    >>> dispatch_model(model, {"embed": "cpu", "body": "disk", "head": "cpu"}, offload_dir="off/")  # doctest: +SKIP
    """
    placed = validate_device_map(model, device_map)
    main = _main_device(placed, main_device)
    uses_disk = any(device.kind is DeviceKind.DISK for device in placed.values())
    if uses_disk and offload_dir is None:
        raise OffloadError(
            "the device map puts blocks on 'disk' but no offload_dir was given; pass offload_dir=<folder> "
            "with room for the disk blocks' weights."
        )
    if uses_disk and offload_index is None and (source := model_folder(model)) is not None:
        check_offload_folder(offload_dir, source, keyword="offload_dir")  # type: ignore[arg-type]
    single = set(placed.values())
    if len(single) == 1 and not uses_disk and not force_hooks and main == next(iter(single)):
        model.to(main.torch_device())
        _set_device_map(model, device_map, None)
        return model
    _move_resident(model, device_map, placed)
    store = None
    if uses_disk:
        folder = Path(offload_dir)  # type: ignore[arg-type]
        if offload_index is not None:
            store = DiskStore.open(folder)
        else:
            store = _write_disk_blocks(model, device_map, placed, folder, offload_buffers)
    host = HostWeights(state_dict) if state_dict is not None else None
    runtime = attach(
        model,
        device_map,
        execution_device=execution_devices if execution_devices is not None else main,
        store=store,
        host_weights=host,
        prefetch=prefetch,
        skip_keys=[skip_keys] if isinstance(skip_keys, str) else skip_keys,
        offload_buffers=offload_buffers,
        policy=policy,
    )
    _set_device_map(model, device_map, runtime)
    return model


@dataclass(frozen=True)
class _Placement:
    """Where blocks go and run: from a Plan, or from a dict map the caller gave (execution left to hooks)."""

    device_map: dict[str, int | str]
    execution_devices: Mapping[str, Device] | None
    prefetch: int
    plan: Any = None  # the bigload Plan, when there is one
    inventory: Inventory | None = None  # what it was planned from: the loader places each tensor in its dtype
    disk_reads: DiskReads | None = None  # a dict map's (a Plan carries its own in `slots.reads`)


def load_checkpoint_and_dispatch(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | CheckpointIndex,
    device_map: str | DeviceMap | Any | None = None,
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
    sources: SourcePlan | None = None,
    materialize: bool = False,
    only: Sequence[str] | None = None,
    quantize: str | Quantization | None = None,
    quantize_skip: Sequence[str] | None = None,
    disk_reads: DiskReads | str | None = None,
) -> nn.Module:
    """Plan, stream, hook: load `checkpoint` into a model built with `init_empty_weights()` and dispatch it.

    Args:
        model: built on meta (`init_empty_weights()`); weights are streamed straight to their device.
        checkpoint: a safetensors/`.bin` file, a sharded folder or its index (or an open `CheckpointIndex`).
        device_map: "auto", "balanced", "balanced_low_0", "sequential" (planned by bigload), a dict in
            transformers' format, a bigload `Plan`, or None (everything on the CPU, no hooks).
        max_memory: per-device budgets for planning, e.g. `{0: "20GiB", "cpu": "60GiB"}`.
        no_split_module_classes: module classes the planner keeps whole (e.g. `["LlamaDecoderLayer"]`).
        offload_folder: where "disk" tensors go (a `DiskStore`, accelerate's layout).
        offload_buffers: offload the buffers of offloaded blocks too.
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
        policy: where cpu blocks run when a GPU exists (`ExecutionPolicy` or "stream"/"local"): passed to the
            planner with a strategy string; with a dict map, None means STREAM (accelerate's behaviour).
        keep_in_fp32_modules: modules kept in float32 whatever `dtype` says; None: transformers' default for
            the model (see `inventory.DtypeRule.for_model`).
        special_dtypes: tensor name -> dtype for those tensors (planned and loaded so).
        progress: show a progress bar (None: for long loads on a terminal).
        sources: where model tensors are when the checkpoint names or lays them out differently (see
            `bigload.load.stream.SourcePlan`; `bigload.integrations.hf` builds one from transformers' conversion mapping).
        materialize: copy CPU-placed tensors into private memory instead of keeping them as views of the
            checkpoint files, for a checkpoint that may move or change, or for a first forward that must
            not wait on the disk after the page cache was dropped (costs the model's size in RAM).
        only: load only the tensors under these module names (a pipeline stage; see `load_checkpoint_in_model`).
        quantize: "int8", "int4" or "int4:GROUP": the Linear layers of the model's blocks are swapped for
            `bigload.quant.QuantLinear`s before planning (so the plan sizes quantized bytes) and quantized
            while streaming; the output head, embeddings and norms stay as they are.
        quantize_skip: module names whose Linears stay unquantized.
        disk_reads: how disk blocks are brought in: "mapped" (in place from the page cache, zero-copy) or
            "read" (explicit reads into the slots, for disk blocks bigger than the memory left); None: decided
            from the CPU budget (`max_memory`'s, else what the machine has available) and shown in
            `explain()`, see `reserve.choose_disk_reads`.

    Returns:
        `model`, weights in place, hooked, `hf_device_map` set (and `bigload_plan` when planned), and
        `bigload_load`: the loader's `LoadResult` (bytes read, what went to disk).

    Raises:
        PlanError: the model does not fit, or a dict map splits a tied group or misses a module.
        DeviceError: a dict map names a GPU this machine does not have.
        CheckpointError: the checkpoint is malformed or (with `strict`) does not match the model.
        OffloadError: disk tensors without `offload_folder`, or a folder holding another checkpoint (or
            the same one under another quantization scheme).
        QuantizationError: an unknown scheme, a model without Linear layers, a Linear the scheme's
            kernels cannot run.
        All of these are raised before any weight is read.

    >>> with init_empty_weights():  # doctest: +SKIP
    ...     model = AutoModelForCausalLM.from_config(config)
    >>> load_checkpoint_and_dispatch(model, "llama/", device_map="auto", offload_folder="offload/")  # doctest: +SKIP
    """
    del offload_state_dict, preload_module_classes, full_state_dict, broadcast_from_rank0  # see the docstring
    # Quantization is decided before planning (the plan sizes quantized bytes) and before the checkpoint is
    # opened (a bad scheme is reported first).
    prepare_quantization(model, quantize, quantize_skip,
                         rule=DtypeRule.for_model(model, dtype, special_dtypes, keep_in_fp32_modules))
    index = checkpoint if isinstance(checkpoint, CheckpointIndex) else open_checkpoint(checkpoint)
    options = PlanOptions(
        dtype=dtype, max_memory=max_memory, offload_folder=offload_folder, context_length=context_length,
        batch_size=batch_size, prefetch=prefetch, policy=policy, keep_in_fp32_modules=keep_in_fp32_modules,
        special_dtypes=special_dtypes, no_split_module_classes=no_split_module_classes, disk_reads=disk_reads,
        cast_bytes=gpu_cast_bytes(index, parse_dtype(dtype) if dtype is not None else None))
    placement = _place(model, device_map, options, source_dtypes(index, sources))
    placed = validate_device_map(model, placement.device_map)
    result = load_checkpoint_in_model(
        model, index, placement.device_map, dtype=dtype, offload_folder=offload_folder, strict=strict,
        offload_buffers=offload_buffers, keep_in_fp32_modules=keep_in_fp32_modules, special_dtypes=special_dtypes,
        progress=progress, sources=sources, materialize=materialize, inventory=placement.inventory, only=only,
        quantize=quantize, quantize_skip=quantize_skip,
    )
    store = result.store
    runtime = None
    if force_hooks or len(set(placed.values())) > 1 or store is not None:
        main = _main_device(placed, None)
        runtime = attach(
            model, placement.device_map,
            execution_device=placement.execution_devices or main,
            store=store, prefetch=placement.prefetch,
            skip_keys=[skip_keys] if isinstance(skip_keys, str) else skip_keys,
            offload_buffers=offload_buffers,
            policy=options.policy or ExecutionPolicy.STREAM,
            slots=placement.plan.slots if placement.plan is not None else None,
            disk_reads=placement.disk_reads,
        )
    _set_device_map(model, placement.device_map, runtime)
    model.bigload_load = result  # type: ignore[assignment]
    if placement.plan is not None:
        model.bigload_plan = placement.plan  # type: ignore[assignment]
    if runtime is not None:
        runtime.owned_attributes.extend(["bigload_load", "bigload_plan"][: 2 if placement.plan is not None else 1])
    return model


def _place(model: nn.Module, device_map: Any, options: PlanOptions,
           stored_dtypes: Mapping[str, torch.dtype]) -> _Placement:
    """Where blocks go and run: planned for a strategy string, else the caller's map or Plan."""
    if device_map is None:
        return _Placement({"": "cpu"}, None, options.prefetch)
    if isinstance(device_map, (int, torch.device)) or (isinstance(device_map, str) and device_map not in STRATEGIES):
        # transformers accepts one device for the whole model ("cpu", "cuda:1", 0); so do we.
        try:
            return _Placement({"": Device.parse(device_map).key}, None, options.prefetch)
        except DeviceError:
            raise PlanError(
                f"device_map={device_map!r} is neither a strategy ({', '.join(STRATEGIES)}) nor a device "
                "(0, 'cuda:N', 'cpu'); pass one of those or a dict such as {'': 'cpu'}."
            ) from None
    if isinstance(device_map, str):
        if options.max_memory is not None:
            # Loading, unlike a dry run, needs every GPU the budget names to be here, and the CPU memory.
            given = parse_max_memory(options.max_memory)
            check_devices_exist(given)
            check_cgroup_room(given)
        inventory = _inventory(model, options, stored_dtypes)
        planned = _plan_inventory(inventory, options.with_settings(strategy=device_map))
        return _Placement(dict(planned.device_map), dict(planned.execution_devices), planned.prefetch, planned,
                          inventory)
    if isinstance(device_map, Mapping):
        reads = _map_disk_reads(model, device_map, options, stored_dtypes)
        return _Placement(dict(device_map), None, options.prefetch, disk_reads=reads)
    return _from_plan(device_map)


def _map_disk_reads(model: nn.Module, device_map: DeviceMap, options: PlanOptions,
                    stored_dtypes: Mapping[str, torch.dtype]) -> DiskReads | None:
    """How a dict map's disk blocks are brought in: as asked, else `choose_disk_reads` from the bytes placed on
    disk and the CPU budget (`max_memory`'s, else available memory) minus the bytes placed on the CPU."""
    if options.disk_reads is not None:
        return options.disk_reads
    placed = {key: Device.parse(value) for key, value in device_map.items()}
    if not any(device.kind is DeviceKind.DISK for device in placed.values()):
        return None
    inventory = _inventory(model, options, stored_dtypes)
    on: dict[DeviceKind, int] = {}
    for tensor in inventory.tensors:
        owner = owner_of(tensor.name, placed)
        if owner is not None:
            on[placed[owner].kind] = on.get(placed[owner].kind, 0) + tensor.nbytes
    cpu = detect_budget(options.max_memory).get(CPU)
    reads, reason = choose_disk_reads(on.get(DeviceKind.DISK, 0), cpu - on.get(DeviceKind.CPU, 0))
    logger.info("bigload: %s", reason)
    return reads


def _inventory(model: nn.Module, options: PlanOptions, stored_dtypes: Mapping[str, torch.dtype] | None) -> Inventory:
    return inventory_from_module(
        model, dtype=options.dtype, no_split_module_classes=options.no_split_module_classes,
        keep_in_fp32_modules=options.keep_in_fp32_modules, special_dtypes=options.special_dtypes,
        stored_dtypes=stored_dtypes)


def _plan_inventory(inventory: Inventory, options: PlanOptions) -> Plan:
    """The budget (probed here when `max_memory` is None: the planner never probes), then the plan."""
    budget = detect_budget(options.max_memory, offload_folder=options.offload_folder)
    return plan(inventory, budget, options)


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
    headroom: int | str | Mapping[DeviceLike, int | str] | None = None,
    disk_reads: DiskReads | str | None = None,
) -> Plan:
    """Plan an `nn.Module` you built (meta is fine): inventory -> budget -> plan, without reading a weight.

    The three planning entry points: this one for a module in hand; `bigload.plan_model` for what a name
    points to (catalog name, model folder, config.json, checkpoint headers); `bigload.plan.planner.plan` for an
    `Inventory` and `Budget` you built yourself (pure, no probing).

    `max_memory=None` plans for what this machine has free now; an `offload_folder` with no "disk" entry
    in `max_memory` contributes its free space as the disk budget. `headroom` is kept free per device (see
    `PlanOptions`; None: max(1 GiB, 5 %) on each GPU). The other keywords are `load_checkpoint_and_dispatch`'s.
    """
    options = PlanOptions(
        strategy=strategy, dtype=dtype, max_memory=max_memory, offload_folder=offload_folder,
        context_length=context_length, batch_size=batch_size, prefetch=prefetch, policy=policy,
        keep_in_fp32_modules=keep_in_fp32_modules, special_dtypes=special_dtypes,
        no_split_module_classes=no_split_module_classes, headroom=headroom, disk_reads=disk_reads)
    return _plan_inventory(_inventory(model, options, None), options)


def _from_plan(planned: Any) -> _Placement:
    """A Plan's map, execution devices and prefetch depth: the hooks hold exactly what it reserved."""
    return _Placement(dict(planned.device_map), dict(planned.execution_devices), planned.prefetch, planned)


def _offload_blocks(model: nn.Module, preload_module_classes: Sequence[str] | None) -> list[str]:
    """accelerate's granularity for cpu_offload/disk_offload: each module with tensors of its own, except
    that a module of a `preload_module_classes` class is one block with all its children."""
    preload = set(preload_module_classes or ())
    blocks: list[str] = []
    whole: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in whole):
            continue
        if type(module).__name__ in preload:
            whole.append(name)
            blocks.append(name)
        elif module._parameters or module._buffers:
            blocks.append(name)
    return blocks


def _default_execution_device() -> Device:
    return Device.parse(0) if torch.cuda.is_available() else CPU


def cpu_offload(
    model: nn.Module,
    execution_device: DeviceLike | None = None,
    offload_buffers: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    preload_module_classes: Sequence[str] | None = None,
    *,
    prefetch: int = 1,
) -> nn.Module:
    """Keep every weight in host memory and run the model on `execution_device`, one module at a time.

    Each module with weights of its own is a block (a `preload_module_classes` module is one block with its
    children); its weights are copied to the execution device just before it runs, the next `prefetch`
    blocks are copied meanwhile, and they are released afterwards. On the CPU the weights are used where
    they are: nothing is copied.

    Args:
        model: the model, weights real on the CPU (or on meta with `state_dict` holding them).
        execution_device: default GPU 0 when there is one, else the CPU.
        offload_buffers: offload buffers too (else they move to the execution device for good).
        state_dict: the weights to use instead of the model's own.
        preload_module_classes: class names of modules that read their children's weights directly.
        prefetch: blocks copied ahead of the one running.

    Returns:
        `model`, hooked.
    """
    device = Device.parse(execution_device) if execution_device is not None else _default_execution_device()
    if state_dict is not None and not device.is_gpu:
        model.load_state_dict(dict(state_dict), strict=False, assign=True)
        state_dict = None
    device_map = {name: "cpu" for name in _offload_blocks(model, preload_module_classes)}
    return dispatch_model(
        model, device_map, main_device=device, state_dict=state_dict, offload_buffers=offload_buffers,
        force_hooks=True, prefetch=prefetch, policy=ExecutionPolicy.STREAM,
    )


def disk_offload(
    model: nn.Module,
    offload_dir: str | os.PathLike[str],
    execution_device: DeviceLike | None = None,
    offload_buffers: bool = False,
    preload_module_classes: Sequence[str] | None = None,
    *,
    prefetch: int = 1,
) -> nn.Module:
    """Write every weight to `offload_dir` and run the model on `execution_device`, one module at a time.

    Like `cpu_offload`, with the weights read from memory-mapped files: on the CPU they are used in place
    (the prefetcher faults in the next blocks' pages), on a GPU they go through pinned staging buffers.
    If `offload_dir` already holds a store with the model's weights, it is used as is.

    Args:
        model: the model, weights real (or on meta when `offload_dir` already holds them).
        offload_dir: the folder for the weights (accelerate's layout).
        execution_device: default GPU 0 when there is one, else the CPU.
        offload_buffers: offload buffers too.
        preload_module_classes: class names of modules that read their children's weights directly.
        prefetch: blocks loaded ahead of the one running.
    """
    device = Device.parse(execution_device) if execution_device is not None else _default_execution_device()
    device_map = {name: "disk" for name in _offload_blocks(model, preload_module_classes)}
    already = (Path(offload_dir) / "index.json").is_file() and any(
        tensor.device.type == "meta" for tensor in model.parameters()
    )
    return dispatch_model(
        model, device_map, main_device=device, offload_dir=offload_dir,
        offload_index={} if already else None, offload_buffers=offload_buffers, force_hooks=True,
        prefetch=prefetch,
    )


def remove_hook_from_submodules(module: nn.Module) -> nn.Module:
    """accelerate's name for `detach`: remove bigload's hooks; offloaded weights come back to the CPU."""
    return detach(module)
