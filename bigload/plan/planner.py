"""The planner: where every block of a model goes, as arithmetic over sizes.

Pure: it imports no I/O and probes nothing; `budget.py` measures the machine and passes a `Budget` in.

One walk over the inventory in execution order places units on devices in order (GPUs by index, then cpu,
then disk). A unit is a module placed whole, or a split module's own tensors; a module is split into its
children only when it does not fit whole (or, on an offload device, always down to an unsplittable block,
because a device-map entry is what the runtime brings in at once). Strategies differ only in how much each
GPU is allowed to take before the walk moves on:

- `sequential` fills each device up to its budget;
- `balanced` gives each GPU a share of the model proportional to its usable memory (budget minus headroom
  and reserve) and moves on when a block's midpoint passes that share, so models with uneven layers (MoE,
  big embeddings) still spread evenly; when the GPUs cannot hold everything they are simply filled;
- `balanced_low_0` balances over GPUs 1..n-1 and gives GPU 0 only what does not fit there;
- `auto` is `balanced` with several GPUs, `sequential` otherwise.

Per device the plan charges weights, headroom (a fixed amount plus the KV cache of the attention layers
that run there, when a context length is given) and reserves. On the main device, the offload reserve: what
the runtime's prefetcher really holds (`min(nesting + prefetch, blocks)` slots of the largest offloaded
block's parameters, plus the buffers of offloaded blocks, which stay resident). When the main device is a
GPU, the CPU's reserve is the slots' pinned host staging buffers (`SlotSpec.staging_bytes`: page-locked RAM,
which the CPU budget must pay for like weights). Both depend on what gets offloaded, so the walk is repeated
with growing charges until they cover what the resulting plan needs (a fixed point, usually two walks).

CPU-resident blocks, when a GPU exists, either stream their weights to the GPU for every forward (accelerate's
behaviour) or run on the CPU, moving only activations. The default follows a bandwidth model of one decode
step (see `choose_policy`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from bigload.devices import CPU, Budget, Device, DeviceKind, DeviceLike, ExecutionPolicy
from bigload.errors import PlanError
from bigload.plan.inventory import Inventory
from bigload.messages import Audience, Setting, Text, render, setting
from bigload.plan.reserve import DiskReads, SlotSpec, choose_disk_reads, read_slot_bytes, slot_alignment, slot_count
from bigload.sizes import dtype_width, format_size, parse_dtype, parse_size
from bigload.tensors import summarize_names

__all__ = [
    "CPU_FLOPS",
    "CPU_MEMORY_BYTES_PER_S",
    "DEFAULT_GPU_HEADROOM_FRACTION",
    "DEFAULT_GPU_HEADROOM_MIN",
    "DeviceUsage",
    "PCIE_BYTES_PER_S",
    "Placement",
    "Plan",
    "PlanOptions",
    "STRATEGIES",
    "choose_policy",
    "default_gpu_headroom",
    "plan",
]

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
POLICIES = tuple(policy.value for policy in ExecutionPolicy)

# The bandwidth model behind the default execution policy (round figures for a PCIe 4 x16 host and a
# server CPU running bf16 GEMV/GEMM; they only need to be right within a factor of two or so).
PCIE_BYTES_PER_S = 25e9
CPU_MEMORY_BYTES_PER_S = 50e9
CPU_FLOPS = 0.5e12

# What a GPU needs beyond weights, KV cache and the offload reserve, and no planner can size: CUDA context
# and cuBLAS/attention workspaces (loaded lazily, at the first matmul), activations of a prefill, and the
# caching allocator's rounding. Kept free on every GPU unless the caller gives `headroom=`.
DEFAULT_GPU_HEADROOM_MIN = 1 << 30
DEFAULT_GPU_HEADROOM_FRACTION = 0.05

_JSON_VERSION = 1
_MAX_WALKS = 32
_ATTENTION_WORDS = ("attn", "attention")


# --------------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class Placement:
    """One device-map entry: a block, where its weights live and where it runs.

    Attributes:
        name: the module name ("" is the whole model).
        device: where its weights live.
        execution_device: where it runs (a GPU or the CPU, never disk).
        weights: bytes of its weights at the target dtype.
        kv: bytes of KV cache kept for its attention layers on `execution_device`.
    """

    name: str
    device: Device
    execution_device: Device
    weights: int
    kv: int = 0

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
        usage: one entry per budget device with a nonzero budget, in placement order.
        strategy: the strategy used (`auto` resolved).
        main_device: where offloaded blocks run (first GPU in the budget, else the CPU).
        policy: where CPU-resident blocks run when a GPU exists (an `ExecutionPolicy`, equal to its name).
        prefetch: offloaded blocks loaded ahead of the running one (the reserve covers them).
        slots: the slots the runtime keeps on `main_device` for offloaded blocks (count and size), and how
            disk blocks come into them (`slots.reads`: mapped in place or read explicitly, decided from the
            CPU memory left), and whether each has a pinned host staging buffer (`slots.staged`: slots on a
            GPU; their `slots.staging_bytes` are the CPU's reserve); the runtime takes them from here.
            `SlotSpec(0, 0)` when nothing is offloaded.
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
    dtype: str | None = None
    context_length: int | None = None
    batch_size: int = 1
    reasons: tuple[str, ...] = field(default=())

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
            "dtype": self.dtype,
            "context_length": self.context_length,
            "batch_size": self.batch_size,
            "device_map": self.device_map,
            "placements": [
                {"name": p.name, "device": p.device.key, "execution_device": p.execution_device.key,
                 "weights": p.weights, "kv": p.kv}
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
            return Plan(
                placements=tuple(
                    Placement(p["name"], Device.parse(p["device"]), Device.parse(p["execution_device"]),
                              int(p["weights"]), int(p["kv"]))
                    for p in data["placements"]
                ),
                usage=tuple(
                    DeviceUsage(Device.parse(u["device"]), int(u["budget"]), int(u["weights"]),
                                int(u["headroom"]), int(u["reserve"]))
                    for u in data["usage"]
                ),
                strategy=data["strategy"],
                main_device=Device.parse(data["main_device"]),
                policy=ExecutionPolicy.parse(data["policy"]),
                prefetch=int(data["prefetch"]),
                slots=_slots_from_json(data.get("slots", {}), Device.parse(data["main_device"]).is_gpu),
                dtype=data["dtype"],
                context_length=data["context_length"],
                batch_size=int(data["batch_size"]),
                reasons=tuple(data["reasons"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise PlanError(f"not a bigload plan JSON ({error!r}); write plans with Plan.to_json().") from error

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


def _slots_from_json(data: Mapping[str, Any], on_gpu: bool) -> SlotSpec:
    count = int(data.get("count", 0))
    return SlotSpec(count, int(data.get("nbytes", 0)), DiskReads.parse(data.get("reads", "mapped")),
                    bool(data.get("staged", on_gpu and count > 0)))


# --------------------------------------------------------------------------------------------------
# Execution policy


# "pass policy= to override" in Python, "pass --policy local|stream to override" on the command line.
_POLICY_OVERRIDE = setting("policy", "", "local|stream")


def choose_policy(batch_size: int, width: int) -> tuple[str, str]:
    """Where CPU-resident blocks should run when a GPU exists, by a bandwidth model of one decode step.

    Streaming moves every weight byte over PCIe (`PCIE_BYTES_PER_S`). Running locally reads every weight
    byte from RAM (`CPU_MEMORY_BYTES_PER_S`) and does `2 x batch_size` flops per parameter on the CPU
    (`CPU_FLOPS`); activations crossing the bus are a few KB per token either way and are ignored. The
    cheaper time per weight byte wins: small batches run locally, large batches stream.

    Args:
        batch_size: tokens per forward during decoding.
        width: bytes per weight element.

    Returns:
        ("stream" or "local", a one-line reason).

    >>> choose_policy(1, 2)[0]
    'local'
    >>> choose_policy(64, 2)[0]
    'stream'
    """
    stream = 1 / PCIE_BYTES_PER_S
    local = max(1 / CPU_MEMORY_BYTES_PER_S, 2 * batch_size / width / CPU_FLOPS)
    choice = "local" if local < stream else "stream"
    reason = Text(f"CPU-resident blocks {'run on the CPU' if choice == 'local' else 'stream their weights to the GPU'}"
                  f" ('{choice}'): per weight byte and decode step, streaming costs {stream * 1e12:.0f} ps over "
                  f"PCIe, running locally {local * 1e12:.0f} ps (batch {batch_size}); pass ",
                  _POLICY_OVERRIDE, " to override.")
    return choice, reason


# --------------------------------------------------------------------------------------------------
# The walk


@dataclass
class _DeviceFill:
    """One budget device during a walk."""

    device: Device
    budget: int
    fixed_headroom: int
    runs_own: bool  # blocks placed here run here (GPUs; the CPU without a GPU or with policy 'local')
    cap: int = 0  # bytes of footprint the walk may put here
    target_end: float | None = None  # balanced: cumulative GPU footprint at which to move on
    used: int = 0


Unit = tuple[int, bool]  # (module index, whole module?); (i, False) is module i's own tensors only


class _NoFit(Exception):
    def __init__(self, unit: Unit, slots: Sequence[_DeviceFill], placed_bytes: int) -> None:
        super().__init__()
        self.unit = unit
        self.slots = slots
        self.placed_bytes = placed_bytes


class _Walk:
    """One pass over the inventory, placing units on slots in order."""

    def __init__(self, inv: Inventory, slots: list[_DeviceFill], kv: "_KV", ties: "_Ties") -> None:
        self.inv = inv
        self.slots = slots
        self.kv = kv
        self.ties = ties
        self.cursor = 0
        self.cum = 0  # footprint placed on GPUs so far (balanced targets are cumulative)
        self.placed_whole = [-1] * len(inv)  # slot index of every module inside a unit placed whole
        self.placed_own: dict[int, int] = {}
        self.partial: set[int] = set()  # ancestors of units placed early (tied companions): must split
        self.kv_moved: dict[int, int] = {}
        self.units: dict[Unit, tuple[int, int]] = {}  # unit -> (slot index, kv charged with it)
        self.split: list[int] = []
        self.placed_bytes = 0

    # -- measures

    def splittable(self, unit: Unit) -> bool:
        i, whole = unit
        return whole and self.inv.ends[i] > i + 1 and not self.inv.no_split[i]

    def unit_bytes(self, unit: Unit) -> int:
        i, whole = unit
        return self.inv.subtree_bytes(i) if whole else self.inv.own_bytes[i]

    def unit_kv(self, unit: Unit) -> int:
        i, whole = unit
        if not whole:
            return 0
        return self.kv.range_bytes(i, self.inv.ends[i]) + self.kv_moved.get(i, 0)

    def done(self, unit: Unit) -> bool:
        i, whole = unit
        return self.placed_whole[i] >= 0 if whole else i in self.placed_own

    # -- the loop

    def run(self) -> "_Walk":
        stack: list[Unit] = [(0, True)]
        while stack:
            unit = stack.pop()
            if self.done(unit):
                continue
            if unit[1] and unit[0] in self.partial:
                self.split_unit(unit[0], stack)
                continue
            bundle = self.ties.bundle(unit, self)
            slot = self.slots[self.cursor]
            weights = sum(self.unit_bytes(u) for u in bundle)
            kv = sum(self.unit_kv(u) for u in bundle)
            footprint = weights + (kv if slot.runs_own else 0)
            decision = self.decide(slot, unit, footprint)
            if decision == "place":
                self.place(bundle, self.cursor, footprint, weights)
            elif decision == "split":
                self.split_unit(unit[0], stack)
            else:
                self.cursor += 1
                if self.cursor == len(self.slots):
                    raise _NoFit(unit, self.slots, self.placed_bytes)
                stack.append(unit)
        return self

    def decide(self, slot: _DeviceFill, unit: Unit, footprint: int) -> str:
        splittable = self.splittable(unit)
        if not slot.runs_own and splittable:
            return "split"  # an offloaded entry is brought in whole: keep entries unsplittable blocks
        fits = slot.used + footprint <= slot.cap
        if slot.target_end is None:
            return "place" if fits else ("split" if splittable else "next")
        room = slot.target_end - self.cum
        if fits and footprint <= room:
            return "place"
        if room <= 0:
            return "next"
        if splittable:
            return "split"
        # An unsplittable block straddling this GPU's share stays if its midpoint is inside the share.
        return "place" if fits and footprint / 2 <= room else "next"

    def place(self, bundle: Sequence[Unit], index: int, footprint: int, weights: int) -> None:
        slot = self.slots[index]
        for unit in bundle:
            i, whole = unit
            self.units[unit] = (index, self.unit_kv(unit))
            if whole:
                end = self.inv.ends[i]
                self.placed_whole[i:end] = [index] * (end - i)
            else:
                self.placed_own[i] = index
        for unit in bundle[1:]:
            self.mark_partial(unit)
        slot.used += footprint
        self.placed_bytes += weights
        if slot.device.is_gpu:
            self.cum += footprint

    def mark_partial(self, unit: Unit) -> None:
        i, whole = unit
        node = i if not whole else self.inv.parents[i]
        while node >= 0 and node not in self.partial:
            self.partial.add(node)
            node = self.inv.parents[node]

    def split_unit(self, i: int, stack: list[Unit]) -> None:
        self.split.append(i)
        children = self.inv.children(i)
        moved = self.kv.at(i) + self.kv_moved.pop(i, 0)
        if moved:
            # The cache of a split attention layer lives where its attention module runs.
            names = self.inv.names
            target = next((c for c in children if any(w in names[c].rpartition(".")[2].lower()
                                                      for w in _ATTENTION_WORDS)), children[0])
            self.kv_moved[target] = self.kv_moved.get(target, 0) + moved
        stack.extend((child, True) for child in reversed(children))
        if self.inv.own_tensors[i] and i not in self.placed_own:
            stack.append((i, False))


class _KV:
    """KV-cache bytes per module index (at attention-layer blocks), with prefix sums for ranges."""

    def __init__(self, inv: Inventory, layer_bytes: int) -> None:
        self.layer_bytes = layer_bytes
        positions = sorted(inv.index(name) for name in (inv.kv.layers if inv.kv and layer_bytes else ()))
        self.positions = positions
        self.total = layer_bytes * len(positions)

    def range_bytes(self, start: int, end: int) -> int:
        if not self.positions:
            return 0
        return self.layer_bytes * (bisect_left(self.positions, end) - bisect_left(self.positions, start))

    def at(self, i: int) -> int:
        return self.range_bytes(i, i + 1)


class _Ties:
    """Tied groups as the units that hold them, so a group is always placed in one go."""

    def __init__(self, inv: Inventory) -> None:
        self.inv = inv
        self.groups: list[tuple[Unit, ...]] = []
        owners: list[tuple[int, int, str]] = []  # (owner module, group, tensor attribute)
        for group_id, names in enumerate(inv.tied_groups):
            holders: dict[Unit, None] = {}
            for name in names:
                owner = inv.index(name.rpartition(".")[0])
                owners.append((owner, group_id, name))
                holders[self._holder(owner)] = None
            self.groups.append(tuple(holders))
        owners.sort()
        self.owner_index = [owner for owner, _, _ in owners]
        self.owner_group = [group for _, group, _ in owners]

    def _holder(self, owner: int) -> Unit:
        """The smallest unit that can hold a tensor of `owner`: its outermost unsplittable ancestor, else the
        owner's own tensors (or the owner whole when it is a leaf)."""
        atom = -1
        node = owner
        while node >= 0:
            if self.inv.no_split[node]:
                atom = node
            node = self.inv.parents[node]
        if atom >= 0:
            return (atom, True)
        return (owner, self.inv.ends[owner] == owner + 1)

    def _groups_in(self, unit: Unit) -> list[int]:
        i, whole = unit
        end = self.inv.ends[i] if whole else i + 1
        lo, hi = bisect_left(self.owner_index, i), bisect_right(self.owner_index, end - 1)
        return self.owner_group[lo:hi]

    def _contains(self, unit: Unit, other: Unit) -> bool:
        i, whole = unit
        if not whole:
            return other == unit
        return i <= other[0] < self.inv.ends[i]

    def bundle(self, unit: Unit, walk: _Walk) -> list[Unit]:
        """`unit` and the units holding the other names of every tied group it touches (transitively)."""
        if not self.groups:
            return [unit]
        bundle = [unit]
        queue = [unit]
        seen_groups: set[int] = set()
        while queue:
            current = queue.pop()
            for group in self._groups_in(current):
                if group in seen_groups:
                    continue
                seen_groups.add(group)
                for holder in self.groups[group]:
                    if any(self._contains(u, holder) for u in bundle) or walk.done(holder):
                        continue
                    bundle.append(holder)
                    queue.append(holder)
        return bundle


