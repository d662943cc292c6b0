"""accelerate's dispatching names for a model whose weights are already real: plan the map, place the weights,
hook.

`dispatch_model` plans the caller's map (`plan_for_map`: where each block runs, the slots, how disk blocks come
in), moves each tensor to its home (`Plan.home_of`), writes disk tensors into a `DiskStore`, and attaches the
runtime; `cpu_offload` and `disk_offload` build accelerate's per-module map and dispatch it. Each keeps
accelerate's keyword arguments and sets `model.hf_device_map` as transformers does.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from bigload.devices import CPU, Budget, Device, DeviceKind, DeviceLike, ExecutionPolicy
from bigload.errors import OffloadError
from bigload.integrations.loading import set_device_map
from bigload.integrations.prepare import check_devices
from bigload.load.folder import check_offload_folder, model_folder
from bigload.load.store import DiskStore, StoreOrigin
from bigload.load.store_writer import StoreWriter
from bigload.plan.budget import check_devices_exist, detect_budget
from bigload.plan.given import check_plan, check_tied, plan_for_map
from bigload.plan.inventory import inventory_from_module
from bigload.plan.options import PlanOptions
from bigload.plan.value import Plan
from bigload.runtime.runtime import attach, check_not_attached, detach
from bigload.runtime.weights import HostWeights
from bigload.tensors import Registration, owner_of, tensor_groups

__all__ = ["cpu_offload", "detach", "disk_offload", "dispatch_model", "remove_hook_from_submodules",
           "validate_device_map"]

DeviceMap = Mapping[str, DeviceLike]


def validate_device_map(model: nn.Module, device_map: DeviceMap, *, gpu_count: int | None = None,
                        tied_groups: Iterable[Sequence[str]] = ()) -> dict[str, Device]:
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
    planned = plan_for_map(inventory_from_module(model), device_map, Budget.of({}))
    placed = {p.name: p.device for p in planned.placements}
    check_devices_exist(placed.values(), gpu_count=gpu_count)
    for names in tied_groups:
        check_tied(names, placed)
    return placed


def dispatch_model(
    model: nn.Module,
    device_map: DeviceMap | Plan,
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
    policy: ExecutionPolicy | str | None = None,
) -> nn.Module:
    """Spread a model whose weights are real (on the CPU) over GPUs, CPU and disk, and hook it.

    GPU blocks move to their GPU; cpu blocks stay in host memory (running on the main device or the CPU,
    as `policy` says); disk blocks are written to a `DiskStore` in `offload_dir` and dropped from memory.

    Args:
        model: the model, weights real (or on meta for blocks whose weights `state_dict` / `offload_index`
            provide).
        device_map: transformers' format, in execution order, e.g. `{"model.embed_tokens": 0, ...}`, or a
            bigload `Plan` for this model.
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
        policy: where cpu blocks run when a GPU exists (`STREAM` to it, the default as in accelerate, or `LOCAL`
            on the CPU).

    Returns:
        `model`, with `hf_device_map` and `bigload_plan` set.

    Raises:
        PlanError, DeviceError: the map cannot place this model (checked before anything moves).
        OffloadError: the map has disk blocks but no `offload_dir`, or a tensor of a block kept where it runs has
            no data (meta).
        BigloadError: the model is dispatched already (`bigload.detach(model)` first).

    >>> dispatch_model(model, {"embed": "cpu", "body": "disk", "head": "cpu"}, offload_dir="off/")  # doctest: +SKIP
    """
    del preload_module_classes  # see the docstring
    check_not_attached(model)
    options = PlanOptions(prefetch=prefetch, policy=policy, offload_buffers=offload_buffers, main_device=main_device)
    inventory = inventory_from_module(model)
    if isinstance(device_map, Plan):
        check_plan(device_map, inventory)
        planned = device_map
    else:
        planned = plan_for_map(inventory, device_map, detect_budget(None), options)
    check_devices(planned, None)
    _check_resident_data(model, planned, state_dict is not None)
    devices = {p.device for p in planned.placements}
    uses_disk = DeviceKind.DISK in {device.kind for device in devices}
    if uses_disk and offload_dir is None:
        raise OffloadError(
            "the device map puts blocks on 'disk' but no offload_dir was given; pass offload_dir=<folder> "
            "with room for the disk blocks' weights."
        )
    if uses_disk and offload_index is None and (source := model_folder(model)) is not None:
        check_offload_folder(offload_dir, source, keyword="offload_dir")  # type: ignore[arg-type]
    if len(devices) == 1 and not planned.offloaded and not force_hooks:
        model.to(next(iter(devices)).torch_device())
        set_device_map(model, planned, None, device_map)
        return model
    _move_home(model, planned)
    store = None
    if offload_dir is not None and planned.offloaded:
        store = (DiskStore.open(offload_dir) if offload_index is not None
                 else _write_disk_tensors(model, planned, Path(offload_dir)))
    runtime = attach(model, planned, store=store, host_weights=HostWeights(state_dict) if state_dict is not None else None,
                     skip_keys=[skip_keys] if isinstance(skip_keys, str) else skip_keys)
    set_device_map(model, planned, runtime, device_map)
    return model


def _check_resident_data(model: nn.Module, planned: Plan, state_dict_given: bool) -> None:
    """Refuse a tensor with no data (meta) in a block the plan keeps where it runs: nothing would ever fill it,
    and torch would fail in the first forward. (Offloaded blocks' tensors are checked against their weight
    sources, `state_dict` and the store, by `runtime.blocks`.)"""
    for group in tensor_groups(model):
        placement = planned.placement_of(group.names[0])
        if group.tensor.device.type != "meta" or placement is None or placement.offloaded:
            continue
        unused = (" (state_dict= supplies the blocks offloaded to host memory, which run on a GPU; this one runs "
                  "where it is kept)" if state_dict_given else "")
        raise OffloadError(
            f"tensor {group.names[0]!r} is on the meta device (no data), and the map keeps block "
            f"{placement.name or '(whole model)'!r} on {placement.device}, where it runs{unused}. dispatch_model "
            "places weights that are loaded already: load them first (load_checkpoint_and_dispatch(model, checkpoint, "
            "device_map=...) loads and dispatches in one step, or model.load_state_dict(state_dict, assign=True))."
        )


def _move_home(model: nn.Module, planned: Plan) -> None:
    """Move every real tensor whose home is a GPU there, once per tensor (tied weights stay one object)."""
    for group in tensor_groups(model):
        home = planned.home_of(group.names[0], buffer=not group.sites[0].is_parameter)
        tensor = group.tensor
        if home is None or not home.is_gpu or tensor.device.type == "meta":
            continue
        value = Registration.of(tensor).wrap(tensor.data.to(home.torch_device()))
        for site in group.sites:
            site.set(value)


def _write_disk_tensors(model: nn.Module, planned: Plan, folder: Path) -> DiskStore | None:
    """Write the real tensors whose home is disk into a DiskStore in `folder` (accelerate's layout)."""
    writer = StoreWriter(folder, overwrite=True)
    digest = hashlib.sha256()
    with writer:
        for group in tensor_groups(model):
            names, tensor = group.names, group.tensor
            home = planned.home_of(names[0], buffer=not group.sites[0].is_parameter)
            if home is None or home.kind is not DeviceKind.DISK:
                continue
            if tensor.device.type == "meta":
                raise OffloadError(
                    f"tensor {names[0]!r} is on the meta device, so there is nothing to write to {folder}; load "
                    "the checkpoint first (load_checkpoint_and_dispatch), or pass offload_index for weights "
                    "already offloaded there."
                )
            writer.put(names[0], tensor)
            digest.update(f"{names[0]}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        return writer.commit(StoreOrigin(digest.hexdigest(), source=f"dispatch_model({type(model).__name__})"))


def _offload_blocks(model: nn.Module, preload_module_classes: Sequence[str] | None) -> list[str]:
    """accelerate's granularity for cpu_offload/disk_offload: each module with tensors of its own, except
    that a module of a `preload_module_classes` class is one block with all its children."""
    preload = set(preload_module_classes or ())
    blocks: list[str] = []
    whole: set[str] = set()
    for name, module in model.named_modules():
        if owner_of(name, whole) not in (None, name):
            continue  # inside a preloaded module
        if type(module).__name__ in preload:
            whole.add(name)
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
    return dispatch_model(model, device_map, main_device=device, state_dict=state_dict, offload_buffers=offload_buffers,
                          force_hooks=True, prefetch=prefetch, policy=ExecutionPolicy.STREAM)


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
    return dispatch_model(model, device_map, main_device=device, offload_dir=offload_dir,
                          offload_index={} if already else None, offload_buffers=offload_buffers, force_hooks=True,
                          prefetch=prefetch)


def remove_hook_from_submodules(module: nn.Module) -> nn.Module:
    """accelerate's name for `detach`: remove bigload's hooks; offloaded weights come back to the CPU."""
    return detach(module)
