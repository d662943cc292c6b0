"""The runtime beside others who change the model after dispatch: adapters added by peft, accelerate's hooks
from peft's re-dispatch, `model.to(...)`.

peft wraps layers of an attached model (LoRA's `lora_A`/`lora_B` beside the original layer, which becomes
`base_layer`) and moves the new weights to the device of the base weight: for an offloaded layer that is the
meta placeholder, so the weights would have no data. The runtime watches module and tensor registrations
(torch's global registration hooks: no monkeypatching) and, before the next forward or state-dict load, gives
every tensor added under a block a home: resident on the block's execution device (adapters are small)
(`adopt`). peft's re-dispatch may put accelerate's own offloading hooks on the model; they are taken back off
(`take_back_placement`). `model.to(...)` reaches every tensor but moves none of a block (`_apply_to_resident`).
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils.hooks import RemovableHandle

from bigload.errors import OffloadError
from bigload.runtime.merges import check_merges, track_adapter_layer, untrack_adapter_layer, wraps_offloaded_weight
from bigload.tensors import Registration, Site, owner_of, summarize_names, tensor_groups

if TYPE_CHECKING:
    from bigload.runtime.runtime import Runtime

__all__ = ["adopt", "forget", "take_back_placement", "watch_additions"]

logger = logging.getLogger(__name__)

_LIVE_RUNTIMES: "weakref.WeakValueDictionary[int, Runtime]" = weakref.WeakValueDictionary()
_WATCH_HANDLES: list[RemovableHandle] = []


def watch_additions(runtime: "Runtime") -> None:
    """Index the runtime's offloaded tensors and have registrations anywhere mark it changed."""
    for block in runtime.blocks.values():
        for entry in block.entries:
            runtime._placeholders.add(id(entry.placeholder))
            for site in entry.sites:
                runtime._offloaded_sites[(id(site.module), site.attr)] = (block.name, entry)
    for module in runtime.model.modules():
        runtime._members.add(module)
        if wraps_offloaded_weight(runtime, module):  # wrapped before dispatch (adapters.py)
            track_adapter_layer(runtime, module)
    runtime.handles.append(runtime.model.register_load_state_dict_pre_hook(
        functools.partial(_before_state_dict_load, runtime)))
    # `model.to(...)` (peft's `from_pretrained` calls it on an offloaded base) must not touch placeholders.
    runtime.model.__dict__["_apply"] = functools.partial(_apply_to_resident, runtime)
    runtime.owned_attributes.append("_apply")
    _LIVE_RUNTIMES[id(runtime)] = runtime
    if not _WATCH_HANDLES:
        _WATCH_HANDLES.extend((
            torch_module.register_module_module_registration_hook(_module_registered),
            torch_module.register_module_parameter_registration_hook(_tensor_registered),
            torch_module.register_module_buffer_registration_hook(_tensor_registered),
        ))


def forget(runtime: "Runtime") -> None:
    """Stop watching for `runtime` (it was detached)."""
    _LIVE_RUNTIMES.pop(id(runtime), None)


def _tensor_registered(module: nn.Module, name: str, value: Any) -> None:
    for runtime in list(_LIVE_RUNTIMES.values()):
        if module in runtime._members:
            runtime.changed = True


def _module_registered(parent: nn.Module, name: str, value: Any) -> None:
    # Called before `value` replaces `parent._modules[name]`: the old module is still there.
    for runtime in list(_LIVE_RUNTIMES.values()):
        if parent not in runtime._members:
            continue
        runtime.changed = True
        old = parent._modules.get(name)
        if old is not None and old is not value and old in runtime._adapter_layers:
            check_merges(runtime, old)  # peft's merge_and_unload is putting the merged base layer back
            untrack_adapter_layer(runtime, old)


def _before_state_dict_load(runtime: "Runtime", module: nn.Module, *args: Any) -> None:
    take_back_placement(runtime)
    adopt(runtime, materialize=True)
    # Look again before the next forward: peft re-dispatches the model right after loading an adapter.
    runtime.changed = True


# accelerate's hook attributes (duck-typed: bigload does not import accelerate): `add_hook_to_module` sets
# `_hf_hook` on the module and keeps the module's own forward in `_old_forward`; a `SequentialHook` holds
# several in `hooks`; every hook has `detach_hook(module)`, which `remove_hook_from_module` calls.
_ACCELERATE_HOOK = "_hf_hook"
_ACCELERATE_FORWARD = "_old_forward"