# --------------------------------------------------------------------------------------------------
# plan()


@dataclass(frozen=True)
class _Setup:
    strategy: str
    policy: ExecutionPolicy
    policy_reason: str
    main: Device
    slots_template: tuple[_DeviceFill, ...]
    layer_kv: int
    sources: tuple[tuple[Device, str], ...]
    headroom_reason: str = ""
    disk_reads: DiskReads | None = None  # as requested; None: `choose_disk_reads` decides from the walk


@dataclass(frozen=True)
class PlanOptions:
    """Every planning setting, gathered once at an entry point (`plan_for_model`, `plan_model`,
    `load_checkpoint_and_dispatch`, `from_pretrained`, the CLI) from accelerate-style keywords, then passed
    down as one value (as `torch.distributed.checkpoint` passes one planner object).

    Attributes:
        strategy: "auto", "balanced", "balanced_low_0" or "sequential" (see the module docstring).
        dtype: the dtype floating weights are loaded in (None: the model's); sizes the KV cache too.
        max_memory: per-device budgets in accelerate's format (`{0: "20GiB", "cpu": "60GiB"}`); None: what
            the machine has free (probed by `budget.detect_budget` at the entry point, never here).
        offload_folder: with no "disk" budget, its free space becomes the disk budget.
        headroom: bytes kept free on each device that runs blocks (an int or size string applies to every
            GPU, and to the CPU when it runs blocks), or a per-device mapping. None: each GPU keeps
            `default_gpu_headroom(budget)` free (max(1 GiB, 5 %)); pass 0 to plan GPUs full.
        context_length: tokens per sequence to keep KV cache for, charged to the device running each
            attention layer (needs a KV-cache spec in the inventory).
        batch_size: sequences decoded at once (KV cache size, and the execution-policy model).
        prefetch: offloaded blocks loaded ahead of the running one; the reserve covers them.
        policy: an `ExecutionPolicy` (names are parsed) for CPU-resident blocks when a GPU exists; None:
            `choose_policy` decides.
        disk_reads: how disk blocks are brought in (`reserve.DiskReads`: "mapped" in place from the page
            cache, or "read" explicitly into the slots); None: `reserve.choose_disk_reads` decides from the
            CPU memory the plan leaves.
        keep_in_fp32_modules, special_dtypes, no_split_module_classes: how the inventory is built (see
            `inventory.DtypeRule`); None: the model's own lists.
        cast_bytes: the largest temporary loading needs on a GPU beyond a tensor's final bytes (a float32
            tensor loaded as bfloat16 lands whole in float32 before it is cast: its stored bytes, see
            `stream.gpu_cast_bytes`). Each GPU's headroom is at least this much; it is not added to the
            runtime headroom, since loading ends before the first forward.
    """

    strategy: str = "auto"
    dtype: torch.dtype | None = None
    max_memory: Mapping[int | str, int | str] | None = None
    offload_folder: Any = None
    headroom: int | str | Mapping[DeviceLike, int | str] | None = None
    context_length: int | None = None
    batch_size: int = 1
    prefetch: int = 1
    policy: ExecutionPolicy | None = None
    disk_reads: DiskReads | None = None
    keep_in_fp32_modules: tuple[str, ...] | None = None
    special_dtypes: Mapping[str, torch.dtype] | None = None
    no_split_module_classes: tuple[str, ...] | None = None
    cast_bytes: int = 0

    def __post_init__(self) -> None:
        # Normalized once, here, so every reader sees parsed values (names -> dtypes and policies).
        set_ = functools.partial(object.__setattr__, self)
        if self.dtype is not None:
            set_("dtype", parse_dtype(self.dtype))
        if self.policy is not None:
            set_("policy", ExecutionPolicy.parse(self.policy))
        if self.disk_reads is not None:
            set_("disk_reads", DiskReads.parse(self.disk_reads))
        if self.special_dtypes is not None:
            set_("special_dtypes", {name: parse_dtype(v) for name, v in self.special_dtypes.items()})
        for name in ("keep_in_fp32_modules", "no_split_module_classes"):
            value = getattr(self, name)
            if value is not None:
                set_(name, (value,) if isinstance(value, str) else tuple(value))

    def with_settings(self, **settings: Any) -> "PlanOptions":
        """A copy with some settings changed.

        Raises:
            TypeError: a name that is no planning setting.
        """
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown planning setting(s) {unknown}; see bigload.plan.planner.PlanOptions.")
        return dataclasses.replace(self, **settings)


