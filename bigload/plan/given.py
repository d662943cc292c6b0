"""Planning a device map the caller gave: the same decisions as a planned map, made the same way.

accelerate's entry points take a dict map (`{"model.layers.0": 0, "lm_head": "disk"}`) and decide the rest
on the fly (where each block runs, how many buffers to hold, how disk blocks come in). bigload plans it:
`plan_for_map` checks the map against the inventory before anything is read (every key a module, every
tensor on some entry, tied tensors on one device), then decides what `plan` decides for its own maps — the
execution device of every entry (the policy applied; the main device is the map's first GPU, as accelerate
picks it), the slots and their staging, disk reads, the int4 byte order of every entry — through the same
`planner.finish`. The map is placed as given: usage beyond a budget is stated in the reasons, not refused.

`check_plan` is for a `Plan` handed back in (from `plan_model`, or read from JSON): its entries must size
the model being loaded as it was planned, or the executors would hold other bytes than the plan reserved.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from bigload.devices import Budget, Device, DeviceLike
from bigload.errors import PlanError
from bigload.plan.inventory import Inventory, TensorEntry
from bigload.plan.options import PlanOptions
from bigload.plan.planner import (
    Block,
    Setup,
    charges_for,
    disk_bytes,
    disk_reads,
    finish,
    setup,
    slots_for,
    tied_elsewhere,
)
from bigload.plan.reserve import read_slot_bytes, slot_alignment, slot_bytes, slot_count
from bigload.plan.value import Plan
from bigload.plan.walk import ATTENTION_WORDS, Fill
from bigload.sizes import format_size
from bigload.tensors import owner_of

__all__ = ["check_plan", "check_tied", "plan_for_map"]

_CHARGE_ROUNDS = 4  # charges depend on the disk-reads choice, which depends on the CPU memory they leave


def plan_for_map(inventory: Inventory, device_map: Mapping[str, DeviceLike], budget: Budget,
                 options: PlanOptions | None = None, **settings: Any) -> Plan:
    """Plan `device_map` (transformers' format, in execution order) for `inventory`.

    Args:
        inventory: what the map places (`inventory_from_module`, built with the load's dtype rule).
        device_map: module name -> GPU index, "cpu" or "disk"; `""` is the whole model; a tensor belongs to
            its longest key that is a dotted prefix of its name.
        budget: what the devices have (probed by the entry point); sizes the disk-reads choice and the usage.
        options: as for `plan` (`strategy` is not read; `policy` defaults to streaming, `main_device` to the
            map's first GPU).
        settings: `PlanOptions` fields as keywords, overriding `options`.

    Raises:
        PlanError: an empty map, a key that names no module, tensors on no entry, tied tensors split across
            devices, disk as the main device.
        DeviceError: a value that is no device.
    """
    options = (options or PlanOptions()).with_settings(**settings) if settings else (options or PlanOptions())
    placed = _parse_map(inventory, device_map)
    owned = _owners(inventory, placed)
    shared = {key: tied_elsewhere(inventory, lambda name, key=key: owner_of(name, placed) == key) for key in placed}
    setup_ = setup(inventory, budget, options, given=list(placed.values()))
    kv = _kv_by_key(inventory, placed, setup_.layer_kv)
    charges: dict[Device, int] = {}
    for _ in range(_CHARGE_ROUNDS):
        fills = setup_.fresh_fills(charges)
        blocks = [_block(setup_, key, fills, device, owned[key], shared[key], kv.get(key, 0))
                  for key, device in placed.items()]
        offloaded = [block for block in blocks if block.offloaded]
        reads = disk_reads(setup_, fills, disk_bytes(blocks))[0]
        needed = charges_for(offloaded, slots_for(offloaded, setup_, reads), setup_, fills)
        if needed == charges:
            break
        charges = needed
    return finish(inventory, setup_, blocks, fills)


def _parse_map(inventory: Inventory, device_map: Mapping[str, DeviceLike]) -> dict[str, Device]:
    if not device_map:
        raise PlanError("the device map is empty; map at least '' (the whole model) to a device.")
    placed = {str(key): Device.parse(value) for key, value in device_map.items()}
    modules = set(inventory.names)
    tensors = {entry.name: inventory.names[entry.module] for entry in inventory.tensors}
    for key in placed:
        if key not in modules and key not in tensors:
            examples = list(inventory.names[1:4])
            raise PlanError(f"device-map key {key!r} names no module of {inventory.classes[0] or 'the model'}; keys "
                            f"are module names such as {examples}.")
    if any(key in tensors for key in placed):
        placed = _tensor_keys_as_modules(inventory, placed, tensors)
    return _containers_as_children(inventory, placed)


# torch's containers: a model indexes them (`self.layers[i](x)`), never calls them, so hooks on one never run.
_CONTAINERS = frozenset({"ModuleList", "ModuleDict"})


def _containers_as_children(inventory: Inventory, placed: Mapping[str, Device]) -> dict[str, Device]:
    """A key naming a `ModuleList`/`ModuleDict` (`{"model.layers": "disk"}`, peft's `lora_A`) as a key for each of
    its children, in its place: the runtime hooks the modules that run, and a container's own hooks would never
    bring its weights in. Children the map names itself keep their own entries."""
    if not any(key and inventory.classes[inventory.index(key)] in _CONTAINERS for key in placed):
        return dict(placed)
    out: dict[str, Device] = {}
    for key, device in placed.items():
        pending = [key]
        while pending:
            name = pending.pop(0)
            i = inventory.index(name)
            if name and inventory.classes[i] in _CONTAINERS:
                pending[:0] = [inventory.names[c] for c in inventory.children(i) if inventory.names[c] not in placed]
            else:
                out.setdefault(name, device)
    return out


def _tensor_keys_as_modules(inventory: Inventory, placed: Mapping[str, Device],
                            module_of: Mapping[str, str]) -> dict[str, Device]:
    """A map whose keys name tensors (accelerate's `infer_auto_device_map` names a module's own tensors when it
    splits a module that holds tensors beside its children, e.g. `{"inner.cls": "cpu", "inner.a": "disk"}`)
    as the same placement by modules, which is what the runtime hooks: each tensor key becomes its module's
    key. Refused when that would move any tensor (its module holds other tensors mapped elsewhere)."""
    converted: dict[str, Device] = {}
    for key, device in placed.items():
        module = module_of.get(key, key) if key not in inventory.names else key
        if converted.setdefault(module, device) != device:
            converted = {}
            break
    moved = [entry.name for entry in inventory.tensors
             if not converted or _device_of(entry.name, converted) != _device_of(entry.name, placed)]
    if moved:
        tensor_keys = [key for key in placed if key in module_of]
        raise PlanError(
            f"device-map keys {tensor_keys[:3]} name tensors, and bigload places whole modules (a module's own "
            f"tensors go with it): placed by module, {moved[0]!r} would go elsewhere than this map says. Map each "
            "such tensor to the device of the other tensors of its module (or map the module itself)."
        )
    return converted


def _device_of(name: str, placed: Mapping[str, Device]) -> Device | None:
    owner = owner_of(name, placed)
    return None if owner is None else placed[owner]


def _owners(inventory: Inventory, placed: Mapping[str, Device]) -> dict[str, list[TensorEntry]]:
    """Each key's tensors (tied tensors once, under their first name); refuses tensors on no key and tied
    tensors split across devices."""
    owned: dict[str, list[TensorEntry]] = {key: [] for key in placed}
    uncovered = []
    for entry in inventory.tensors:
        owner = owner_of(entry.name, placed)
        if owner is None:
            uncovered.append(entry.name)
        else:
            owned[owner].append(entry)
    if uncovered:
        raise PlanError(
            f"the device map places no module holding {len(uncovered)} tensor(s), e.g. {uncovered[:3]}; add "
            f"their modules (e.g. {uncovered[0].rpartition('.')[0]!r}) to the map, or map '' for the rest."
        )
    for names in inventory.tied_groups:
        check_tied(names, placed)
    return owned


def check_tied(names: Sequence[str], placed: Mapping[str, Device]) -> None:
    devices = {name: placed[owner] for name in names if (owner := owner_of(name, placed)) is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise PlanError(
            f"tied weights would be split across devices ({where}); a tied group must live on one device. "
            "Map the modules holding them to the same device."
        )


def _kv_by_key(inventory: Inventory, placed: Mapping[str, Device], layer_kv: int) -> dict[str, int]:
    """The KV cache of each attention layer, charged to the key that runs its attention: the layer's own
    entry, or when the map splits the layer, its entry whose name says attention (else its first)."""
    out: dict[str, int] = {}
    if not layer_kv or inventory.kv is None:
        return out
    for layer in inventory.kv.layers:
        inside = [key for key in placed if key != layer and owner_of(key, {layer}) == layer]
        attention = [key for key in inside if any(w in key.rpartition(".")[2].lower() for w in ATTENTION_WORDS)]
        key = (attention or inside or [owner_of(layer, placed)])[0]
        if key is not None:
            out[key] = out.get(key, 0) + layer_kv
    return out


def _block(setup_: Setup, key: str, fills: Sequence[Fill], device: Device, tensors: Sequence[TensorEntry],
           shared: Sequence[TensorEntry], kv: int) -> Block:
    """Entry `key` sized from its tensors (and the tied ones it uses that another entry carries) and placed on
    its device's fill."""
    fill = next(f for f in fills if f.device == device)
    offload_buffers = setup_.options.offload_buffers
    in_slot = [entry.nbytes for entry in (*tensors, *shared) if offload_buffers or not entry.buffer]
    buffers = sum(entry.nbytes for entry in tensors if entry.buffer)
    weights = sum(entry.nbytes for entry in tensors)
    execution = setup_.runs_on(fill)
    fill.used += weights + (kv if fill.runs_own else 0)
    return Block(key, fill, execution, weights, kv, slot_bytes(in_slot, slot_alignment(setup_.main.is_gpu)),
                 0 if offload_buffers else buffers, any(entry.scheme.startswith("int4") for entry in tensors),
                 len(in_slot))


def check_plan(plan: Plan, inventory: Inventory) -> None:
    """Check that `plan` sizes this load as it was planned: its entries are modules of the model and each holds
    the bytes it was planned with (same dtype, quantization and adapters), so the slots it reserved hold
    every offloaded block.

    Raises:
        PlanError: naming the first entry that differs, both sizes and the fix; or slots other than its offloaded
            blocks need (a plan edited by hand: slots that hold no block, or more memory than the plan states).
    """
    placed = _parse_map(inventory, plan.device_map)
    weights: dict[str, int] = {key: 0 for key in placed}
    for entry in inventory.tensors:
        owner = owner_of(entry.name, placed)
        if owner is not None:
            weights[owner] += entry.nbytes
    for placement in plan.placements:
        if weights[placement.name] != placement.weights:
            raise PlanError(
                f"the plan was made for another load: block {placement.name or '(whole model)'!r} was planned at "
                f"{format_size(placement.weights)} ({placement.weights} bytes) but this load makes it "
                f"{format_size(weights[placement.name])} ({weights[placement.name]} bytes). Plan again with the "
                "same dtype=, quantize= and adapter= as the load, or pass the plan's device_map instead of the plan."
            )
    count, nbytes = _slots_needed(plan, inventory, placed)
    if (plan.slots.count, plan.slots.nbytes) != (count, nbytes):
        raise PlanError(
            f"the plan's slots ({plan.slots.count} of {plan.slots.nbytes} bytes) are not what its offloaded blocks "
            f"need ({count} of {nbytes} bytes, at prefetch={plan.prefetch}): the plan was edited, or made for another "
            "load. Plan again, or pass the plan's device_map instead of the plan."
        )


def _slots_needed(plan: Plan, inventory: Inventory, placed: Mapping[str, Device]) -> tuple[int, int]:
    """The slot count and size the plan's offloaded placements need, by the formulas the planner sized them
    with (`reserve.slot_count`, `reserve.slot_bytes`, `reserve.read_slot_bytes`)."""
    owned = _owners(inventory, placed)
    alignment = slot_alignment(plan.main_device.is_gpu)
    taking: dict[str, int] = {}
    for placement in plan.placements:
        if not placement.offloaded:
            continue
        shared = tied_elsewhere(inventory, lambda name, key=placement.name: owner_of(name, placed) == key)
        in_slot = [entry.nbytes for entry in (*owned[placement.name], *shared)
                   if plan.offload_buffers or not entry.buffer]
        if in_slot:
            taking[placement.name] = slot_bytes(in_slot, alignment)
    count = slot_count(list(taking), plan.prefetch)
    return count, read_slot_bytes(max(taking.values(), default=0), plan.slots.reads) if count else 0