def take_back_placement(runtime: "Runtime") -> list[str]:
    """Take off the model's modules the accelerate hooks that place weights, put there after bigload
    dispatched it, as accelerate's `remove_hook_from_module` would; bigload's placement holds again.

    peft's `PeftModel.from_pretrained` re-dispatches an offloaded model with accelerate's `dispatch_model` on
    a map of its own; when that map spans a GPU and the CPU, accelerate hooks every module to set its tensors
    to meta between forwards and load them from its copy of the state dict (which for offloaded weights holds
    bigload's placeholders). bigload already runs every block and keeps adapter weights with their block, so
    the runtime undoes that before the next forward: each hook's own `detach_hook` puts back the tensors it
    took (resident ones, adapters), the module's forward is restored, and offloaded sites get their
    placeholders back. Hooks that place nothing (peft's `AlignDevicesHook(io_same_device=True)`) stay.

    Returns:
        The names of the modules whose hooks were taken off (logged as a warning when any).

    Raises:
        OffloadError: a hook without `detach_hook` (not accelerate's): naming the modules and the fix.
    """
    hooked = [(name, module) for name, module in runtime.model.named_modules() if _places_weights(module)]
    if not hooked:
        return []
    foreign = [name for name, module in hooked if not callable(getattr(module.__dict__[_ACCELERATE_HOOK],
                                                                        "detach_hook", None))]
    if foreign:
        raise OffloadError(
            f"hooks of another library were put on {summarize_names(foreign)} after bigload dispatched this model, and "
            "bigload cannot take them off: two runtimes cannot own the same weights. Dispatch the model once; "
            "for a peft adapter use bigload.from_pretrained(MODEL, adapter=PATH), or pass device_map={'': DEVICE} "
            "to PeftModel.from_pretrained (DEVICE being where your input ids are: 0, or 'cpu')."
        )
    for _, module in hooked:
        module.__dict__.pop(_ACCELERATE_HOOK).detach_hook(module)
        _restore_forward(module)
    for block in runtime.blocks.values():
        for entry in block.entries:
            for site in entry.sites:
                current = site.get()
                if current is not entry.placeholder and (current is None or current.device.type == "meta"):
                    site.set(entry.placeholder)
    names = [name for name, _ in hooked]
    logger.warning("bigload took accelerate's hooks off %s (a re-dispatch, such as peft's PeftModel."
                   "from_pretrained on an offloaded model): bigload's own placement runs the model.", summarize_names(names))
    return names


def _restore_forward(module: nn.Module) -> None:
    """Undo accelerate's `module.forward = partial(new_forward, module)`."""
    old = module.__dict__.pop(_ACCELERATE_FORWARD, None)
    if old is None:
        return
    if getattr(old, "__self__", None) is module and getattr(old, "__func__", None) is type(module).forward:
        module.__dict__.pop("forward", None)  # the class's own forward: no instance attribute, as before
    else:
        module.forward = old  # a forward set on the instance before accelerate wrapped it


def _places_weights(module: nn.Module) -> bool:
    """The module carries an accelerate hook that offloads its weights or runs it on a device of its own."""
    hook = module.__dict__.get(_ACCELERATE_HOOK)
    if hook is None:
        return False
    return any(getattr(part, "offload", False) or getattr(part, "execution_device", None) is not None
               for part in getattr(hook, "hooks", (hook,)))


def adopt(runtime: "Runtime", *, materialize: bool = False) -> None:
    """Make tensors added to an attached model since `attach` (adapter weights) resident on their block's
    execution device. The runtime calls this itself before a forward and before a state-dict load.

    Args:
        runtime: `runtime_of(model)`.
        materialize: give tensors left on the meta device (peft creates the adapter weights of an offloaded
            layer there) zero-filled storage, about to be overwritten by a state-dict load.

    Raises:
        OffloadError: (without `materialize`) tensors added after attach are on the meta device: they have
            no data.
    """
    for module in runtime.model.modules():
        runtime._members.add(module)
        if wraps_offloaded_weight(runtime, module) and module not in runtime._adapter_layers:
            track_adapter_layer(runtime, module)
    keys = set(runtime.blocks)
    empty: list[str] = []
    for group in tensor_groups(runtime.model):
        owner = owner_of(group.names[0], keys)
        tensor = group.tensor
        if owner is None or id(tensor) in runtime._placeholders:
            continue
        device = runtime.blocks[owner].execution_device
        if tensor.device == device:
            continue
        if tensor.device.type == "meta" and not materialize:
            empty.append(group.names[0])
            continue
        with torch.no_grad():
            value = (torch.zeros(tensor.shape, dtype=tensor.dtype, device=device)
                     if tensor.device.type == "meta" else tensor.detach().to(device))
        value = Registration.of(tensor).wrap(value)
        for site in group.sites:
            site.set(value)
    if empty:
        raise OffloadError(
            f"tensors {empty[:5]} were added to the dispatched model after dispatch and have no data (meta "
            "device). Load their weights (PeftModel.from_pretrained, load_adapter or load_state_dict), or add the "
            "adapter before dispatching (bigload.from_pretrained(..., adapter=PATH))."
        )
    runtime.changed = False