def plan(inventory: Inventory, budget: Budget, options: PlanOptions | None = None, *, collapse: bool = True,
         **settings: Any) -> Plan:
    """Plan where every block of `inventory` goes under `budget`.

    Args:
        inventory: from `inventory_from_module` or `inventory_from_checkpoint`.
        budget: bytes per device (`budget.detect_budget`, `budget.parse_max_memory` or `Budget.of`).
        options: the planning settings (`PlanOptions`); its `strategy`, `dtype` (must be the inventory's
            when given: weights are sized by the inventory), `headroom`, `context_length`, `batch_size`,
            `prefetch` and `policy` are read here.
        collapse: merge entries into their parent when the whole parent sits on one device and runs there
            (`{"": 0}` when everything is on GPU 0). Offloaded entries are never merged: an entry is the unit
            the runtime brings in at once.
        settings: `PlanOptions` fields given as keywords (`strategy="balanced"`, `policy="local"`, ...),
            overriding `options`.

    Returns:
        A frozen `Plan`.

    Raises:
        PlanError: bad arguments, or the model does not fit; the message says how many bytes are missing on
            which device and what would fix it.
        BudgetError: a headroom size that cannot be read.

    >>> p = plan(inventory, Budget.of({0: 24 * 2**30, "cpu": 64 * 2**30}), context_length=8192)  # doctest: +SKIP
    >>> p.device_map  # doctest: +SKIP
    {'model.embed_tokens': 0, 'model.layers.0': 0, ..., 'lm_head': 'cpu'}
    """
    options = (options or PlanOptions()).with_settings(**settings) if settings else (options or PlanOptions())
    setup = _setup(inventory, budget, options)
    prefetch = options.prefetch
    kv = _KV(inventory, setup.layer_kv)
    ties = _Ties(inventory)
    charges: dict[Device, int] = {}  # main: reserve + KV of offloaded layers; cpu: pinned staging
    walk, needed = _attempt(inventory, setup, kv, ties, charges, prefetch)
    walks = 1
    while any(nbytes > charges.get(device, 0) for device, nbytes in needed.items()):
        charges = ({device: max(nbytes, charges.get(device, 0)) for device, nbytes in needed.items()}
                   if walks < _MAX_WALKS else _upper_bounds(inventory, setup, kv, prefetch))
        walk, needed = _attempt(inventory, setup, kv, ties, charges, prefetch)
        walks += 1
        if walks > _MAX_WALKS + 1:
            raise PlanError(Text("the offload reserve did not settle; give the main device more memory or "
                                 "use ", setting("prefetch", "0"), "."))
    return _build_plan(inventory, setup, walk, options, collapse)


