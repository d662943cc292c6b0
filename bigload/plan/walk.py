"""The planner's walk: one pass over the inventory in execution order, placing units on devices in order.

A unit is a module placed whole, or a split module's own tensors; a module is split into its children only
when it does not fit whole (or, on an offload device, always down to an unsplittable block, because a
device-map entry is what the runtime brings in at once). Each budget device is a `Fill` the walk fills up to
its cap (or, for balanced strategies, up to a cumulative share); tied tensors are placed together (`Ties`);
the KV cache of attention layers is charged to the device that runs them (`KV`).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Sequence

from bigload.devices import Device
from bigload.plan.inventory import Inventory

__all__ = ["ATTENTION_WORDS", "Fill", "KV", "NoFit", "Ties", "Unit", "Walk"]

ATTENTION_WORDS = ("attn", "attention")


@dataclass
class Fill:
    """One budget device during a walk."""

    device: Device
    budget: int
    fixed_headroom: int
    runs_own: bool  # blocks placed here run here (GPUs; the CPU without a GPU or with policy 'local')
    cap: int = 0  # bytes of footprint the walk may put here
    target_end: float | None = None  # balanced: cumulative GPU footprint at which to move on
    used: int = 0


Unit = tuple[int, bool]  # (module index, whole module?); (i, False) is module i's own tensors only


class NoFit(Exception):
    def __init__(self, unit: Unit, fills: Sequence[Fill], placed_bytes: int) -> None:
        super().__init__()
        self.unit = unit
        self.fills = fills
        self.placed_bytes = placed_bytes


class Walk:
    """One pass over the inventory, placing units on fills in order."""

    def __init__(self, inv: Inventory, fills: list[Fill], kv: "KV", ties: "Ties") -> None:
        self.inv = inv
        self.fills = fills
        self.kv = kv
        self.ties = ties
        self.cursor = 0
        self.cum = 0  # footprint placed on GPUs so far (balanced targets are cumulative)
        self.placed_whole = [-1] * len(inv)  # fill index of every module inside a unit placed whole
        self.placed_own: dict[int, int] = {}
        self.partial: set[int] = set()  # ancestors of units placed early (tied companions): must split
        self.kv_moved: dict[int, int] = {}
        self.units: dict[Unit, tuple[int, int]] = {}  # unit -> (fill index, kv charged with it)
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

    def run(self) -> "Walk":
        stack: list[Unit] = [(0, True)]
        while stack:
            unit = stack.pop()
            if self.done(unit):
                continue
            if unit[1] and unit[0] in self.partial:
                self.split_unit(unit[0], stack)
                continue
            bundle = self.ties.bundle(unit, self)
            fill = self.fills[self.cursor]
            weights = sum(self.unit_bytes(u) for u in bundle)
            kv = sum(self.unit_kv(u) for u in bundle)
            footprint = weights + (kv if fill.runs_own else 0)
            decision = self.decide(fill, unit, footprint)
            if decision == "place":
                self.place(bundle, self.cursor, footprint, weights)
            elif decision == "split":
                self.split_unit(unit[0], stack)
            else:
                self.cursor += 1
                if self.cursor == len(self.fills):
                    raise NoFit(unit, self.fills, self.placed_bytes)
                stack.append(unit)
        return self

    def decide(self, fill: Fill, unit: Unit, footprint: int) -> str:
        splittable = self.splittable(unit)
        if not fill.runs_own and splittable:
            return "split"  # an offloaded entry is brought in whole: keep entries unsplittable blocks
        fits = fill.used + footprint <= fill.cap
        if fill.target_end is None:
            return "place" if fits else ("split" if splittable else "next")
        room = fill.target_end - self.cum
        if fits and footprint <= room:
            return "place"
        if room <= 0:
            return "next"
        if splittable:
            return "split"
        # An unsplittable block straddling this GPU's share stays if its midpoint is inside the share.
        return "place" if fits and footprint / 2 <= room else "next"

    def place(self, bundle: Sequence[Unit], index: int, footprint: int, weights: int) -> None:
        fill = self.fills[index]
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
        fill.used += footprint
        self.placed_bytes += weights
        if fill.device.is_gpu:
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
                                                      for w in ATTENTION_WORDS)), children[0])
            self.kv_moved[target] = self.kv_moved.get(target, 0) + moved
        stack.extend((child, True) for child in reversed(children))
        if self.inv.own_tensors[i] and i not in self.placed_own:
            stack.append((i, False))


class KV:
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


class Ties:
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

    def bundle(self, unit: Unit, walk: Walk) -> list[Unit]:
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
