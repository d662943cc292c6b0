"""The plan as a value: where every block lives and runs, what each device is charged, how offloaded blocks
come in. Frozen; the loader and the runtime read it and decide nothing themselves.

`Plan.placement_of(name)` answers which device-map entry owns a tensor or module (`tensors.owner_of`, the one
rule), `Plan.home_of(name, buffer=...)` where a tensor is kept (its entry's device, except the buffers of an
offloaded entry, which stay where it runs unless `offload_buffers`), and `Plan.int4_layout_of(name)` the byte
order an int4 weight is packed in (that of the device its entry runs on).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from bigload.devices import Device, DeviceKind, DeviceLike, ExecutionPolicy
from bigload.errors import BigloadError, PlanError
from bigload.messages import Audience, render
from bigload.plan.reserve import DiskReads, SlotSpec
from bigload.quant import Layout
from bigload.sizes import format_size
from bigload.tensors import owner_of, summarize_names

__all__ = ["DeviceUsage", "Placement", "Plan"]

_JSON_VERSION = 2


@dataclass(frozen=True)
class Placement:
    """One device-map entry: a block, where its weights live and where it runs.

    Attributes:
        name: the module name ("" is the whole model).
        device: where its weights live.
        execution_device: where it runs (a GPU or the CPU, never disk).
        weights: bytes of its weights at the target dtype.
        kv: bytes of KV cache kept for its attention layers on `execution_device`.
        int4_layout: the byte order of its int4-quantized weights (`quant.Layout.CPU` or `NIBBLES`, the layout
            of `execution_device`); None when it holds none.
    """

    name: str
    device: Device
    execution_device: Device
    weights: int
    kv: int = 0
    int4_layout: Layout | None = None

    @property
    def offloaded(self) -> bool:
        """Its weights are not where it runs: the runtime brings them in for each forward."""
        return self.device != self.execution_device


@dataclass(frozen=True)
class DeviceUsage:
    """What the plan charges one device of the budget.

    Attributes:
        device: the device.
        budget: its budget in bytes.
        weights: bytes of weights placed on it.
        headroom: bytes kept free for activations and the KV cache of the layers that run on it.
        reserve: bytes kept for offloaded blocks brought in to run on it.
    """

    device: Device
    budget: int
    weights: int
    headroom: int
    reserve: int

    @property
    def total(self) -> int:
        return self.weights + self.headroom + self.reserve

    @property
    def free(self) -> int:
        return self.budget - self.total


@dataclass(frozen=True)
class Plan:
    """Where every block goes, and what each device is charged. Frozen; `to_json()`/`from_json()` round-trip.

    Attributes:
        placements: the device-map entries in execution order.
        usage: one entry per budget device with a nonzero budget (and every device the map names), in
            placement order.
        strategy: the strategy used (`auto` resolved), or "given" for a map the caller gave.
        main_device: where offloaded blocks run (first GPU, else the CPU).
        policy: where CPU-resident blocks run when a GPU exists (an `ExecutionPolicy`, equal to its name).
        prefetch: offloaded blocks loaded ahead of the running one (the reserve covers them).
        slots: the slots the runtime keeps on `main_device` for offloaded blocks (count and size), how disk
            blocks come into them (`slots.reads`) and whether each has a pinned host staging buffer
            (`slots.staged`); `SlotSpec(0, 0)` when nothing is offloaded.
        offload_buffers: the buffers of offloaded blocks are offloaded with them (in the slots) instead of
            staying resident where the blocks run.
        quantize: the quantization scheme of the planned weights ("int8", "int4:128"), or None.
        dtype: the compute dtype name the KV cache was sized for, or None.
        context_length: tokens of KV cache kept per sequence, or None.
        batch_size: sequences the KV cache was sized for.
        reasons: short explanations of the decisions (strategy, policy, reserve, headroom).
    """

    placements: tuple[Placement, ...]
    usage: tuple[DeviceUsage, ...]
    strategy: str
    main_device: Device
    policy: ExecutionPolicy
    prefetch: int
    slots: SlotSpec = SlotSpec(0, 0)
    offload_buffers: bool = False
    quantize: str | None = None
    dtype: str | None = None
    context_length: int | None = None
    batch_size: int = 1
    reasons: tuple[str, ...] = field(default=())

    # -- the map and its entries

    @property
    def device_map(self) -> dict[str, int | str]:
        """transformers' format: `{"model.embed_tokens": 0, "model.layers.31": "cpu", "lm_head": "disk"}`."""
        return {p.name: p.device.key for p in self.placements}

    @property
    def execution_devices(self) -> dict[str, Device]:
        """Block name -> the device it runs on."""
        return {p.name: p.execution_device for p in self.placements}

    @property
    def offloaded(self) -> tuple[str, ...]:
        """Blocks whose weights are not on their execution device, in execution order."""
        return tuple(p.name for p in self.placements if p.offloaded)

    @functools.cached_property
    def _by_name(self) -> dict[str, Placement]:
        return {p.name: p for p in self.placements}

    def placement_of(self, name: str) -> Placement | None:
        """The entry owning tensor or module `name` (the longest entry that is a dotted prefix of it), or None."""
        owner = owner_of(name, self._by_name)
        return None if owner is None else self._by_name[owner]

    def home_of(self, name: str, *, buffer: bool) -> Device | None:
        """Where tensor `name` is kept: its entry's device, except that a buffer of an offloaded entry stays
        on the device the entry runs on (unless `offload_buffers`). None when no entry owns it."""
        placement = self.placement_of(name)
        if placement is None:
            return None
        if buffer and placement.offloaded and not self.offload_buffers:
            return placement.execution_device
        return placement.device

    def int4_layout_of(self, name: str) -> Layout:
        """The byte order an int4 weight `name` is packed in: its entry's (`Layout.CPU` when no entry says)."""
        placement = self.placement_of(name)
        return placement.int4_layout if placement is not None and placement.int4_layout else Layout.CPU

    def weight_bytes_by_device(self) -> dict[Device, int]:
        """Bytes of weights per budget device (0 for devices holding nothing)."""
        return {u.device: u.weights for u in self.usage}

    def usage_of(self, device: DeviceLike) -> DeviceUsage:
        """The charge of one device.

        Raises:
            PlanError: the device is not in the plan's budget.
        """
        wanted = Device.parse(device)
        for entry in self.usage:
            if entry.device == wanted:
                return entry
        raise PlanError(f"{wanted} is not in this plan's budget ({', '.join(str(u.device) for u in self.usage)}).")

    # -- JSON

    def to_json(self) -> str:
        """The plan as a JSON string (`device_map` included for tools that only want the map)."""
        return json.dumps({
            "version": _JSON_VERSION,
            "strategy": self.strategy,
            "main_device": self.main_device.key,
            "policy": self.policy.value,
            "prefetch": self.prefetch,
            "slots": {"count": self.slots.count, "nbytes": self.slots.nbytes, "reads": self.slots.reads.value,
                      "staged": self.slots.staged},
            "offload_buffers": self.offload_buffers,
            "quantize": self.quantize,
            "dtype": self.dtype,
            "context_length": self.context_length,
            "batch_size": self.batch_size,
            "device_map": self.device_map,
            "placements": [
                {"name": p.name, "device": p.device.key, "execution_device": p.execution_device.key,
                 "weights": p.weights, "kv": p.kv, "int4_layout": p.int4_layout.value if p.int4_layout else None}
                for p in self.placements
            ],
            "usage": [
                {"device": u.device.key, "budget": u.budget, "weights": u.weights, "headroom": u.headroom,
                 "reserve": u.reserve}
                for u in self.usage
            ],
            "reasons": list(self.reasons),
        }, indent=1)

    @staticmethod
    def from_json(text: str) -> "Plan":
        """Read a plan written by `to_json`.

        Raises:
            PlanError: not a bigload plan, or written by an incompatible version.
        """
        try:
            data = json.loads(text)
            if data.get("version") != _JSON_VERSION:
                raise PlanError(f"plan JSON version {data.get('version')!r} is not {_JSON_VERSION}; plan again.")
            _check_json_settings(data)
            return Plan(
                placements=tuple(_placement_from_json(p) for p in data["placements"]),
                usage=tuple(
                    DeviceUsage(Device.parse(u["device"]), int(u["budget"]), int(u["weights"]),
                                int(u["headroom"]), int(u["reserve"]))
                    for u in data["usage"]
                ),
                strategy=data["strategy"],
                main_device=Device.parse(data["main_device"]),
                policy=ExecutionPolicy.parse(data["policy"]),
                prefetch=int(data["prefetch"]),
                slots=_slots_from_json(data["slots"]),
                offload_buffers=bool(data["offload_buffers"]),
                quantize=data["quantize"],
                dtype=data["dtype"],
                context_length=data["context_length"],
                batch_size=int(data["batch_size"]),
                reasons=tuple(data["reasons"]),
            )
        except BigloadError:
            raise  # already names what is wrong (a device, a policy); bigload's errors are ValueErrors too
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            # RecursionError: `json` recurses once per nesting level, so '[' * 100000 exhausts the stack.
            raise PlanError(f"not a bigload plan JSON ({type(error).__name__}: {str(error)[:200]}); write plans "
                            "with Plan.to_json().") from None

    # -- for people

    def explain(self, audience: Audience = Audience.PYTHON) -> str:
        """A table for humans: per device its blocks (numbered runs as ranges), weights, headroom, reserve,
        budget and free bytes, then why offload and reserve decisions were made. Settings named in the
        reasons are spelled for `audience` (Python keywords, or the CLI's flags)."""
        rows = [("device", "blocks", "weights", "headroom", "reserve", "budget", "free")]
        for entry in self.usage:
            names = [p.name for p in self.placements if p.device == entry.device]
            runs_on = {p.execution_device for p in self.placements if p.device == entry.device}
            blocks = summarize_names(names)
            if runs_on and runs_on != {entry.device}:
                blocks += f" (run on {', '.join(str(d) for d in sorted(runs_on))})"
            rows.append((str(entry.device), blocks or "-", format_size(entry.weights), format_size(entry.headroom),
                         format_size(entry.reserve), format_size(entry.budget), format_size(entry.free)))
        widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
        lines = []
        for row in rows:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:])]
            lines.append("  ".join(cells).rstrip())
        lines.insert(1, "-" * len(lines[0]))
        lines.append("")
        lines.extend(f"why: {render(reason, audience)}" for reason in self.reasons)
        return "\n".join(lines)