def _setup(inv: Inventory, budget: Budget, options: PlanOptions) -> _Setup:
    strategy, dtype, headroom = options.strategy, options.dtype, options.headroom
    context_length, batch_size, prefetch = options.context_length, options.batch_size, options.prefetch
    cast_bytes = options.cast_bytes
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.")
    requested = options.policy
    if prefetch < 0:
        raise PlanError(Text(setting("prefetch", str(prefetch)),
                             " is negative; use 0 (load on demand) or a positive depth."))
    if batch_size < 1:
        raise PlanError(Text(setting("batch_size", str(batch_size)), " must be at least 1."))
    if cast_bytes < 0:
        raise PlanError(Text(setting("cast_bytes", str(cast_bytes)), " is negative."))
    if context_length is not None and context_length < 0:
        raise PlanError(Text(setting("context_length", str(context_length)), " is negative."))
    target = parse_dtype(dtype) if dtype is not None else None
    if target is not None and inv.dtype is not None and target != inv.dtype:
        raise PlanError(f"dtype={target} differs from the inventory's {inv.dtype}; build the inventory at the "
                        "dtype the model will be loaded in.")
    width = dtype_width(target or inv.dtype) if (target or inv.dtype) is not None else None
    devices = [(device, nbytes) for device, nbytes in budget if nbytes > 0]
    gpus = [device for device, _ in devices if device.is_gpu]
    has_cpu = any(device == CPU for device, _ in devices)
    if not gpus and not has_cpu:
        raise PlanError(Text("the budget has no GPU and no CPU memory, so nothing could run the model; add a "
                             "GPU or a 'cpu' entry to ", setting("max_memory"), "."))
    main = gpus[0] if gpus else CPU
    resolved = strategy if strategy != "auto" else ("balanced" if len(gpus) > 1 else "sequential")
    if not gpus:
        chosen, reason = "local", "no GPU in the budget: every block runs on the CPU."
    elif requested is not None:
        chosen, reason = requested.value, f"CPU-resident blocks use policy '{requested}' as requested."
    else:
        chosen, reason = choose_policy(batch_size, width or (inv.kv.width if inv.kv else 2))
    layer_kv = _layer_kv(inv, context_length, batch_size, width)
    fixed = _fixed_headroom(headroom, devices, bool(gpus), chosen)
    for device, nbytes in devices:
        if device.is_gpu:
            fixed[device] = max(fixed.get(device, 0), cast_bytes)
    slots = tuple(
        _DeviceFill(device, nbytes, fixed.get(device, 0),
              runs_own=device.is_gpu or (device == CPU and (not gpus or chosen == "local")))
        for device, nbytes in devices
    )
    return _Setup(resolved, ExecutionPolicy.parse(chosen), reason, main, slots, layer_kv, budget.sources,
                  _headroom_reason(headroom, fixed, cast_bytes) if gpus else "", options.disk_reads)