def _apply_to_resident(runtime: "Runtime", fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
                       ) -> nn.Module:
    """`nn.Module._apply` for an attached model: `fn` (a `.to`, a `.float()`) reaches every tensor except the
    placeholders of offloaded weights, and no tensor of a block changes device: the plan placed them and the
    runtime moves their inputs there. peft's re-dispatch calls `model.to(device)` on the whole model; moving a
    GPU share into RAM (or RAM into the GPU) only to be moved back at the next forward would double its memory.
    A dtype change applies to resident tensors, on their device; one that would change offloaded weights is
    refused before anything changes (their slots hold the planned dtype, and a model half cast fails in its
    first forward)."""
    keys = set(runtime.blocks)
    hidden: list[tuple[Site, torch.Tensor]] = []
    recast: list[tuple[Sequence[Site], torch.Tensor, torch.dtype]] = []
    kept = 0
    applied = functools.lru_cache(maxsize=None)(functools.partial(_applied, fn))  # one probe per device/dtype
    groups = list(tensor_groups(runtime.model))
    _refuse_recasting_offloaded(runtime, groups, applied)
    for group in groups:
        tensor = group.tensor
        if id(tensor) in runtime._placeholders:
            hidden.extend((site, tensor) for site in group.sites)
            continue
        if owner_of(group.names[0], keys) is None:
            continue
        device, dtype = applied(tensor.device, tensor.dtype)
        if device != tensor.device:
            hidden.extend((site, tensor) for site in group.sites)
            kept += 1
            if dtype != tensor.dtype:
                recast.append((group.sites, tensor, dtype))
    for site, _ in hidden:
        site.set(None)  # type: ignore[arg-type]  # nn.Module._apply skips None entries
    try:
        nn.Module._apply(runtime.model, fn, recurse)
    finally:
        for site, tensor in hidden:
            site.set(tensor)
    with torch.no_grad():
        for sites, tensor, dtype in recast:
            value = Registration.of(tensor).wrap(tensor.detach().to(dtype))
            for site in sites:
                site.set(value)
    if kept:
        logger.warning("bigload keeps a dispatched model where its plan put it: %d resident tensors stayed on "
                       "their blocks' devices (model.to / .cuda / .cpu move nothing; see model.hf_device_map).",
                       kept)
    runtime.changed = True
    return runtime.model


def _refuse_recasting_offloaded(runtime: "Runtime", groups: Sequence[Any],
                                applied: Callable[[torch.device, torch.dtype], tuple[torch.device, torch.dtype]]
                                ) -> None:
    """Raise when `model.to(dtype)` / `.half()` would change the dtype of offloaded weights, naming the fix."""
    changed = [(group.names[0], group.tensor.dtype, dtype) for group in groups
               if id(group.tensor) in runtime._placeholders
               and (dtype := applied(torch.device("cpu"), group.tensor.dtype)[1]) != group.tensor.dtype]
    if changed:
        name, old, new = changed[0]
        raise OffloadError(
            f"this model.to(...) / .half() / .float() would cast the model to {new}, but {len(changed)} of its "
            f"tensors are offloaded by bigload (e.g. {name!r}, {old}): they come in as the plan loaded them, so "
            f"the model would run half in {old} and half in {new}. Load it in {new} instead (dtype={new} to "
            "load_checkpoint_and_dispatch or from_pretrained), or bigload.detach(model) first for a plain model in "
            "memory. Nothing was changed."
        )


def _applied(fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device, dtype: torch.dtype
             ) -> tuple[torch.device, torch.dtype]:
    """Where and as what `fn` would put a tensor on `device` of `dtype`, found on an empty one (no data copied)."""
    probe = fn(torch.empty(0, dtype=dtype, device=device))
    return probe.device, probe.dtype
