"""accelerate's allocation, as a pure strategy over an `Inventory` (what `bigload.integrations.device_maps` answers with).

bigload's own planner (`plan.py`) places blocks its own way (reserve only when offloading, balanced shares,
block-granular offload). Code written against accelerate expects accelerate's exact maps, so the
accelerate-named functions use this module instead: the same greedy walk as accelerate 1.15's
`infer_auto_device_map`, `get_balanced_memory` and `compute_module_sizes`, decided from the inventory's arrays
rather than from `nn.Module` objects. Like `plan.py` it reads no file and probes no device; the messages
accelerate would log or warn are returned as data (`AccelerateMap.notes`) for the caller to emit.

What it reproduces, on purpose (the differential tests compare with accelerate on hand-picked and generated
trees):
- sizes: a floating tensor counts at the smaller of its width and `dtype`'s; bool counts 1/8 byte;
- order: a module's parameters, then its children, then (top level only) its buffers; a split module's own
  buffers get no entry;
- room for the largest remaining layer is kept on the main devices (first GPU and cpu) at every step;
- tied parameters are placed with the module that first meets them, splitting a tied module when only
  that fits; the tests name substrings (accelerate's `name + "." in key + "."`), not prefixes;
- `fallback_allocation`: when a device gets nothing, the first module (depth first) that fits is put there;
- `clean_result`: a subtree whose entries (more than one) all share a device becomes one entry.

The walk keeps accelerate's list of modules still to place as a stack (front = end of the list) and tracks
the layers realizing the "largest layer" as index ranges, so a step costs O(log n) where accelerate's costs
O(n): the same maps in linear time.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import torch

from bigload.errors import PlanError
from bigload.plan.inventory import Inventory, TensorEntry
from bigload.sizes import dtype_width

__all__ = ["AccelerateMap", "Key", "Note", "Size", "accelerate_byte_size", "infer_map", "module_sizes"]

Key = Union[int, str]  # accelerate's device keys: GPU index, "mps", "cpu", "disk"
Size = Union[int, float]  # bool tensors count 1/8 byte, so accelerate's sizes may be floats

_FLOAT8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                   "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, name))
_NEVER_CAST = ("torch.uint", "torch.int", "torch.bool")


def accelerate_byte_size(dtype: torch.dtype) -> Size:
    """accelerate's `dtype_byte_size`: bytes per element, 1/8 for bool.

    >>> accelerate_byte_size(torch.bool), accelerate_byte_size(torch.bfloat16)
    (0.125, 2)
    """
    if dtype == torch.bool:
        return 1 / 8
    if dtype in _FLOAT8:
        return 1
    bits = re.search(r"[^\d](\d+)$", str(dtype))
    if bits is None:
        raise PlanError(f"accelerate cannot size tensors of dtype {dtype}; give them a dtype in special_dtypes.")
    return int(bits.group(1)) // 8


def module_sizes(inv: Inventory, dtype: torch.dtype | None = None,
                 special_dtypes: Mapping[str, torch.dtype] | None = None, *,
                 buffers_only: bool = False) -> dict[str, Size]:
    """accelerate's `compute_module_sizes` from an inventory built at stored dtypes.

    Args:
        inv: built with `dtype=None` and no keep-in-fp32 modules, so each entry has its stored dtype.
        dtype: the load dtype; a floating tensor counts at the smaller of the two widths.
        special_dtypes: tensor name -> dtype, overriding the rule above.
        buffers_only: count buffers only.

    Returns:
        `{"": total, module or tensor name: bytes, ...}`, parameters first, then buffers (accelerate's order).
    """
    special = special_dtypes or {}
    widths: dict[torch.dtype, tuple[int, Size]] = {}
    entries = [e for e in inv.tensors if not e.buffer and not buffers_only] + [e for e in inv.tensors if e.buffer]
    if special:
        counted = [(entry, _accelerate_size(entry, entry.name, dtype, special, widths)) for entry in entries]
    else:  # one rate per stored dtype (a million tensors on the largest models)
        rates = {d: _accelerate_size(TensorEntry("", 0, _widths(d, widths)[0], d, False), "", dtype, {}, widths)
                 for d in {entry.dtype for entry in entries}}
        counted = [(entry, entry.nbytes // widths[entry.dtype][0] * rates[entry.dtype]) for entry in entries]
    totals: list[Size] = [0] * len(inv)
    for entry, size in counted:
        totals[entry.module] += size
    for i in range(len(inv) - 1, 0, -1):  # children come after their parent: one backward pass sums subtrees
        totals[inv.parents[i]] += totals[i]
    # accelerate adds each tensor to "", then each enclosing module, then its own name: keys appear in that
    # order (parameters first), which `get_balanced_memory` relies on.
    sizes: dict[str, Size] = {}
    for entry, size in counted:
        chain, i = [], entry.module
        while i >= 0 and inv.names[i] not in sizes:
            chain.append(i)
            i = inv.parents[i]
        for j in reversed(chain):
            sizes[inv.names[j]] = totals[j]
        sizes[entry.name] = size
    return sizes


def _accelerate_size(entry: TensorEntry, name: str, dtype: torch.dtype | None, special: Mapping[str, torch.dtype],
                     widths: dict[torch.dtype, tuple[int, Size]]) -> Size:
    """One tensor as accelerate sizes it; `name` is what accelerate looks `special` up by; `widths` caches
    (bigload's width, accelerate's width) per dtype."""
    numel, stored = entry.nbytes // _widths(entry.dtype, widths)[0], _widths(entry.dtype, widths)[1]
    if name in special:
        return numel * _widths(special[name], widths)[1]
    if dtype is None or str(entry.dtype).startswith(_NEVER_CAST):
        return numel * stored
    return numel * min(_widths(dtype, widths)[1], stored)


def _widths(dtype: torch.dtype, cache: dict[torch.dtype, tuple[int, Size]]) -> tuple[int, Size]:
    cached = cache.get(dtype)
    if cached is None:
        cached = cache[dtype] = (dtype_width(dtype), accelerate_byte_size(dtype))
    return cached


# --------------------------------------------------------------------------------------------------
# The tree as accelerate walks it


@dataclass(frozen=True)
class _Unit:
    """An entry of accelerate's `modules_to_treat`: a module (its inventory index) or a tensor (-1)."""

    name: str
    index: int

    @property
    def is_module(self) -> bool:
        return self.index >= 0


class _Tree:
    """Inventory lookups the walk needs, by module index."""

    def __init__(self, inv: Inventory, sizes: Mapping[str, Size]) -> None:
        self.inv = inv
        self.sizes = sizes
        self.params: dict[int, list[str]] = {}
        self.buffers: list[str] = []  # the root's own buffers (entries at the top level only)
        for entry in inv.tensors:
            if not entry.buffer:
                self.params.setdefault(entry.module, []).append(entry.name)
            elif entry.module == 0:
                self.buffers.append(entry.name)
        parameters = {e.name for e in inv.tensors if not e.buffer}
        for group in inv.tied_groups:
            if group[0] in parameters:  # a tied duplicate of a parameter is a parameter of its module
                for name in group[1:]:
                    self.params.setdefault(inv.index(name.rpartition(".")[0]), []).append(name)
        self.children: list[list[int]] = [[] for _ in range(len(inv))]
        for i in range(1, len(inv)):
            self.children[inv.parents[i]].append(i)
        self.layer_max, self.layers = self._layers()
        self.widths: dict[torch.dtype, tuple[int, Size]] = {}
        self.entry_modules = [entry.module for entry in inv.tensors]  # ascending: entries are in module order

    def buffer_bytes(self, unit: _Unit, dtype: torch.dtype | None, special: Mapping[str, torch.dtype]) -> Size:
        """accelerate's `compute_module_total_buffer_size` of a module: it calls `compute_module_sizes` on the
        submodule, so `special_dtypes` is looked up by names relative to it."""
        first = bisect_left(self.entry_modules, unit.index)
        last = bisect_left(self.entry_modules, self.inv.ends[unit.index])
        prefix = f"{unit.name}." if unit.name else ""
        return sum(_accelerate_size(e, e.name[len(prefix):], dtype, special, self.widths)
                   for e in self.inv.tensors[first:last] if e.buffer)

    def size(self, name: str) -> Size:
        return self.sizes.get(name, 0)

    def splittable(self, unit: _Unit) -> bool:
        return unit.is_module and bool(self.children[unit.index]) and not self.inv.no_split[unit.index]

    def split(self, unit: _Unit) -> list[_Unit]:
        """What accelerate puts in a split module's place: its own parameters, then its children."""
        own = [_Unit(name, -1) for name in self.params.get(unit.index, ())]
        return own + [_Unit(self.inv.names[c], c) for c in self.children[unit.index]]

    def top(self) -> list[_Unit]:
        root = _Unit("", 0)
        return self.split(root) + [_Unit(name, -1) for name in self.buffers]

    def _layers(self) -> tuple[list[Size], dict[Size, list[int]]]:
        """Per module, the largest layer in its subtree (a layer: a leaf or an unsplittable module, not
        inside an unsplittable one), and the sorted module indices of the layers of each size."""
        inv = self.inv
        layer_max: list[Size] = [0] * len(inv)
        is_layer = [False] * len(inv)
        inside = [False] * len(inv)  # strictly inside an unsplittable module (the root never counts)
        for i in range(1, len(inv)):
            parent = inv.parents[i]
            inside[i] = parent > 0 and (inside[parent] or inv.no_split[parent])
            is_layer[i] = not inside[i] and (inv.no_split[i] or not self.children[i])
        for i in range(len(inv) - 1, 0, -1):
            if is_layer[i]:
                layer_max[i] = self.size(inv.names[i])
            parent = inv.parents[i]
            if parent > 0 and not inside[i] and layer_max[i] > layer_max[parent] and not is_layer[parent]:
                layer_max[parent] = layer_max[i]
        layers: dict[Size, list[int]] = {}
        for i in range(1, len(inv)):
            if is_layer[i]:
                layers.setdefault(self.size(inv.names[i]), []).append(i)
        return layer_max, layers


class _LargestLayer:
    """accelerate's `max_layer_size` / `max_layer_names`: the largest layer among the modules still to place,
    and which layers realize it; recomputed only when those have all been taken (or after a split), so it
    may be stale exactly where accelerate's is. Module layers are kept as sorted inventory indices, so
    taking a module drops its whole subtree with two bisections."""

    def __init__(self, tree: _Tree) -> None:
        self.tree = tree
        self.size: Size = 0
        self.modules: list[int] = []
        self.tensors: set[str] = set()

    def recompute(self, units: Sequence[_Unit], *, with_tensors: bool = False) -> None:
        tree = self.tree
        candidates = [u for u in units if u.is_module or with_tensors]
        self.size = max((tree.layer_max[u.index] if u.is_module else tree.size(u.name) for u in candidates),
                        default=0)
        same = tree.layers.get(self.size, [])
        ends = tree.inv.ends
        found: list[int] = []
        self.tensors = set()
        for unit in candidates:
            if not unit.is_module:
                if tree.size(unit.name) == self.size:
                    self.tensors.add(unit.name)
                continue
            found.extend(same[bisect_left(same, unit.index):bisect_left(same, ends[unit.index])])
        self.modules = sorted(found)

    def take(self, unit: _Unit) -> None:
        """`unit` is being treated: the layers it holds no longer count."""
        if not unit.is_module:
            self.tensors.discard(unit.name)
            return
        lo = bisect_left(self.modules, unit.index)
        hi = bisect_left(self.modules, self.tree.inv.ends[unit.index])
        del self.modules[lo:hi]

    @property
    def exhausted(self) -> bool:
        return not self.modules and not self.tensors


# --------------------------------------------------------------------------------------------------
# The walk


@dataclass(frozen=True)
class Note:
    """A message accelerate emits while planning: `kind` is "warning" (Python `warnings.warn`, UserWarning)
    or "info" (a log record at INFO)."""

    kind: str
    text: str


@dataclass(frozen=True)
class AccelerateMap:
    """accelerate's device map for an inventory, with the messages it emits."""

    device_map: "OrderedDict[str, Key]"
    notes: tuple[Note, ...] = field(default=())


@dataclass
class _State:
    """The walk's bookkeeping, as accelerate names it."""

    devices: list[Key]
    max_memory: Mapping[Key, Size]
    main_devices: list[Key]
    device_map: "OrderedDict[str, Key]" = field(default_factory=OrderedDict)
    current: int = 0
    used: dict[Key, Size] = field(default_factory=dict)
    buffers: dict[Key, Size] = field(default_factory=dict)
    minimum: dict[Key, Size] = field(default_factory=dict)


class _Walk:
    """accelerate's `infer_auto_device_map` loop over a stack of units (the front of its list at the end)."""

    def __init__(self, tree: _Tree, state: _State, tied: Sequence[Sequence[str]], *, dtype: torch.dtype | None,
                 special: Mapping[str, torch.dtype], offload_buffers: bool, fallback: bool) -> None:
        self.tree, self.state, self.tied = tree, state, [list(g) for g in tied]
        self.dtype, self.special = dtype, special
        self.offload_buffers, self.fallback = offload_buffers, fallback
        top = tree.top()
        self.stack: list[_Unit] = list(reversed(top))
        self.largest = _LargestLayer(tree)
        self.largest.recompute(top, with_tensors=True)

    def front(self) -> list[_Unit]:
        return list(reversed(self.stack))

    def set_front(self, units: Sequence[_Unit]) -> None:
        self.stack = list(reversed(units))

    def run(self) -> None:
        while self.stack:
            unit = self.stack.pop()
            self.largest.take(unit)
            if self.largest.exhausted:
                self.largest.recompute(self.stack)
            self.step(unit)

    def step(self, unit: _Unit) -> None:
        state, tree = self.state, self.tree
        size = tree.size(unit.name)
        tied_params = self._tied_outside(unit.name)
        device = state.devices[state.current]
        limit: Size | None = None if device == "disk" else state.max_memory[device]
        reserved: Size = 0
        if device in state.main_devices:
            limit = limit - self.largest.size  # type: ignore[operator]
            reserved = self.largest.size
        with_ties, tied_names, tied_units = self._size_with_ties(tied_params, size, self.stack, from_end=True)
        used = state.used.setdefault(device, 0)
        if limit is None or used + with_ties <= limit:
            self._assign(unit, device, with_ties, tied_names)
            return
        if tied_params and used + size <= limit and self._split_tied(unit, tied_names, tied_units):
            return
        if used + size >= limit and tree.splittable(unit):
            self.stack.extend(reversed(tree.split(unit)))
            self.largest.recompute(self.front())
            return
        if used == 0 and self.fallback and device != "disk" and self._fallback(unit, device, size, with_ties):
            return
        if used == 0:
            state.minimum[device] = with_ties + reserved
        state.used[device] = used + reserved
        state.current += 1
        self.stack.append(unit)

    def _tied_outside(self, name: str) -> list[str]:
        """Parameters tied to one inside `name` but outside it (accelerate's substring test, kept as is)."""
        inside = name + "."
        out: list[str] = []
        for group in self.tied:
            hits = [inside in k + "." for k in group]
            if any(hits) and not all(hits):
                out.extend(k for k, hit in zip(group, hits) if not hit)
        return out

    def _size_with_ties(self, tied_params: Sequence[str], size: Size, units_left: Sequence[_Unit], *,
                        from_end: bool = False) -> tuple[Size, list[str], list[_Unit]]:
        """accelerate's `get_module_size_with_ties`: the size with the modules (still to place, first match
        from the front of the list) holding the parameters tied to it."""
        if not tied_params:
            return size, [], []
        names: list[str] = []
        units: list[_Unit] = []
        for param in tied_params:
            order = reversed(units_left) if from_end else iter(units_left)
            owner = next((u for u in order if param.startswith(u.name + ".")), None)
            if owner is None:
                raise PlanError(
                    f"tied parameter {param!r} belongs to no module still to place (accelerate fails here with an "
                    "IndexError); give device_map explicitly, with the tied modules on one device."
                )
            names.append(owner.name)
            units.append(owner)
        total = size
        for param, owner_name in zip(tied_params, names):
            total += self.tree.size(owner_name) - self.tree.size(param)
        return total, names, units

    def _assign(self, unit: _Unit, device: Key, with_ties: Size, tied_names: Sequence[str]) -> None:
        state = self.state
        state.used[device] = state.used.get(device, 0) + with_ties
        state.device_map[unit.name] = device
        for tied_name in tied_names:
            for position in range(len(self.stack) - 1, -1, -1):
                if self.stack[position].name == tied_name:
                    del self.stack[position]
                    break
            state.device_map[tied_name] = device
        if not self.offload_buffers and unit.is_module:
            held = self.tree.buffer_bytes(unit, self.dtype, self.special)
            state.buffers[device] = state.buffers.get(device, 0) + held

    def _split_tied(self, unit: _Unit, tied_names: Sequence[str], tied_units: Sequence[_Unit]) -> bool:
        for tied_name, tied_unit in zip(tied_names, tied_units):
            if not self.tree.splittable(tied_unit):
                continue
            front = self.front()
            at = next(i for i, u in enumerate(front) if u.name == tied_name)
            self.set_front([unit, *front[:at], *self.tree.split(tied_unit), *front[at + 1:]])
            self.largest.recompute(self.front())
            return True
        return False

    def _fallback(self, unit: _Unit, device: Key, size: Size, with_ties: Size) -> bool:
        limit = self.state.max_memory[device] - max(self.largest.size, with_ties)
        found = _fallback_allocate(self, self.front(), limit)
        if found is None:
            return False
        chosen, remaining = found
        self.set_front([chosen, unit, *remaining])
        return True


def _fallback_allocate(walk: _Walk, units: list[_Unit], limit: Size) -> tuple[_Unit, list[_Unit]] | None:
    """accelerate's `fallback_allocate`: the first unit, depth first, that fits in `limit` with its ties, and
    the list with it taken out (its enclosing modules replaced by their parameters and children)."""
    if limit < 0:
        return None  # accelerate's size check rejects a negative limit
    tree = walk.tree
    search = list(units)
    chosen: _Unit | None = None
    while search:
        unit = search.pop(0)
        tied = walk._tied_outside(unit.name)
        with_ties, _, _ = walk._size_with_ties(tied, tree.size(unit.name), search)
        if with_ties <= limit:
            chosen = unit
            break
        if tree.splittable(unit):
            search = tree.split(unit) + search
    if chosen is None:
        return None
    names = [u.name for u in units]
    for dot in [i for i, c in enumerate(chosen.name) if c == "."]:
        parent = chosen.name[:dot]
        if parent in names:
            at = names.index(parent)
            units = units[:at] + tree.split(units[at]) + units[at + 1:]
            names = [u.name for u in units]
    at = names.index(chosen.name)
    return units.pop(at), units


def clean_device_map(device_map: Mapping[str, Key]) -> "OrderedDict[str, Key]":
    """accelerate's `clean_device_map`: from the top down, a module whose entries (more than one) all share a
    device becomes one entry. accelerate visits siblings in set order; the entries are the same."""
    keys = list(device_map)
    out: OrderedDict[str, Key] = OrderedDict()

    def visit(prefix: str, members: list[str]) -> None:
        under = [k for k in members if k.startswith(prefix)] if prefix else members
        values = {device_map[k] for k in under}
        if len(values) == 1 and len(under) > 1:
            out[prefix[:-1] if prefix else ""] = device_map[under[0]]
            return
        groups: OrderedDict[str, list[str]] = OrderedDict()
        for key in under:
            rest = key[len(prefix):]
            if not rest:
                continue
            groups.setdefault(prefix + rest.split(".")[0], []).append(key)
        for child, child_keys in groups.items():
            exact = [k for k in child_keys if k == child]
            if exact:
                out[child] = device_map[child]
            visit(child + ".", [k for k in child_keys if k != child])

    visit("", keys)
    return OrderedDict((k, out[k]) for k in _in_order(out, keys))


def _in_order(cleaned: Mapping[str, Key], keys: Sequence[str]) -> list[str]:
    """Cleaned keys in the order of the first original entry each covers."""
    rank = {}
    for position, key in enumerate(keys):
        parts = key.split(".")
        for depth in range(len(parts) + 1):
            rank.setdefault(".".join(parts[:depth]), position)
    return sorted(cleaned, key=lambda k: rank.get(k, len(keys)))


def infer_map(inv: Inventory, max_memory: Mapping[Key, Size], tied: Sequence[Sequence[str]], *,
              dtype: torch.dtype | None = None, special_dtypes: Mapping[str, torch.dtype] | None = None,
              clean_result: bool = True, offload_buffers: bool = False,
              fallback_allocation: bool = False) -> AccelerateMap:
    """accelerate's `infer_auto_device_map` over an inventory.

    Args:
        inv: the model's inventory (stored dtypes; its `no_split` flags are the no-split classes).
        max_memory: accelerate's normalized budget: GPU indices ascending, then "mps", "cpu", "disk".
        tied: accelerate's `find_tied_parameters` groups.
        dtype, special_dtypes: how tensors are sized (see `module_sizes`).
        clean_result, offload_buffers, fallback_allocation: as accelerate.

    Returns:
        The map and the messages accelerate would emit.
    """
    devices = list(max_memory)
    if "disk" not in devices:
        devices.append("disk")
    gpus = [d for d in devices if d not in ("cpu", "disk")]
    main = ["mps"] if "mps" in gpus else ([gpus[0], "cpu"] if gpus else ["cpu"])
    state = _State(devices, max_memory, main, used={d: 0 for d in devices})
    special = dict(special_dtypes or {})
    tree = _Tree(inv, module_sizes(inv, dtype, special))
    _Walk(tree, state, tied, dtype=dtype, special=special, offload_buffers=offload_buffers,
          fallback=fallback_allocation).run()
    device_map = clean_device_map(state.device_map) if clean_result else state.device_map
    return AccelerateMap(device_map, tuple(_notes(state, max_memory, gpus, offload_buffers)))


def _notes(state: _State, max_memory: Mapping[Key, Size], gpus: Sequence[Key], offload_buffers: bool) -> list[Note]:
    notes = []
    used = {d: m for d, m in state.used.items() if m > 0}
    offloaded = state.buffers.get("cpu", 0) + state.buffers.get("disk", 0)
    if offloaded > 0 and not offload_buffers and gpus:
        fits = any(memory >= offloaded + used.get(device, 0)
                   for device, memory in max_memory.items() if device not in ("cpu", "disk"))
        if not fits:
            notes.append(Note("warning",
                              f"Current model requires {offloaded} bytes of buffer for offloaded layers, which seems "
                              "does not fit any GPU's remaining memory. If you are experiencing a OOM later, please "
                              "consider using offload_buffers=True."))
    if state.minimum:
        lines = "\n".join(f"  - {device}: {memory} bytes required" for device, memory in state.minimum.items())
        notes.append(Note("info",
                          "Based on the current allocation process, no modules could be assigned to the following "
                          f"devices due to insufficient memory:\n{lines}\nThese minimum requirements are specific to "
                          "this allocation attempt and may vary. Consider increasing the available memory for these "
                          "devices to at least the specified minimum, or adjusting the model config."))
    return notes