def _layer_kv(inv: Inventory, context_length: int | None, batch_size: int, width: int | None) -> int:
    if not context_length:
        return 0
    if inv.kv is None or not inv.kv.layers:
        raise PlanError(
            f"context_length={context_length} needs the model's KV-cache shape, which is unknown here (no "
            "transformers config with num_hidden_layers/num_key_value_heads/head_dim matching the decoder "
            "blocks). Pass a config when building the inventory, or give headroom= explicitly instead."
        )
    return inv.kv.layer_bytes(context_length, batch_size, width)


def default_gpu_headroom(budget: int) -> int:
    """Bytes a GPU with `budget` bytes keeps free by default: max(1 GiB, 5 % of the budget), at most the budget.

    >>> default_gpu_headroom(24 * 2**30) / 2**30
    1.2
    """
    return min(budget, max(DEFAULT_GPU_HEADROOM_MIN, int(budget * DEFAULT_GPU_HEADROOM_FRACTION)))


def _headroom_reason(headroom: object, fixed: Mapping[Device, int], cast_bytes: int) -> str:
    gpus = ", ".join(f"{device} {format_size(nbytes)}" for device, nbytes in sorted(fixed.items()) if device.is_gpu)
    why = ("default max(1 GiB, 5 % of its budget) for CUDA/cuBLAS workspaces, activations and allocator rounding"
           if headroom is None else "as given by headroom=")
    cast = (f"; at least the largest cast while loading ({format_size(cast_bytes)}: a tensor lands in its stored "
            "dtype before it is cast)" if cast_bytes else "")
    return f"each GPU keeps memory free beyond weights, KV cache and reserve ({gpus}): {why}{cast}; pass headroom= " \
           "to change it."


def _fixed_headroom(headroom: int | str | Mapping[DeviceLike, int | str] | None,
                    devices: Sequence[tuple[Device, int]], has_gpu: bool, policy: str) -> dict[Device, int]:
    if headroom is None:
        return {device: default_gpu_headroom(nbytes) for device, nbytes in devices if device.is_gpu}
    known = {device for device, _ in devices}
    if isinstance(headroom, Mapping):
        out: dict[Device, int] = {}
        for key, value in headroom.items():
            device = Device.parse(key)
            if device not in known:
                raise PlanError(f"headroom names {device}, which has no budget; give headroom only for devices "
                                f"in max_memory ({', '.join(str(d) for d in sorted(known))}).")
            out[device] = parse_size(value, what=f"headroom[{key!r}]")
        return out
    amount = parse_size(headroom, what="headroom")
    cpu_runs = not has_gpu or policy == "local"
    return {device: amount for device in known if device.is_gpu or (device == CPU and cpu_runs)}


def _attempt(inv: Inventory, setup: _Setup, kv: _KV, ties: _Ties, charges: Mapping[Device, int],
             prefetch: int) -> tuple[_Walk, dict[Device, int]]:
    """One placement with `charges` set aside per device; returns it and the charges it needs."""
    walk = _balanced_walk(inv, setup, kv, ties, charges)
    offloaded = _offloaded_units(walk, setup)
    slots = _slots(inv, offloaded, prefetch, setup.main.is_gpu, _disk_reads(walk, setup)[0])
    needed = _charges(inv, walk, setup, offloaded, slots)
    main_slot = next(s for s in walk.slots if s.device == setup.main)
    if needed[setup.main] > max(0, main_slot.budget - main_slot.fixed_headroom):  # nothing offloaded needs no room
        raise PlanError(_reserve_message(setup, main_slot, needed[setup.main], walk, offloaded))
    cpu = next((s for s in walk.slots if s.device == CPU), None)
    if cpu is not None and needed.get(CPU, 0) > max(0, cpu.budget - cpu.fixed_headroom):
        raise PlanError(_staging_message(setup, cpu, needed[CPU], offloaded))
    return walk, needed


