"""Splitting a model across hosts: which contiguous range of decoder blocks each rank owns. Pure.

A pipeline over `torch.distributed` ranks runs the decoder stack in order, one contiguous range of blocks per
rank, and the hidden state goes around a ring: rank 0 embeds the tokens, runs its blocks, sends the hidden
state to rank 1, ..., the last rank sends it back to rank 0, which applies the final norm and the head. So
rank 0 holds both ends of the model (the embeddings and the head are often one tied tensor, and `generate`
runs there), and only hidden states, never logits, cross the wire.

`split_hosts` decides the ranges (contiguous, at least one block per rank, balanced by bytes relative to
each host's memory, never cutting a tied group); `plan_hosts` then plans each host's part with the ordinary
planner (`plan.plan` on `inventory.sub_inventory`). Nothing here reads a file or probes a device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from bigload.devices import Budget
from bigload.errors import BigloadError, PlanError
from bigload.plan.inventory import Inventory, decoder_blocks, sub_inventory
from bigload.plan.planner import Plan, plan
from bigload.sizes import format_size
from bigload.tensors import owner_of

__all__ = ["HostPlan", "HostSplit", "Stage", "host_capacity", "plan_hosts", "split_hosts"]

_JSON_VERSION = 1


@dataclass(frozen=True)
class Stage:
    """What one rank owns.

    Attributes:
        rank: the `torch.distributed` rank (0 holds the model's ends).
        blocks: the blocks whose weights this rank loads, in execution order.
        shared: modules holding only computed buffers (rotary embeddings), built on every rank.
        first_layer, end_layer: its decoder blocks are `layers[first_layer:end_layer]` of the split.
        weight_bytes: bytes of the blocks' weights at the target dtype.
        capacity: the host memory (GPUs + cpu budgets) its share was balanced against.
    """

    rank: int
    blocks: tuple[str, ...]
    shared: tuple[str, ...]
    first_layer: int
    end_layer: int
    weight_bytes: int
    capacity: int

    @property
    def modules(self) -> tuple[str, ...]:
        """Every module this rank builds and loads: its blocks and the shared ones."""
        return self.blocks + self.shared


@dataclass(frozen=True)
class HostSplit:
    """The split of a model over ranks. Frozen; every rank computes the same one from the same inputs.

    Attributes:
        layers: the decoder blocks in execution order.
        ends: the blocks before and after the stack (embeddings, final norm, head): rank 0's.
        stages: one per rank.
        reasons: why each boundary is where it is.
    """

    layers: tuple[str, ...]
    ends: tuple[str, ...]
    stages: tuple[Stage, ...]
    reasons: tuple[str, ...]

    @property
    def hosts(self) -> int:
        return len(self.stages)


@dataclass(frozen=True)
class HostPlan:
    """A split plus each host's own plan of its part (`Plan`, by the ordinary planner)."""

    split: HostSplit
    plans: tuple[Plan, ...]

    def explain(self, audience: Any = None) -> str:
        """One table per host (its blocks and where they go on that host), then why the boundaries are where
        they are. `audience`: as `Plan.explain` (how reasons name settings)."""
        parts = []
        for stage, host_plan in zip(self.split.stages, self.plans):
            layers = self.split.layers[stage.first_layer:stage.end_layer]
            title = (f"host {stage.rank}: {_span(layers)} ({stage.end_layer - stage.first_layer} blocks"
                     f"{', plus ' + ', '.join(self.split.ends) if stage.rank == 0 and self.split.ends else ''}), "
                     f"{format_size(stage.weight_bytes)}")
            # The planner names the root "(whole model)"; here the root is the host's part.
            text = host_plan.explain() if audience is None else host_plan.explain(audience)
            table = text.replace("(whole model)", "(its blocks) ")
            parts.append(f"{title}\n{'=' * len(title)}\n{table}")
        parts.append("\n".join(f"why: {reason}" for reason in self.split.reasons))
        return "\n\n".join(parts)

    def to_json(self) -> str:
        """The split and each host's plan as JSON (`HostPlan.from_json` reads it back)."""
        return json.dumps({
            "version": _JSON_VERSION,
            "layers": list(self.split.layers),
            "ends": list(self.split.ends),
            "reasons": list(self.split.reasons),
            "hosts": [
                {"rank": s.rank, "blocks": list(s.blocks), "shared": list(s.shared), "first_layer": s.first_layer,
                 "end_layer": s.end_layer, "weight_bytes": s.weight_bytes, "capacity": s.capacity,
                 "plan": json.loads(p.to_json())}
                for s, p in zip(self.split.stages, self.plans)
            ],
        }, indent=1)

    @staticmethod
    def from_json(text: str) -> "HostPlan":
        """Read what `to_json` wrote.

        Raises:
            PlanError: not a bigload host plan, or another version.
        """
        try:
            data = json.loads(text)
            if data.get("version") != _JSON_VERSION:
                raise PlanError(f"host plan JSON version {data.get('version')!r} is not {_JSON_VERSION}; plan again.")
            stages = tuple(Stage(int(h["rank"]), tuple(h["blocks"]), tuple(h["shared"]), int(h["first_layer"]),
                                 int(h["end_layer"]), int(h["weight_bytes"]), int(h["capacity"]))
                           for h in data["hosts"])
            split = HostSplit(tuple(data["layers"]), tuple(data["ends"]), stages, tuple(data["reasons"]))
            return HostPlan(split, tuple(Plan.from_json(json.dumps(h["plan"])) for h in data["hosts"]))
        except BigloadError:
            raise  # the version, or a stage's plan, already says what is wrong (and is a ValueError too)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise PlanError(f"not a bigload host plan JSON ({error!r}); write it with HostPlan.to_json().") from error


def host_capacity(budget: Budget) -> int:
    """Memory a host can hold weights in: its GPU and cpu budgets (disk is a fallback, not a share)."""
    return sum(nbytes for device, nbytes in budget if device.is_gpu or device.key == "cpu")


def split_hosts(inventory: Inventory, capacities: Sequence[int]) -> HostSplit:
    """Give each rank a contiguous range of decoder blocks; rank 0 also gets the model's ends.

    The ranges minimise the largest `bytes / capacity` over hosts (equal capacities: the largest part), so
    a host with twice the memory gets about twice the bytes. A boundary never falls inside a tied group.

    Args:
        inventory: the whole model's inventory (from a meta model or checkpoint headers).
        capacities: one per host, in rank order (`host_capacity` of its budget); equal values balance bytes.

    Raises:
        PlanError: no decoder stack, fewer blocks than hosts, or tensors that no stage can own.
    """
    hosts = len(capacities)
    layers = decoder_blocks(inventory)
    if hosts < 1:
        raise PlanError("plan for at least one host.")
    if len(layers) < hosts:
        raise PlanError(
            f"the model has {len(layers)} decoder blocks and cannot be split over {hosts} hosts: each host needs "
            f"at least one block. Use at most {len(layers)} hosts." if layers else
            "the model has no stack of numbered decoder blocks (model.layers.N), so it cannot be split across "
            "hosts; only decoder-only models are supported. Plan it for one host."
        )
    ends, shared = _ends(inventory, layers)
    sizes = [inventory.size(name) for name in layers]
    fixed = sum(inventory.size(name) for name in ends)
    forbidden = _tied_boundaries(inventory, layers, ends)
    weights = [max(int(c), 1) for c in capacities] if any(capacities) else [1] * hosts
    starts = _balance(sizes, fixed, weights, forbidden)
    bounds = list(zip(starts, [*starts[1:], len(layers)]))
    before = _pre(inventory, ends, layers)
    stages = tuple(
        Stage(rank, (ends[:before] + layers[a:b] + ends[before:]) if rank == 0 else layers[a:b], shared, a, b,
              sum(sizes[a:b]) + (fixed if rank == 0 else 0), int(capacities[rank]))
        for rank, (a, b) in enumerate(bounds)
    )
    reasons = _split_reasons(layers, ends, stages, sizes, fixed, weights, forbidden, inventory.tied_groups)
    return HostSplit(layers, ends, stages, reasons)


def _ends(inventory: Inventory, layers: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The blocks around the decoder stack (siblings along the path from the root to its container), and the
    ones among them with only buffers (computed ones, as rotary embeddings: built on every rank)."""
    container = inventory.index(layers[0].rpartition(".")[0])
    chain = []
    node = container
    while node >= 0:
        chain.append(node)
        node = inventory.parents[node]
    ends, shared = [], []
    for ancestor in chain[1:]:
        if inventory.own_tensors[ancestor]:
            raise PlanError(
                f"module {inventory.names[ancestor] or '(the root)'} holds tensors of its own beside the decoder "
                "stack, so no stage can own them alone; this model cannot be split across hosts."
            )
    for i in range(len(inventory)):
        parent = inventory.parents[i]
        # Tensors, not bytes: a tied head counts 0 bytes (its tensor is the embeddings') but is an end too.
        if parent in chain[1:] and i not in chain and sum(inventory.own_tensors[i:inventory.ends[i]]) > 0:
            only_buffers = 0 < inventory.subtree_buffer_bytes(i) == inventory.subtree_bytes(i)
            (shared if only_buffers else ends).append(inventory.names[i])
    return tuple(ends), tuple(shared)


def _pre(inventory: Inventory, ends: Sequence[str], layers: Sequence[str]) -> int:
    """How many of `ends` run before the decoder stack (execution order = inventory order)."""
    first = inventory.index(layers[0])
    return sum(1 for name in ends if inventory.index(name) < first)


def _tied_boundaries(inventory: Inventory, layers: Sequence[str], ends: Sequence[str]) -> frozenset[int]:
    """Boundaries (a rank starting at layer k) that would put a tied group on two ranks."""
    position = {name: k for k, name in enumerate(layers)}
    forbidden: set[int] = set()
    for group in inventory.tied_groups:
        where = {_layer_of(name, position, ends) for name in group}
        where.discard(None)
        if len(where) < 2 and -1 not in where:
            continue
        low, high = (0, max(where)) if -1 in where else (min(where), max(where))  # type: ignore[type-var]
        forbidden.update(range(low + 1, high + 1))
    return frozenset(forbidden)


def _layer_of(tensor: str, position: Mapping[str, int], ends: Sequence[str]) -> int | None:
    """The layer index holding a tensor, -1 for the ends (rank 0), None for shared modules."""
    owner = owner_of(tensor, {*position, *ends})
    if owner is None:
        return None
    return position.get(owner, -1)


def _balance(sizes: Sequence[int], fixed: int, weights: Sequence[int], forbidden: frozenset[int]) -> list[int]:
    """Start layer of each rank minimising max(load / weight): dynamic programming over contiguous ranges,
    O(hosts x layers^2) additions (a 126-layer model on 16 hosts: a quarter of a million)."""
    hosts, n = len(weights), len(sizes)
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    inf = float("inf")
    # best[h][i]: the best max ratio for ranks 0..h holding layers[:i]; cut[h][i]: where rank h starts.
    best = [[inf] * (n + 1) for _ in range(hosts)]
    cut = [[0] * (n + 1) for _ in range(hosts)]
    for i in range(1, n + 1):
        best[0][i] = (prefix[i] + fixed) / weights[0]
    for h in range(1, hosts):
        for i in range(h + 1, n + 1):
            for j in range(h, i):
                if j in forbidden or best[h - 1][j] == inf:
                    continue
                value = max(best[h - 1][j], (prefix[i] - prefix[j]) / weights[h])
                if value < best[h][i]:
                    best[h][i], cut[h][i] = value, j
    if best[hosts - 1][n] == inf:
        raise PlanError(
            f"tied weights span the decoder blocks so that they cannot be cut into {hosts} ranges; use fewer hosts."
        )
    starts, end = [0] * hosts, n
    for h in range(hosts - 1, 0, -1):
        starts[h] = end = cut[h][end]
    return starts


def _split_reasons(layers: Sequence[str], ends: Sequence[str], stages: Sequence[Stage], sizes: Sequence[int],
                   fixed: int, weights: Sequence[int], forbidden: frozenset[int],
                   tied_groups: Sequence[Sequence[str]]) -> tuple[str, ...]:
    total = sum(sizes) + fixed
    end_set = set(ends)
    tied = [group for group in tied_groups if sum(owner_of(n, end_set) is not None for n in group) > 1]
    why_ends = (f"{' = '.join(tied[0])} is one tied tensor, which stays whole there; " if tied else "")
    reasons = [
        f"rank 0 holds the model's ends ({', '.join(ends) or 'none'}): {why_ends}the hidden state comes back to "
        "it for the head and generate runs there; only hidden states, never logits, cross the wire.",
        f"{len(layers)} blocks, {format_size(total)} in all, split in contiguous ranges minimising the largest "
        "share of a host's memory" + (" (hosts have equal memory: balanced by bytes)." if len(set(weights)) == 1
                                      else f" (host memory ratio {':'.join(str(round(w / min(weights), 2)) for w in weights)})."),
    ]
    for left, right in zip(stages, stages[1:]):
        k = right.first_layer
        here = max(left.weight_bytes / weights[left.rank], right.weight_bytes / weights[right.rank])
        moves = []
        for alt, label in ((k - 1, "earlier"), (k + 1, "later")):
            if alt <= left.first_layer or alt >= right.end_layer or alt in forbidden:
                moves.append(f"one block {label} is impossible (each host keeps at least one block"
                             f"{' and tied groups stay whole' if alt in forbidden else ''})")
                continue
            moved = sizes[k] if alt > k else -sizes[alt]  # bytes that change from the right rank to the left
            alt_max = max((left.weight_bytes + moved) / weights[left.rank],
                          (right.weight_bytes - moved) / weights[right.rank])
            moves.append(f"one block {label} the larger share would be {_ratio_text(alt_max, weights)}")
        reasons.append(
            f"rank {right.rank} starts at {layers[k]}: ranks {left.rank} and {right.rank} hold "
            f"{format_size(left.weight_bytes)} and {format_size(right.weight_bytes)} (larger share "
            f"{_ratio_text(here, weights)}); {'; '.join(moves)}."
        )
    return tuple(reasons)


def _ratio_text(value: float, weights: Sequence[int]) -> str:
    """A max-share value back in bytes when hosts are equal, else as bytes per unit of memory."""
    if len(set(weights)) == 1:
        return format_size(int(value * weights[0]))
    return f"{value:.3f} of its memory" if value <= 10 else f"{value:.1f}x its memory"


def plan_hosts(inventory: Inventory, budgets: Sequence[Budget], **options: Any) -> HostPlan:
    """Split `inventory` over one host per budget, then plan each host's part with `plan.plan`.

    Args:
        inventory: the whole model.
        budgets: one per rank, in rank order (identical on every rank: a pure function of its inputs).
        options: passed to `plan.plan` for every host (strategy, dtype, context_length, batch_size, prefetch).

    Raises:
        PlanError: the split is impossible, or a host's part does not fit its budget (the message names the
            host).
    """
    split = split_hosts(inventory, [host_capacity(budget) for budget in budgets])
    plans = []
    for stage, budget in zip(split.stages, budgets):
        try:
            plans.append(plan(sub_inventory(inventory, stage.modules), budget, **options))
        except PlanError as error:
            raise PlanError(f"host {stage.rank} ({_span(split.layers[stage.first_layer:stage.end_layer])}): "
                            f"{error}") from None
    return HostPlan(split, tuple(plans))


def _span(layers: Sequence[str]) -> str:
    return layers[0] if len(layers) == 1 else f"{layers[0]}..{layers[-1].rpartition('.')[2]}"