def _check_json_settings(data: Mapping[str, Any]) -> None:
    """Refuse values no planner writes (a plan edited by hand), naming the field: the executors would fail on
    them later with less to go on."""
    if int(data["prefetch"]) < 0 or int(data["batch_size"]) < 1:
        raise PlanError(f"plan JSON has prefetch {data['prefetch']!r} and batch_size {data['batch_size']!r}; a plan "
                        "has prefetch >= 0 and batch_size >= 1. Plan again (plan_model, or bigload plan --json).")
    runs_on = [("main_device", data["main_device"])] + [(f"execution_device of {p['name']!r}", p["execution_device"])
                                                        for p in data["placements"]]
    for what, device in runs_on:
        if Device.parse(device).kind is DeviceKind.DISK:
            raise PlanError(f"plan JSON has {what} 'disk'; blocks run on a GPU or the CPU (their weights may live "
                            "on disk: that is 'device'). Plan again (plan_model, or bigload plan --json).")


def _placement_from_json(data: Mapping[str, Any]) -> Placement:
    layout = data["int4_layout"]
    return Placement(data["name"], Device.parse(data["device"]), Device.parse(data["execution_device"]),
                     int(data["weights"]), int(data["kv"]), Layout(layout) if layout else None)


def _slots_from_json(data: Mapping[str, Any]) -> SlotSpec:
    return SlotSpec(int(data["count"]), int(data["nbytes"]), DiskReads.parse(data["reads"]), bool(data["staged"]))