def _charges(inv: Inventory, walk: _Walk, setup: _Setup, offloaded: Sequence[Unit],
             slots: SlotSpec) -> dict[Device, int]:
    """What a walk with these `slots` needs set aside: on the main device its reserve (`_main_charge`); on the
    CPU, when the budget has one, the slots' pinned staging buffers (none when the slots are on the CPU)."""
    needed = {setup.main: _main_charge(inv, walk, offloaded, slots)}
    if slots.staging_bytes and any(fill.device == CPU for fill in walk.slots):
        needed[CPU] = slots.staging_bytes
    return needed


def _balanced_walk(inv: Inventory, setup: _Setup, kv: _KV, ties: _Ties, charges: Mapping[Device, int]) -> _Walk:
    """Walk with balanced shares; when unsplittable blocks leave the last GPUs short (the shares were met
    but the remainder does not pack), walk again with shares grown by the shortfall, until the GPUs hold
    everything or the shares reach the budgets (then it is a plain fill)."""
    extra = 0
    while True:
        slots = [_DeviceFill(s.device, s.budget, s.fixed_headroom, s.runs_own) for s in setup.slots_template]
        for slot in slots:
            slot.cap = slot.budget - slot.fixed_headroom - charges.get(slot.device, 0)
        targeted = _set_targets(inv, setup.strategy, slots, kv, extra)
        walk = _Walk(inv, slots, kv, ties)
        try:
            walk.run()
        except _NoFit as failure:
            if not targeted:
                raise PlanError(_no_fit_message(inv, setup, kv, walk, failure, charges)) from None
            extra += max(1, inv.total_bytes + kv.total - walk.cum)
            continue
        if targeted and any(not walk.slots[slot].device.is_gpu for slot, _ in walk.units.values()):
            extra += max(1, inv.total_bytes + kv.total - walk.cum)
            continue
        return walk


def _set_targets(inv: Inventory, strategy: str, slots: list[_DeviceFill], kv: _KV, extra: int) -> bool:
    """Give each GPU but the last a cumulative share to stop at; False when the walk is a plain fill."""
    gpu_slots = [s for s in slots if s.device.is_gpu]
    if strategy == "sequential" or len(gpu_slots) < 2:
        return False
    caps = [max(0, s.cap) for s in gpu_slots]
    need = inv.total_bytes + kv.total + extra
    if need >= sum(caps):
        return False  # the GPUs cannot hold everything: fill them, then spill
    shares = [0.0] * len(gpu_slots)
    if strategy == "balanced_low_0":
        shares[0] = max(0, need - sum(caps[1:]))
        rest, weights = need - shares[0], caps[1:]
        for k, cap in enumerate(weights, start=1):
            shares[k] = rest * cap / sum(weights) if sum(weights) else 0.0
    else:
        for k, cap in enumerate(caps):
            shares[k] = need * cap / sum(caps)
    cumulative = 0.0
    for slot, share in zip(gpu_slots[:-1], shares[:-1]):
        cumulative += share
        slot.target_end = cumulative
    return True


def _offloaded_units(walk: _Walk, setup: _Setup) -> list[Unit]:
    return [unit for unit, (slot, _) in walk.units.items() if not walk.slots[slot].runs_own]


def _main_charge(inv: Inventory, walk: _Walk, offloaded: Sequence[Unit], slots: SlotSpec) -> int:
    """What the main device must hold for offloaded blocks: the runtime's slots (`_slots`), the buffers of
    offloaded blocks (they stay resident where the blocks run), and the KV cache of offloaded attention layers."""
    buffers = sum(_unit_buffers(inv, unit) for unit in offloaded)
    kv = sum(walk.units[unit][1] for unit in offloaded)
    return slots.total + buffers + kv


def _slots(inv: Inventory, offloaded: Sequence[Unit], prefetch: int, on_gpu: bool, reads: DiskReads) -> SlotSpec:
    """The runtime's slots: `reserve.slot_count` of them, each the largest offloaded entry's parameters at
    aligned offsets (`Inventory.slot_bytes`; more with explicit reads: `reserve.read_slot_bytes`); on a GPU,
    each with a pinned host staging buffer."""
    count = slot_count([inv.names[i] for i, _ in offloaded], prefetch)
    alignment = slot_alignment(on_gpu)
    params = max((inv.slot_bytes(i, whole=whole, alignment=alignment) for i, whole in offloaded), default=0)
    return SlotSpec(count, read_slot_bytes(params, reads) if count else 0, reads, staged=on_gpu and count > 0)


def _disk_reads(walk: _Walk, setup: _Setup) -> tuple[DiskReads, Text]:
    """How disk blocks come in: as requested, else by `choose_disk_reads` from the disk blocks' bytes and the
    CPU memory this walk leaves (its cap minus what it placed there; none without a CPU budget)."""
    disk = sum(walk.unit_bytes(unit) for unit, (slot, _) in walk.units.items()
               if walk.slots[slot].device.kind is DeviceKind.DISK)
    if setup.disk_reads is not None:
        return setup.disk_reads, Text("disk blocks are brought in as '", str(setup.disk_reads), "', as requested (",
                                      setting("disk_reads", repr(setup.disk_reads.value)), ").")
    left = sum(max(0, fill.cap - fill.used) for fill in walk.slots if fill.device == CPU)
    return choose_disk_reads(disk, left)


def _unit_buffers(inv: Inventory, unit: Unit) -> int:
    i, whole = unit
    return inv.subtree_buffer_bytes(i) if whole else inv.own_buffer_bytes[i]


def _upper_bounds(inv: Inventory, setup: _Setup, kv: _KV, prefetch: int) -> dict[Device, int]:
    """Charges no plan can need more than (the fixed point's way out when it does not settle)."""
    largest = max((inv.subtree_bytes(i) for i in range(len(inv)) if inv.no_split[i] or inv.ends[i] == i + 1),
                  default=0)
    bound = (2 + prefetch) * largest + inv.subtree_buffer_bytes(0) + kv.total
    # Pinned staging: at most twice the slots' bytes (power-of-two rounding), and the slots are in `bound`.
    return {setup.main: bound, CPU: 2 * bound} if setup.main.is_gpu else {setup.main: bound}


