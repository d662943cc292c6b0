"""What the planner says when a model does not fit: how many bytes are missing on which device, and the fixes
(in the caller's terms: keywords in Python, flags on the command line)."""

from __future__ import annotations

from typing import Mapping, Sequence

from bigload.devices import CPU, Device, DeviceKind, ExecutionPolicy
from bigload.messages import Setting, Text, setting
from bigload.plan.inventory import Inventory
from bigload.plan.walk import KV, Fill, NoFit, Walk
from bigload.sizes import format_size

__all__ = ["no_fit_message", "reserve_message", "staging_message"]

_ADD_DISK = Setting("max_memory={..., 'disk': '200GiB'}, offload_folder=...",
                    "--max-memory ...,disk=200GiB --offload-folder DIR")


def no_fit_message(inv: Inventory, main: Device, layer_kv: int, kv: KV, walk: Walk, failure: NoFit,
                   charges: Mapping[Device, int]) -> Text:
    """The walk found no device for `failure.unit`: what is left, per device what is missing, and the fixes."""
    unit = failure.unit
    name = inv.names[unit[0]] or "(whole model)"
    unit_bytes = walk.unit_bytes(unit)
    unit_kv = walk.unit_kv(unit)
    remaining = inv.total_bytes - failure.placed_bytes
    lines = [
        f"the model does not fit: {format_size(remaining)} of weights are left when block {name!r} "
        f"({format_size(unit_bytes)}) fits on no device."
    ]
    free_total = 0
    for fill in failure.fills:
        footprint = unit_bytes + (unit_kv if fill.runs_own else 0)
        free = max(0, fill.cap - fill.used)
        free_total += free
        reserved = fill.fixed_headroom + charges.get(fill.device, 0)
        staging = (f" (pinned staging {format_size(charges[CPU])})"
                   if fill.device == CPU and charges.get(CPU) and main != CPU else "")
        lines.append(
            f"  {fill.device}: budget {format_size(fill.budget)}, used {format_size(fill.used)}, kept free "
            f"{format_size(reserved)}{staging}; {format_size(max(0, footprint - free))} ({max(0, footprint - free)} bytes) "
            f"missing for {name!r}"
        )
    missing = max(0, remaining + (kv.total if layer_kv else 0) - free_total)
    lines.append(f"  in all about {format_size(missing)} ({missing} bytes) are missing.")
    return Text("\n".join(lines), "\nfix: ", *_joined(_fixes(failure.fills, main, layer_kv, kv, charges), "; or "), ".")


def _fixes(fills: Sequence[Fill], main: Device, layer_kv: int, kv: KV, charges: Mapping[Device, int]) -> list[Text]:
    fixes: list[Text] = []
    if not any(fill.device.kind is DeviceKind.DISK for fill in fills):
        fixes.append(Text("add a disk budget and an offload folder (", _ADD_DISK, ")"))
    if layer_kv:
        fixes.append(Text("lower ", setting("context_length"), " or ", setting("batch_size"),
                          f" (the KV cache takes {format_size(kv.total)})"))
    if any(fill.fixed_headroom for fill in fills):
        fixes.append(Text("lower headroom"))
    if charges.get(CPU) and main != CPU:
        fixes.append(Text("use ", setting("prefetch", "0"), " (fewer pinned staging buffers on the cpu)"))
    fixes.append(Text("give the devices more memory (", setting("max_memory"), ")"))
    return fixes


def _joined(texts: Sequence[Text], separator: str) -> list[Text | str]:
    """`texts` with `separator` between them, as parts of one `Text`."""
    out: list[Text | str] = []
    for i, text in enumerate(texts):
        out.extend((separator, text) if i else (text,))
    return out


def reserve_message(main: Device, policy: ExecutionPolicy, fill: Fill, needed: int, offloaded: int) -> Text:
    """The main device cannot hold what offloaded blocks need while they run."""
    room = fill.budget - fill.fixed_headroom
    local = (Text(", or ", setting("policy", "'local'"), " so CPU-resident blocks run on the CPU")
             if policy == "stream" else "")
    return Text(
        f"the main device {main} cannot hold what offloaded blocks need while they run: "
        f"{format_size(needed)} (prefetch slots of the largest of {offloaded} offloaded block(s), their "
        f"buffers and KV cache) but only {format_size(max(0, room))} is available there; "
        f"{needed - max(0, room)} bytes are missing. Fix: give {main} more memory, use ",
        setting("prefetch", "0"), ", lower ", setting("context_length"), local, "."
    )


def staging_message(main: Device, cpu: Fill, needed: int, offloaded: int) -> Text:
    """The CPU cannot hold the pinned staging buffers of the GPU's slots."""
    room = max(0, cpu.budget - cpu.fixed_headroom)
    return Text(
        f"the cpu cannot hold the pinned staging buffers that copies of the {offloaded} offloaded block(s) "
        f"to {main} go through: {format_size(needed)} of page-locked memory (one buffer per slot, the "
        f"size of the largest offloaded block) but the cpu budget leaves {format_size(room)}; "
        f"{needed - room} bytes are missing. Fix: give the cpu more memory (", setting("max_memory"), "), use ",
        setting("prefetch", "0"), ", or give ", str(main), " more memory so fewer blocks are offloaded."
    )
