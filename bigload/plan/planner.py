"""The planner: where every block of a model goes, as arithmetic over sizes.

Pure: it imports no I/O and probes nothing; `budget.py` measures the machine and passes a `Budget` in.

`plan` walks the inventory in execution order (`walk.Walk`), placing units on devices in order (GPUs by
index, then cpu, then disk). Strategies differ only in how much each GPU is allowed to take before the walk
moves on:

- `sequential` fills each device up to its budget;
- `balanced` gives each GPU a share of the model proportional to its usable memory (budget minus headroom
  and reserve) and moves on when a block's midpoint passes that share, so models with uneven layers (MoE,
  big embeddings) still spread evenly; when the GPUs cannot hold everything they are simply filled;
- `balanced_low_0` balances over GPUs 1..n-1 and gives GPU 0 only what does not fit there;
- `auto` is `balanced` with several GPUs, `sequential` otherwise.

`plan_for_map` (in `given.py`) plans a device map the caller gave; both end in `finish`, so every plan
decides the same things the same way: execution devices (the policy applied), the slots and their staging,
how disk blocks come in, the int4 byte order of every block, and what each device is charged.

Per device the plan charges weights, headroom (a fixed amount plus the KV cache of the attention layers
that run there, when a context length is given) and reserves. On the main device, the offload reserve: what
the runtime's prefetcher really holds (`min(nesting + prefetch, blocks)` slots of the largest offloaded
block's parameters, plus the buffers of offloaded blocks, which stay resident unless `offload_buffers`).
When the main device is a GPU, the CPU's reserve is the slots' pinned host staging buffers
(`SlotSpec.staging_bytes`: page-locked RAM, which the CPU budget must pay for like weights). Both depend on
what gets offloaded, so the walk is repeated with growing charges until they cover what the resulting plan
needs (a fixed point, usually two walks).

CPU-resident blocks, when a GPU exists, either stream their weights to the GPU for every forward (accelerate's
behaviour) or run on the CPU, moving only activations. The default follows a bandwidth model of one decode
step (`options.choose_policy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from bigload.devices import CPU, Budget, Device, DeviceKind, ExecutionPolicy
from bigload.errors import PlanError
from bigload.messages import Text, setting
from bigload.plan.inventory import Inventory, TensorEntry
from bigload.plan.options import (
    STRATEGIES,
    PlanOptions,
    choose_policy,
    default_gpu_headroom,
    fixed_headroom,
    headroom_reason,
)
from bigload.plan.reserve import DiskReads, SlotSpec, choose_disk_reads, read_slot_bytes, slot_alignment, slot_bytes, slot_count
from bigload.plan.shortfall import no_fit_message, reserve_message, staging_message
from bigload.plan.value import DeviceUsage, Placement, Plan
from bigload.plan.walk import KV, Fill, NoFit, Ties, Unit, Walk
from bigload.quant import Layout
from bigload.sizes import dtype_width, format_size
from bigload.tensors import summarize_names

__all__ = [
    "STRATEGIES",
    "Block",
    "DeviceUsage",
    "Placement",
    "Plan",
    "PlanOptions",
    "Setup",
    "choose_policy",
    "default_gpu_headroom",
    "disk_bytes",
    "disk_reads",
    "charges_for",
    "slots_for",
    "finish",
    "plan",
    "setup",
]

_MAX_WALKS = 32


# --------------------------------------------------------------------------------------------------
# What both planners decide from


@dataclass(frozen=True)
class Setup:
    """What a plan is made under: resolved strategy, policy and main device, the budget devices as empty
    fills, the KV cache per attention layer, and the settings."""

    strategy: str
    policy: ExecutionPolicy
    policy_reason: str
    main: Device
    fills: tuple[Fill, ...]
    layer_kv: int
    sources: tuple[tuple[Device, str], ...]
    options: PlanOptions
    headroom_reason: str = ""

    def fresh_fills(self, charges: Mapping[Device, int]) -> list[Fill]:
        """Empty fills whose caps leave `charges` (reserve, staging) aside."""
        fills = [Fill(f.device, f.budget, f.fixed_headroom, f.runs_own) for f in self.fills]
        for fill in fills:
            fill.cap = fill.budget - fill.fixed_headroom - charges.get(fill.device, 0)
        return fills

    def runs_on(self, fill: Fill) -> Device:
        """Where a block placed on `fill` runs: there when that device runs its own blocks, else the main device."""
        return fill.device if fill.runs_own else self.main


def setup(inv: Inventory, budget: Budget, options: PlanOptions, *, given: Sequence[Device] | None = None) -> Setup:
    """Resolve the settings for `inv` under `budget`. `given`: the devices of a map the caller gave (its main
    device and policy follow accelerate: the map's first GPU; streaming unless `policy` says otherwise).

    Raises:
        PlanError: nothing could run the model, a dtype other than the inventory's, or no KV-cache shape for
            `context_length`.
    """
    target = options.dtype
    if target is not None and inv.dtype is not None and target != inv.dtype:
        raise PlanError(f"dtype={target} differs from the inventory's {inv.dtype}; build the inventory at the "
                        "dtype the model will be loaded in.")
    devices = [(device, nbytes) for device, nbytes in budget if nbytes > 0]
    if given is not None:
        devices += [(device, 0) for device in dict.fromkeys(given) if device not in dict(devices)]
        devices.sort()
    main = _main_device(devices, options, given)
    if main not in dict(devices):  # a given main device the map and the budget do not name: it runs blocks
        devices = sorted([*devices, (main, 0)])
    policy, reason = _policy(inv, options, main, given is not None)
    width = dtype_width(target or inv.dtype) if (target or inv.dtype) is not None else None
    cpu_runs = main == CPU or policy is ExecutionPolicy.LOCAL
    fixed = fixed_headroom(options.headroom, devices, cpu_runs, inv.cast_bytes)
    fills = tuple(Fill(device, nbytes, fixed.get(device, 0), runs_own=device.is_gpu or (device == CPU and cpu_runs))
                  for device, nbytes in devices)
    gpus = any(device.is_gpu for device, _ in devices)
    strategy = "given" if given is not None else _strategy(options.strategy, devices)
    return Setup(strategy, policy, reason, main, fills, _layer_kv(inv, options, width), budget.sources, options,
                 headroom_reason(options.headroom, fixed, inv.cast_bytes) if gpus else "")


def _strategy(strategy: str, devices: Sequence[tuple[Device, int]]) -> str:
    gpus = sum(1 for device, _ in devices if device.is_gpu)
    return strategy if strategy != "auto" else ("balanced" if gpus > 1 else "sequential")


def _main_device(devices: Sequence[tuple[Device, int]], options: PlanOptions, given: Sequence[Device] | None) -> Device:
    """Where offloaded blocks run: `main_device` when given; for a map, its first GPU (accelerate's rule); for
    a strategy, the budget's first GPU; else the CPU."""
    if options.main_device is not None:
        return options.main_device
    order = given if given is not None else [device for device, _ in devices]
    gpus = [device for device in order if device.is_gpu]
    if not gpus and not any(device == CPU for device, _ in devices):
        raise PlanError(Text("the budget has no GPU and no CPU memory, so nothing could run the model; add a "
                             "GPU or a 'cpu' entry to ", setting("max_memory"), "."))
    return gpus[0] if gpus else CPU


def _policy(inv: Inventory, options: PlanOptions, main: Device, given: bool) -> tuple[ExecutionPolicy, str]:
    if not main.is_gpu:
        return ExecutionPolicy.LOCAL, "no GPU in the budget: every block runs on the CPU."
    if options.policy is not None:
        return options.policy, f"CPU-resident blocks use policy '{options.policy}' as requested."
    if given:
        return ExecutionPolicy.STREAM, Text("CPU-resident blocks of the given map stream their weights to the GPU, "
                                            "as accelerate runs them; pass ", setting("policy", "'local'"),
                                            " to run them on the CPU.")
    width = dtype_width(options.dtype or inv.dtype) if (options.dtype or inv.dtype) else (inv.kv.width if inv.kv else 2)
    choice, reason = choose_policy(options.batch_size, width)
    return ExecutionPolicy.parse(choice), reason


def _layer_kv(inv: Inventory, options: PlanOptions, width: int | None) -> int:
    if not options.context_length:
        return 0
    if inv.kv is None or not inv.kv.layers:
        raise PlanError(
            f"context_length={options.context_length} needs the model's KV-cache shape, which is unknown here (no "
            "transformers config with num_hidden_layers/num_key_value_heads/head_dim matching the decoder "
            "blocks). Pass a config when building the inventory, or give headroom= explicitly instead."
        )
    return inv.kv.layer_bytes(options.context_length, options.batch_size, width)


# --------------------------------------------------------------------------------------------------
# Blocks: a device-map entry as the reserve, usage and packing rules see it


@dataclass(frozen=True)
class Block:
    """One device-map entry, sized: where it lives and runs, its weights and KV cache, what a slot holding it
    needs on the main device, the buffers it keeps resident where it runs, and whether it holds int4 weights."""

    name: str
    fill: Fill
    execution_device: Device
    weights: int
    kv: int
    slot_bytes: int
    resident_buffers: int
    int4: bool
    brought_in: int = 0  # tensors the runtime brings into a slot for each forward (when offloaded)

    @property
    def offloaded(self) -> bool:
        return self.fill.device != self.execution_device

    @property
    def in_slots(self) -> bool:
        """Offloaded with tensors to bring in: it takes a slot while it runs (a block whose tensors all stay
        where it runs, such as a buffers-only module, takes none)."""
        return self.offloaded and self.brought_in > 0


def _unit_block(inv: Inventory, setup_: Setup, unit: Unit, fill: Fill, kv: int) -> Block:
    i, whole = unit
    offload_buffers = setup_.options.offload_buffers
    alignment = slot_alignment(setup_.main.is_gpu)
    buffers = inv.subtree_buffer_bytes(i) if whole else inv.own_buffer_bytes[i]
    end = inv.ends[i] if whole else i + 1
    shared = [entry for entry in tied_elsewhere(inv, lambda name: i <= inv.module_of(name) < end)
              if offload_buffers or not entry.buffer]
    return Block(inv.names[i], fill, setup_.runs_on(fill), inv.subtree_bytes(i) if whole else inv.own_bytes[i], kv,
                 inv.slot_bytes(i, whole=whole, alignment=alignment, buffers=offload_buffers)
                 + slot_bytes((entry.nbytes for entry in shared), alignment),
                 0 if offload_buffers else buffers, inv.holds_int4(i, whole=whole),
                 inv.brought_in(i, whole=whole, buffers=offload_buffers) + len(shared))


def tied_elsewhere(inv: Inventory, inside: Callable[[str], bool]) -> list[TensorEntry]:
    """Tied tensors a block uses under one of its names whose bytes are counted in another block (their first
    name is outside it): the runtime brings them into this block's slot too, so its slot is sized with them."""
    return [inv.tensor(group[0]) for group in inv.tied_groups
            if not inside(group[0]) and any(inside(alias) for alias in group[1:])]


# --------------------------------------------------------------------------------------------------
# plan()


def plan(inventory: Inventory, budget: Budget, options: PlanOptions | None = None, *, collapse: bool = True,
         **settings: Any) -> Plan:
    """Plan where every block of `inventory` goes under `budget`.

    Args:
        inventory: from `inventory_from_module` or `inventory_from_checkpoint`.
        budget: bytes per device (`budget.detect_budget`, `budget.parse_max_memory` or `Budget.of`).
        options: the planning settings (`PlanOptions`); its `strategy`, `dtype` (must be the inventory's
            when given: weights are sized by the inventory), `headroom`, `context_length`, `batch_size`,
            `prefetch`, `policy`, `disk_reads` and `offload_buffers` are read here.
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
    setup_ = setup(inventory, budget, options)
    kv = KV(inventory, setup_.layer_kv)
    ties = Ties(inventory)
    charges: dict[Device, int] = {}  # main: reserve + KV of offloaded layers; cpu: pinned staging
    walk, needed = _attempt(inventory, setup_, kv, ties, charges)
    walks = 1
    while any(nbytes > charges.get(device, 0) for device, nbytes in needed.items()):
        charges = ({device: max(nbytes, charges.get(device, 0)) for device, nbytes in needed.items()}
                   if walks < _MAX_WALKS else _upper_bounds(inventory, setup_, kv))
        walk, needed = _attempt(inventory, setup_, kv, ties, charges)
        walks += 1
        if walks > _MAX_WALKS + 1:
            raise PlanError(Text("the offload reserve did not settle; give the main device more memory or "
                                 "use ", setting("prefetch", "0"), "."))
    entries = {unit: (walk.fills[index], unit_kv) for unit, (index, unit_kv) in walk.units.items()}
    if collapse:
        entries = _collapse(inventory, walk, entries)
    blocks = [_unit_block(inventory, setup_, unit, fill, unit_kv) for unit, (fill, unit_kv) in sorted(entries.items())]
    return finish(inventory, setup_, blocks, walk.fills)


def _attempt(inv: Inventory, setup_: Setup, kv: KV, ties: Ties,
             charges: Mapping[Device, int]) -> tuple[Walk, dict[Device, int]]:
    """One placement with `charges` set aside per device; returns it and the charges it needs."""
    walk = _balanced_walk(inv, setup_, kv, ties, charges)
    offloaded = [_unit_block(inv, setup_, unit, walk.fills[index], unit_kv)
                 for unit, (index, unit_kv) in walk.units.items() if not walk.fills[index].runs_own]
    slots = slots_for(offloaded, setup_, disk_reads(setup_, walk.fills, disk_bytes(offloaded))[0])
    needed = charges_for(offloaded, slots, setup_, walk.fills)
    main_fill = next(f for f in walk.fills if f.device == setup_.main)
    if needed[setup_.main] > max(0, main_fill.budget - main_fill.fixed_headroom):  # nothing offloaded needs no room
        raise PlanError(reserve_message(setup_.main, setup_.policy, main_fill, needed[setup_.main], len(offloaded)))
    cpu = next((f for f in walk.fills if f.device == CPU), None)
    if cpu is not None and needed.get(CPU, 0) > max(0, cpu.budget - cpu.fixed_headroom):
        raise PlanError(staging_message(setup_.main, cpu, needed[CPU], len(offloaded)))
    return walk, needed


def _balanced_walk(inv: Inventory, setup_: Setup, kv: KV, ties: Ties, charges: Mapping[Device, int]) -> Walk:
    """Walk with balanced shares; when unsplittable blocks leave the last GPUs short (the shares were met
    but the remainder does not pack), walk again with shares grown by the shortfall, until the GPUs hold
    everything or the shares reach the budgets (then it is a plain fill)."""
    extra = 0
    while True:
        fills = setup_.fresh_fills(charges)
        targeted = _set_targets(inv, setup_.strategy, fills, kv, extra)
        walk = Walk(inv, fills, kv, ties)
        try:
            walk.run()
        except NoFit as failure:
            if not targeted:
                raise PlanError(no_fit_message(inv, setup_.main, setup_.layer_kv, kv, walk, failure, charges)) from None
            extra += max(1, inv.total_bytes + kv.total - walk.cum)
            continue
        if targeted and any(not walk.fills[index].device.is_gpu for index, _ in walk.units.values()):
            extra += max(1, inv.total_bytes + kv.total - walk.cum)
            continue
        return walk


def _set_targets(inv: Inventory, strategy: str, fills: list[Fill], kv: KV, extra: int) -> bool:
    """Give each GPU but the last a cumulative share to stop at; False when the walk is a plain fill."""
    gpu_fills = [f for f in fills if f.device.is_gpu]
    if strategy == "sequential" or len(gpu_fills) < 2:
        return False
    caps = [max(0, f.cap) for f in gpu_fills]
    need = inv.total_bytes + kv.total + extra
    if need >= sum(caps):
        return False  # the GPUs cannot hold everything: fill them, then spill
    shares = [0.0] * len(gpu_fills)
    if strategy == "balanced_low_0":
        shares[0] = max(0, need - sum(caps[1:]))
        rest, weights = need - shares[0], caps[1:]
        for k, cap in enumerate(weights, start=1):
            shares[k] = rest * cap / sum(weights) if sum(weights) else 0.0
    else:
        for k, cap in enumerate(caps):
            shares[k] = need * cap / sum(caps)
    cumulative = 0.0
    for fill, share in zip(gpu_fills[:-1], shares[:-1]):
        cumulative += share
        fill.target_end = cumulative
    return True


def _upper_bounds(inv: Inventory, setup_: Setup, kv: KV) -> dict[Device, int]:
    """Charges no plan can need more than (the fixed point's way out when it does not settle)."""
    largest = max((inv.subtree_bytes(i) for i in range(len(inv)) if inv.no_split[i] or inv.ends[i] == i + 1),
                  default=0)
    bound = (2 + setup_.options.prefetch) * largest + inv.subtree_buffer_bytes(0) + kv.total
    # Pinned staging: at most twice the slots' bytes (power-of-two rounding), and the slots are in `bound`.
    return {setup_.main: bound, CPU: 2 * bound} if setup_.main.is_gpu else {setup_.main: bound}


def _collapse(inv: Inventory, walk: Walk, entries: dict[Unit, tuple[Fill, int]]) -> dict[Unit, tuple[Fill, int]]:
    """Merge a split module back into one entry when all of it sits on one device that runs it."""
    out = dict(entries)
    for i in sorted(set(walk.split), reverse=True):  # children before parents
        parts: list[Unit] = [(c, True) for c in inv.children(i)]
        if inv.own_tensors[i]:
            parts.append((i, False))
        if any(part not in out for part in parts):
            continue
        fills = {id(out[part][0]) for part in parts}
        fill = out[parts[0]][0]
        if len(fills) != 1 or not fill.runs_own:
            continue
        kv = sum(out.pop(part)[1] for part in parts)
        out[(i, True)] = (fill, kv)
    return out


# --------------------------------------------------------------------------------------------------
# From blocks to a Plan: the part every plan shares


def slots_for(offloaded: Sequence[Block], setup_: Setup, reads: DiskReads) -> SlotSpec:
    """The runtime's slots: `reserve.slot_count` of them over the blocks that take one, each the largest at
    aligned offsets (more with explicit reads: `reserve.read_slot_bytes`); on a GPU, each with a pinned host
    staging buffer."""
    taking = [block for block in offloaded if block.in_slots]
    count = slot_count([block.name for block in taking], setup_.options.prefetch)
    largest = max((block.slot_bytes for block in taking), default=0)
    return SlotSpec(count, read_slot_bytes(largest, reads) if count else 0, reads,
                    staged=setup_.main.is_gpu and count > 0)


def charges_for(offloaded: Sequence[Block], slots: SlotSpec, setup_: Setup, fills: Sequence[Fill]) -> dict[Device, int]:
    """What offloaded blocks need set aside: on the main device the slots, their resident buffers and the KV
    cache of their attention layers; on the CPU, when the budget has one, the slots' pinned staging."""
    needed = {setup_.main: slots.total + sum(b.resident_buffers + b.kv for b in offloaded)}
    if slots.staging_bytes and any(fill.device == CPU for fill in fills):
        needed[CPU] = slots.staging_bytes
    return needed


def disk_reads(setup_: Setup, fills: Sequence[Fill], disk_bytes: int) -> tuple[DiskReads, Text]:
    """How disk blocks come in: as requested, else by `choose_disk_reads` from their bytes and the CPU memory
    the placement leaves (the CPU's cap minus what it holds; none without a CPU budget)."""
    requested = setup_.options.disk_reads
    if requested is not None:
        return requested, Text("disk blocks are brought in as '", str(requested), "', as requested (",
                               setting("disk_reads", repr(requested.value)), ").")
    left = sum(max(0, fill.cap - fill.used) for fill in fills if fill.device == CPU)
    return choose_disk_reads(disk_bytes, left)


def disk_bytes(blocks: Iterable[Block]) -> int:
    return sum(block.weights for block in blocks if block.fill.device.kind is DeviceKind.DISK)


def finish(inv: Inventory, setup_: Setup, blocks: Sequence[Block], fills: Sequence[Fill]) -> Plan:
    """The plan of `blocks` placed on `fills`: placements, slots, charges, usage and reasons."""
    options = setup_.options
    placements = tuple(Placement(b.name, b.fill.device, b.execution_device, b.weights, b.kv, _int4_layout(b))
                       for b in blocks)
    offloaded = [block for block in blocks if block.offloaded]
    reads, reads_reason = disk_reads(setup_, fills, disk_bytes(blocks))
    slots = slots_for(offloaded, setup_, reads)
    charges = charges_for(offloaded, slots, setup_, fills)
    offload_kv = sum(block.kv for block in offloaded)
    usage = _usage(fills, placements, {**charges, setup_.main: charges[setup_.main] - offload_kv})
    reasons = _reasons(inv, setup_, placements, usage, offloaded)
    reasons.extend(_staging_reason(slots, usage))
    if any(p.device.kind is DeviceKind.DISK for p in placements):
        disk_blocks = summarize_names([p.name for p in placements if p.device.kind is DeviceKind.DISK])
        reasons.append(Text(f"{disk_blocks}: ", reads_reason))
    target = options.dtype if options.dtype is not None else inv.dtype
    return Plan(
        placements=placements,
        usage=usage,
        strategy=setup_.strategy,
        main_device=setup_.main,
        policy=setup_.policy,
        prefetch=options.prefetch,
        slots=slots,
        offload_buffers=options.offload_buffers,
        quantize=", ".join(sorted({entry.scheme for entry in inv.quantized()})) or None,
        dtype=str(target).removeprefix("torch.") if target is not None else None,
        context_length=options.context_length,
        batch_size=options.batch_size,
        reasons=tuple(reasons),
    )


def _int4_layout(block: Block) -> Layout | None:
    """The byte order of a block's int4 weights: the layout of the device that runs it."""
    if not block.int4:
        return None
    return Layout.NIBBLES if block.execution_device.is_gpu else Layout.CPU


def _usage(fills: Sequence[Fill], placements: Sequence[Placement],
           reserves: Mapping[Device, int]) -> tuple[DeviceUsage, ...]:
    weights: dict[Device, int] = {}
    kv: dict[Device, int] = {}
    active: set[Device] = set()
    for p in placements:
        weights[p.device] = weights.get(p.device, 0) + p.weights
        kv[p.execution_device] = kv.get(p.execution_device, 0) + p.kv
        active.update((p.device, p.execution_device))
    out = []
    for fill in fills:
        fixed = fill.fixed_headroom if fill.device in active else 0
        out.append(DeviceUsage(fill.device, fill.budget, weights.get(fill.device, 0),
                               fixed + kv.get(fill.device, 0), reserves.get(fill.device, 0)))
    return tuple(out)


def _reasons(inv: Inventory, setup_: Setup, placements: Sequence[Placement], usage: Sequence[DeviceUsage],
             offloaded: Sequence[Block]) -> list[str]:
    gpus = [u.device for u in usage if u.device.is_gpu]
    reasons = [_strategy_reason(setup_.strategy, len(gpus), len(placements))]
    reasons.extend(_budget_sources(setup_.sources, usage))
    reasons.extend(_quantized_reason(inv, placements))
    if any(p.device == CPU for p in placements) and setup_.main.is_gpu:
        reasons.append(setup_.policy_reason)
    prefetch = setup_.options.prefetch
    taking = [block for block in offloaded if block.in_slots]
    if taking:
        largest = max(taking, key=lambda b: b.weights)
        count = slot_count([b.name for b in taking], prefetch)
        reserve = next(u.reserve for u in usage if u.device == setup_.main)
        buffers = "with their buffers (offload_buffers=True)" if setup_.options.offload_buffers else \
            "plus the buffers of offloaded blocks"
        weightless = [block.name for block in offloaded if not block.in_slots]
        holds = "holds" if len(weightless) == 1 else "hold"
        also = f" ({summarize_names(weightless)}, offloaded too, {holds} no weight to bring in)" if weightless else ""
        reasons.append(
            f"{len(taking)} block(s) are offloaded and run on {setup_.main}{also}; it keeps a reserve of "
            f"{format_size(reserve)}: {count} slot(s) (1 running + prefetch {prefetch}) of the largest offloaded "
            f"block {largest.name or '(whole model)'!r} {buffers}."
        )
    else:
        reasons.append("nothing is offloaded, so no reserve is kept for bringing weights in.")
    if setup_.headroom_reason:
        reasons.append(setup_.headroom_reason)
    if setup_.layer_kv:
        reasons.append(
            f"headroom includes the KV cache: {format_size(setup_.layer_kv)} per attention layer "
            f"(context {setup_.options.context_length}), charged to the device that runs each layer."
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


def _quantized_reason(inv: Inventory, placements: Sequence[Placement]) -> list[str]:
    """What quantization the inventory decided, that its bytes are the ones planned, and the int4 byte order."""
    entries = inv.quantized()
    if not entries:
        return []
    modules: dict[str, dict[str, None]] = {}  # scheme, and how it runs where that differs -> module names
    for entry in entries:
        how = f"{entry.scheme}, {entry.kernel}" if entry.kernel else entry.scheme
        modules.setdefault(how, {})[inv.names[entry.module]] = None
    layers = sum(len(names) for names in modules.values())
    schemes = "; ".join(how if len(modules) == 1 else f"{how}: {summarize_names(list(names))}"
                        for how, names in sorted(modules.items()))
    reasons = [f"{layers} Linear layer(s) are quantized ({schemes}): planned at their quantized bytes, scales and "
               f"zeros included ({format_size(sum(entry.nbytes for entry in entries))})."]
    for layout, what in ((Layout.CPU, "the CPU's"), (Layout.NIBBLES, "CUDA's")):
        names = [p.name for p in placements if p.int4_layout is layout]
        if names:
            reasons.append(f"int4 weights of {summarize_names(names)} are packed in {what} byte order: that is "
                           "where those blocks run.")
    return reasons


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


def _strategy_reason(strategy: str, gpus: int, entries: int) -> str:
    if strategy == "given":
        return f"the device map was given ({entries} entries): bigload places what it says and plans the rest."
    text = {
        "sequential": "sequential: each device is filled in order before the next.",
        "balanced": "balanced: each GPU takes a share proportional to its usable memory; cpu and disk take "
                    "only what the GPUs cannot hold.",
        "balanced_low_0": "balanced_low_0: GPUs 1.. share the model; GPU 0 takes only what does not fit there, "
                          "keeping room for generation.",
    }[strategy]
    return f"{text} ({gpus} GPU(s) in the budget)"