# --------------------------------------------------------------------------------------------------
# From a walk to a Plan


def _build_plan(inv: Inventory, setup: _Setup, walk: _Walk, options: PlanOptions, collapse: bool) -> Plan:
    prefetch, context_length, batch_size = options.prefetch, options.context_length, options.batch_size
    dtype = options.dtype
    entries = {unit: (walk.slots[slot], kv) for unit, (slot, kv) in walk.units.items()}
    if collapse:
        entries = _collapse(inv, walk, entries)
    placements = []
    for unit in sorted(entries):
        slot, kv = entries[unit]
        runs_on = slot.device if slot.runs_own else setup.main
        placements.append(Placement(inv.names[unit[0]], slot.device, runs_on, walk.unit_bytes(unit), kv))
    offloaded = [unit for unit, (slot, _) in entries.items() if not slot.runs_own]
    reads, reads_reason = _disk_reads(walk, setup)
    slots = _slots(inv, offloaded, prefetch, setup.main.is_gpu, reads)
    charges = _charges(inv, walk, setup, offloaded, slots)
    offload_kv = sum(kv for unit, (slot, kv) in entries.items() if not slot.runs_own)
    usage = _usage(walk.slots, placements, {**charges, setup.main: charges[setup.main] - offload_kv})
    target = parse_dtype(dtype) if dtype is not None else inv.dtype
    reasons = _reasons(inv, setup, placements, usage, prefetch, offloaded, walk, context_length)
    reasons.extend(_staging_reason(slots, usage))
    if any(p.device.kind is DeviceKind.DISK for p in placements):
        disk_blocks = summarize_names([p.name for p in placements if p.device.kind is DeviceKind.DISK])
        reasons.append(Text(f"{disk_blocks}: ", reads_reason))
    return Plan(
        placements=tuple(placements),
        usage=usage,
        strategy=setup.strategy,
        main_device=setup.main,
        policy=setup.policy,
        prefetch=prefetch,
        slots=slots,
        dtype=str(target).removeprefix("torch.") if target is not None else None,
        context_length=context_length,
        batch_size=batch_size,
        reasons=tuple(reasons),
    )


def _collapse(inv: Inventory, walk: _Walk,
              entries: dict[Unit, tuple[_DeviceFill, int]]) -> dict[Unit, tuple[_DeviceFill, int]]:
    """Merge a split module back into one entry when all of it sits on one device that runs it."""
    out = dict(entries)
    for i in sorted(set(walk.split), reverse=True):  # children before parents
        parts: list[Unit] = [(c, True) for c in inv.children(i)]
        if inv.own_tensors[i]:
            parts.append((i, False))
        if any(part not in out for part in parts):
            continue
        slots = {id(out[part][0]) for part in parts}
        slot = out[parts[0]][0]
        if len(slots) != 1 or not slot.runs_own:
            continue
        kv = sum(out.pop(part)[1] for part in parts)
        out[(i, True)] = (slot, kv)
    return out


def _usage(slots: Sequence[_DeviceFill], placements: Sequence[Placement],
           reserves: Mapping[Device, int]) -> tuple[DeviceUsage, ...]:
    weights: dict[Device, int] = {}
    kv: dict[Device, int] = {}
    active: set[Device] = set()
    for p in placements:
        weights[p.device] = weights.get(p.device, 0) + p.weights
        kv[p.execution_device] = kv.get(p.execution_device, 0) + p.kv
        active.update((p.device, p.execution_device))
    out = []
    for slot in slots:
        fixed = slot.fixed_headroom if slot.device in active else 0
        out.append(DeviceUsage(slot.device, slot.budget, weights.get(slot.device, 0),
                               fixed + kv.get(slot.device, 0), reserves.get(slot.device, 0)))
    return tuple(out)


def _reasons(inv: Inventory, setup: _Setup, placements: Sequence[Placement], usage: Sequence[DeviceUsage],
             prefetch: int, offloaded: Sequence[Unit], walk: _Walk, context_length: int | None) -> list[str]:
    gpus = [u.device for u in usage if u.device.is_gpu]
    reasons = [_strategy_reason(setup.strategy, len(gpus))]
    reasons.extend(_budget_sources(setup.sources, usage))
    reasons.extend(_quantized_reason(inv))
    if any(p.device == CPU for p in placements) and gpus:
        reasons.append(setup.policy_reason)
    if offloaded:
        largest = max(offloaded, key=lambda u: walk.unit_bytes(u))
        slots = slot_count([inv.names[i] for i, _ in offloaded], prefetch)
        reserve = next(u.reserve for u in usage if u.device == setup.main)
        reasons.append(
            f"{len(offloaded)} block(s) are offloaded and run on {setup.main}; it keeps a reserve of "
            f"{format_size(reserve)}: {slots} slot(s) (1 running + prefetch {prefetch}) of the largest offloaded "
            f"block {inv.names[largest[0]] or '(whole model)'!r} plus the buffers of offloaded blocks."
        )
    else:
        reasons.append("nothing is offloaded, so no reserve is kept for bringing weights in.")
    if setup.headroom_reason:
        reasons.append(setup.headroom_reason)
    if setup.layer_kv:
        reasons.append(
            f"headroom includes the KV cache: {format_size(setup.layer_kv)} per attention layer "
            f"(context {context_length}), charged to the device that runs each layer."
        )
    return reasons


def _staging_reason(slots: SlotSpec, usage: Sequence[DeviceUsage]) -> list[str]:
    """Why the CPU keeps a reserve: the pinned staging buffers of GPU slots (or why they are not charged)."""
    if not slots.staging_bytes:
        return []
    what = (f"pinned host staging: each of the {slots.count} slot(s) on the GPU has a page-locked buffer of "
            f"{format_size(slots.nbytes)} that copies of offloaded weights go through ({format_size(slots.staging_bytes)}"
            " as torch's pinned allocator takes it, each rounded up to a power of two)")
    if not any(u.device == CPU for u in usage):
        return [f"{what}; not charged: the budget has no cpu entry, so host memory is not limited."]
    return [f"{what}; unswappable RAM, so it is the cpu's reserve."]


def _quantized_reason(inv: Inventory) -> list[str]:
    """What quantization the inventory decided, and that its bytes are the ones planned."""
    entries = inv.quantized()
    if not entries:
        return []
    modules: dict[str, dict[str, None]] = {}  # scheme (with how it runs, `QuantLinear.bigload_quantized`) -> names
    for entry in entries:
        modules.setdefault(entry.scheme, {})[inv.names[entry.module]] = None
    layers = sum(len(names) for names in modules.values())
    schemes = "; ".join(scheme if len(modules) == 1 else f"{scheme}: {summarize_names(list(names))}"
                        for scheme, names in sorted(modules.items()))
    return [f"{layers} Linear layer(s) are quantized ({schemes}): planned at their quantized bytes, scales and "
            f"zeros included ({format_size(sum(entry.nbytes for entry in entries))})."]


def _budget_sources(sources: Sequence[tuple[Device, str]], usage: Sequence[DeviceUsage]) -> list[str]:
    """Where each budget figure came from (max_memory, a memory cgroup, psutil, free disk space)."""
    budgets = {u.device: u.budget for u in usage}
    stated = [(device, source) for device, source in sources if device in budgets]
    if not stated:
        return []
    if len(stated) > 1 and len({source for _, source in stated}) == 1:
        return [f"budgets: {', '.join(str(device) for device, _ in stated)} from {stated[0][1]}."]
    return ["budgets: " + "; ".join(f"{device} {format_size(budgets[device])} from {source}"
                                    for device, source in stated) + "."]


def _strategy_reason(strategy: str, gpus: int) -> str:
    text = {
        "sequential": "sequential: each device is filled in order before the next.",
        "balanced": "balanced: each GPU takes a share proportional to its usable memory; cpu and disk take "
                    "only what the GPUs cannot hold.",
        "balanced_low_0": "balanced_low_0: GPUs 1.. share the model; GPU 0 takes only what does not fit there, "
                          "keeping room for generation.",
    }[strategy]
    return f"{text} ({gpus} GPU(s) in the budget)"


# --------------------------------------------------------------------------------------------------
# When nothing fits


def _no_fit_message(inv: Inventory, setup: _Setup, kv: _KV, walk: _Walk, failure: _NoFit,
                    charges: Mapping[Device, int]) -> Text:
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
    for slot in failure.slots:
        footprint = unit_bytes + (unit_kv if slot.runs_own else 0)
        free = max(0, slot.cap - slot.used)
        free_total += free
        reserved = slot.fixed_headroom + charges.get(slot.device, 0)
        staging = (f" (pinned staging {format_size(charges[CPU])})"
                   if slot.device == CPU and charges.get(CPU) and setup.main != CPU else "")
        lines.append(
            f"  {slot.device}: budget {format_size(slot.budget)}, used {format_size(slot.used)}, kept free "
            f"{format_size(reserved)}{staging}; {format_size(max(0, footprint - free))} ({max(0, footprint - free)} bytes) "
            f"missing for {name!r}"
        )
    missing = max(0, remaining + (kv.total if setup.layer_kv else 0) - free_total)
    lines.append(f"  in all about {format_size(missing)} ({missing} bytes) are missing.")
    fixes: list[Text] = []
    if not any(slot.device.kind is DeviceKind.DISK for slot in failure.slots):
        fixes.append(Text("add a disk budget and an offload folder (", _ADD_DISK, ")"))
    if setup.layer_kv:
        fixes.append(Text("lower ", setting("context_length"), " or ", setting("batch_size"),
                          f" (the KV cache takes {format_size(kv.total)})"))
    if any(slot.fixed_headroom for slot in failure.slots):
        fixes.append(Text("lower headroom"))
    if charges.get(CPU) and setup.main != CPU:
        fixes.append(Text("use ", setting("prefetch", "0"), " (fewer pinned staging buffers on the cpu)"))
    fixes.append(Text("give the devices more memory (", setting("max_memory"), ")"))
    return Text("\n".join(lines), "\nfix: ", *_joined(fixes, "; or "), ".")


_ADD_DISK = Setting("max_memory={..., 'disk': '200GiB'}, offload_folder=...",
                    "--max-memory ...,disk=200GiB --offload-folder DIR")


def _joined(texts: Sequence[Text], separator: str) -> list[Text | str]:
    """`texts` with `separator` between them, as parts of one `Text`."""
    out: list[Text | str] = []
    for i, text in enumerate(texts):
        out.extend((separator, text) if i else (text,))
    return out


def _reserve_message(setup: _Setup, slot: _DeviceFill, needed: int, walk: _Walk, offloaded: Sequence[Unit]) -> Text:
    room = slot.budget - slot.fixed_headroom
    local = (Text(", or ", setting("policy", "'local'"), " so CPU-resident blocks run on the CPU")
             if setup.policy == "stream" else "")
    return Text(
        f"the main device {setup.main} cannot hold what offloaded blocks need while they run: "
        f"{format_size(needed)} (prefetch slots of the largest of {len(offloaded)} offloaded block(s), their "
        f"buffers and KV cache) but only {format_size(max(0, room))} is available there; "
        f"{needed - max(0, room)} bytes are missing. Fix: give {setup.main} more memory, use ",
        setting("prefetch", "0"), ", lower ", setting("context_length"), local, "."
    )


def _staging_message(setup: _Setup, cpu: _DeviceFill, needed: int, offloaded: Sequence[Unit]) -> Text:
    room = max(0, cpu.budget - cpu.fixed_headroom)
    return Text(
        f"the cpu cannot hold the pinned staging buffers that copies of the {len(offloaded)} offloaded block(s) "
        f"to {setup.main} go through: {format_size(needed)} of page-locked memory (one buffer per slot, the "
        f"size of the largest offloaded block) but the cpu budget leaves {format_size(room)}; "
        f"{needed - room} bytes are missing. Fix: give the cpu more memory (", setting("max_memory"), "), use ",
        setting("prefetch", "0"), ", or give ", str(setup.main), " more memory so fewer blocks are offloaded."
    )
