"""What must be placed: modules in execution order with their byte sizes, tied groups and unsplittable blocks.

An `Inventory` is built in one linear pass, from an `nn.Module` (meta tensors are fine; here) or from a
checkpoint's headers alone (`headers.py`). Modules are kept in pre-order (registration order, which is the order a
transformers model runs its blocks in), so a module's subtree is the contiguous index range
`[i, end(i))` and every subtree size is a difference of two prefix sums: the planner never walks a tree
twice.

Every tensor's dtype once loaded is decided here, once, by the load's `DtypeRule` (`dtypes.py`), and carried
on its `TensorEntry` (with the dtype the checkpoint stores it in, when known); the planner sizes with it and the loader (`stream`) places each tensor in it. A tensor
registered under several names (tied weights) is counted once, under its first name in registration order.

The KV-cache spec (`kv_cache_spec`) describes how many bytes each attention layer's cache takes per token,
so the planner can keep room for a given context length on the device that runs each layer.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from bigload.errors import PlanError
from bigload.plan.dtypes import DtypeRule, castable
from bigload.plan.kv import KVCacheSpec, decoder_block_names, kv_cache_spec
from bigload.plan.reserve import SLOT_ALIGNMENT, aligned
from bigload.sizes import dtype_width

__all__ = ["Inventory", "TensorEntry", "decoder_blocks", "inventory_from_module", "sub_inventory", "subtree_ends"]


class TensorEntry(NamedTuple):
    """One tensor to place. A NamedTuple (immutable, and cheap enough for millions of tensors).

    Attributes:
        name: its first name in registration order (tied names are in `Inventory.tied_groups`).
        module: index of the module that owns it directly (into `Inventory.names`).
        nbytes: bytes at the target dtype.
        dtype: the dtype it will have once loaded.
        buffer: a buffer (persistent or not) rather than a parameter.
        scheme: the quantization scheme it is part of ("int8", "int4:128": a quantized Linear's codes and
            scales, which the loader builds from the checkpoint's float weight), "" for a plain tensor.
        stored: the dtype its bytes have in the checkpoint it loads from; None when unknown (no checkpoint)
            or built while loading (quantized tensors).
        kernel: how a quantized tensor's module runs where that differs from its scheme's usual kernel
            (`QuantLinear.bigload_kernel`: an int8 Linear too narrow for the packed CPU kernel), else "".
    """

    name: str
    module: int
    nbytes: int
    dtype: torch.dtype
    buffer: bool
    scheme: str = ""
    stored: torch.dtype | None = None
    kernel: str = ""


@dataclass(frozen=True)
class Inventory:
    """Everything the planner needs to know about a model, as flat arrays in execution order.

    Index 0 is the root module (name ""). For module `i`: `names[i]`, `classes[i]` (class name, "" when
    built from a checkpoint), `parents[i]` (-1 for the root), `ends[i]` (its subtree is `[i, ends[i])`),
    `own_bytes[i]` / `own_buffer_bytes[i]` / `own_tensors[i]` (tensors it owns directly; tied duplicates
    count 0 bytes), `no_split[i]` (the planner never splits it).

    Attributes:
        tensors: every distinct tensor, in registration order.
        tied_groups: all names of each tensor registered under several names, first name first.
        kv: the KV-cache spec when the model's config describes one.
        dtype: the target dtype sizes were computed at (None: each tensor's own dtype).
        rule: the `DtypeRule` that decided every entry's dtype.
    """

    names: tuple[str, ...]
    classes: tuple[str, ...]
    parents: tuple[int, ...]
    ends: tuple[int, ...]
    own_bytes: tuple[int, ...]
    own_buffer_bytes: tuple[int, ...]
    own_tensors: tuple[int, ...]
    no_split: tuple[bool, ...]
    tensors: tuple[TensorEntry, ...]
    tied_groups: tuple[tuple[str, ...], ...]
    kv: KVCacheSpec | None
    dtype: torch.dtype | None
    rule: DtypeRule = DtypeRule()

    def __post_init__(self) -> None:
        # Prefix sums make every subtree size O(1); they are derived data, not part of equality.
        object.__setattr__(self, "_bytes_prefix", tuple(itertools.accumulate(self.own_bytes, initial=0)))
        object.__setattr__(self, "_buffer_prefix", tuple(itertools.accumulate(self.own_buffer_bytes, initial=0)))
        slot_own = [0] * len(self.names)
        slot_buffers = [0] * len(self.names)
        params = [0] * len(self.names)
        buffers = [0] * len(self.names)
        for entry in self.tensors:
            (slot_buffers if entry.buffer else slot_own)[entry.module] += aligned(entry.nbytes)
            (buffers if entry.buffer else params)[entry.module] += 1
        object.__setattr__(self, "_param_count_prefix", tuple(itertools.accumulate(params, initial=0)))
        object.__setattr__(self, "_buffer_count_prefix", tuple(itertools.accumulate(buffers, initial=0)))
        object.__setattr__(self, "_slot_prefix", tuple(itertools.accumulate(slot_own, initial=0)))
        object.__setattr__(self, "_slot_buffer_prefix", tuple(itertools.accumulate(slot_buffers, initial=0)))
        object.__setattr__(self, "_index", {name: i for i, name in enumerate(self.names)})
        object.__setattr__(self, "_int4_modules", sorted({e.module for e in self.tensors if e.scheme.startswith("int4")}))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def total_bytes(self) -> int:
        """Bytes of every distinct tensor at the target dtype (tied tensors once)."""
        return self._bytes_prefix[-1]  # type: ignore[attr-defined]

    def index(self, name: str) -> int:
        """Index of module `name`.

        Raises:
            PlanError: no module has that name.
        """
        try:
            return self._index[name]  # type: ignore[attr-defined]
        except KeyError:
            raise PlanError(f"the inventory has no module named {name!r}.") from None

    def subtree_bytes(self, i: int) -> int:
        """Bytes of module `i` with everything under it."""
        return self._bytes_prefix[self.ends[i]] - self._bytes_prefix[i]  # type: ignore[attr-defined]

    def subtree_buffer_bytes(self, i: int) -> int:
        """Bytes of the buffers of module `i` and everything under it."""
        return self._buffer_prefix[self.ends[i]] - self._buffer_prefix[i]  # type: ignore[attr-defined]

    def slot_bytes(self, i: int, *, whole: bool = True, alignment: int = SLOT_ALIGNMENT, buffers: bool = False) -> int:
        """Bytes of a runtime slot holding the parameters (and with `buffers`, the buffers) of module `i` (with
        everything under it, or only its own when not `whole`), each at an `alignment`-aligned offset
        (`reserve.slot_bytes`)."""
        end = self.ends[i] if whole else i + 1
        if alignment == 1:
            total = self._bytes_prefix[end] - self._bytes_prefix[i]  # type: ignore[attr-defined]
            return total if buffers else total - (self._buffer_prefix[end] - self._buffer_prefix[i])  # type: ignore[attr-defined]
        if alignment != SLOT_ALIGNMENT:
            raise ValueError(f"slot alignment {alignment} is neither 1 nor SLOT_ALIGNMENT ({SLOT_ALIGNMENT}).")
        params = self._slot_prefix[end] - self._slot_prefix[i]  # type: ignore[attr-defined]
        extra = self._slot_buffer_prefix[end] - self._slot_buffer_prefix[i] if buffers else 0  # type: ignore[attr-defined]
        return params + extra

    def brought_in(self, i: int, *, whole: bool = True, buffers: bool = False) -> int:
        """How many tensors of module `i` (with everything under it, or only its own) an offloaded entry brings
        in for each forward: its parameters, and with `buffers` its buffers too (tied tensors once)."""
        end = self.ends[i] if whole else i + 1
        count = self._param_count_prefix[end] - self._param_count_prefix[i]  # type: ignore[attr-defined]
        if buffers:
            count += self._buffer_count_prefix[end] - self._buffer_count_prefix[i]  # type: ignore[attr-defined]
        return count

    def holds_int4(self, i: int, *, whole: bool = True) -> bool:
        """Whether module `i` (with everything under it, or only its own tensors) holds int4-quantized tensors."""
        modules = self._int4_modules  # type: ignore[attr-defined]
        end = self.ends[i] if whole else i + 1
        k = bisect_left(modules, i)
        return k < len(modules) and modules[k] < end

    @functools.cached_property
    def cast_bytes(self) -> int:
        """The largest tensor that is loaded in another dtype than the checkpoint stores it in, at its stored
        size: what briefly lands on a GPU before the cast there (0 when nothing is known to be cast)."""
        largest = 0
        for entry in self.tensors:
            if entry.stored is not None and entry.stored != entry.dtype and castable(entry.stored):
                numel = entry.nbytes // dtype_width(entry.dtype)
                largest = max(largest, numel * dtype_width(entry.stored))
        return largest

    def size(self, name: str) -> int:
        """Bytes of module `name` with everything under it.

        >>> inventory.size("model.layers.0")  # doctest: +SKIP
        436207616
        """
        return self.subtree_bytes(self.index(name))

    def children(self, i: int) -> list[int]:
        """Indices of the direct children of module `i`, in order."""
        out = []
        j, end = i + 1, self.ends[i]
        while j < end:
            out.append(j)
            j = self.ends[j]
        return out

    def dtype_of(self, name: str) -> torch.dtype | None:
        """The dtype tensor `name` (any of a tied tensor's names) is loaded in; None for an unknown name."""
        lookup = self.__dict__.get("_dtypes")
        if lookup is None:
            lookup = {entry.name: entry.dtype for entry in self.tensors}
            for group in self.tied_groups:
                for alias in group[1:]:
                    lookup[alias] = lookup[group[0]]
            object.__setattr__(self, "_dtypes", lookup)
        return lookup.get(name)

    def tensor(self, name: str) -> TensorEntry:
        """The entry of tensor `name` (its first name).

        Raises:
            PlanError: no tensor has that first name.
        """
        lookup = self.__dict__.get("_entries")
        if lookup is None:
            lookup = {entry.name: entry for entry in self.tensors}
            object.__setattr__(self, "_entries", lookup)
        try:
            return lookup[name]
        except KeyError:
            raise PlanError(f"the inventory has no tensor named {name!r}.") from None

    def module_of(self, tensor_name: str) -> int:
        """Index of the module that registers tensor `tensor_name` (any of a tied tensor's names)."""
        return self.index(tensor_name.rpartition(".")[0])

    def quantized(self) -> tuple[TensorEntry, ...]:
        """The entries of quantized tensors (a scheme decided for them), in registration order."""
        return tuple(entry for entry in self.tensors if entry.scheme)

    def no_split_names(self) -> tuple[str, ...]:
        """Names of the modules the planner keeps whole."""
        return tuple(name for name, flag in zip(self.names, self.no_split) if flag)


# --------------------------------------------------------------------------------------------------
# From a module


def inventory_from_module(
    model: nn.Module,
    *,
    dtype: torch.dtype | str | None = None,
    special_dtypes: Mapping[str, torch.dtype | str] | None = None,
    keep_in_fp32_modules: Sequence[str] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    config: Any = None,
    stored_dtypes: Mapping[str, torch.dtype] | None = None,
    rule: DtypeRule | None = None,
) -> Inventory:
    """Inventory a model (meta tensors are fine) in one pass over its modules.

    Args:
        model: the model; its registration order is taken as execution order.
        dtype: the dtype floating tensors will be loaded in (None: each tensor keeps its dtype).
        special_dtypes: tensor name -> dtype overriding `dtype` for that tensor.
        keep_in_fp32_modules: module names (a dotted component or a prefix of a tensor name) whose floating
            tensors stay float32; default (None): transformers' rule (`default_keep_in_fp32_modules`; see
            `DtypeRule.for_model` for what accelerate does).
        no_split_module_classes: class names never split; default: the model's `_no_split_modules`.
        config: a transformers-style config for the KV-cache spec; default: `model.config`.
        stored_dtypes: tensor name -> dtype in the checkpoint it will be loaded from (a float8 or integer
            checkpoint tensor keeps its dtype whatever the model was built with); default: the model's.
        rule: the load's `DtypeRule`, built once by its entry point; when given, `dtype`, `special_dtypes`
            and `keep_in_fp32_modules` must not be (they are what the rule was built from).

    Returns:
        An `Inventory`.

    Raises:
        BudgetError: an unknown dtype name.

    >>> inv = inventory_from_module(model, dtype=torch.bfloat16)  # doctest: +SKIP
    >>> inv.size("model.layers.0")  # doctest: +SKIP
    """
    if rule is None:
        rule = DtypeRule.for_model(model, dtype, special_dtypes, keep_in_fp32_modules)
    elif dtype is not None or special_dtypes is not None or keep_in_fp32_modules is not None:
        raise TypeError("give inventory_from_module either rule= or the dtype arguments it is built from, not both.")
    target = rule.dtype
    no_split_classes = _no_split_classes(model, no_split_module_classes)
    builder = _ModuleWalk(rule, stored_dtypes or {}, no_split_classes)
    builder.walk(model)
    names = tuple(builder.names)
    no_split = tuple(builder.no_split)
    kv_config = config if config is not None else getattr(model, "config", None)
    kv = kv_cache_spec(kv_config, decoder_block_names(names, no_split), dtype=target or _first_float(builder))
    return Inventory(
        names=names,
        classes=tuple(builder.classes),
        parents=tuple(builder.parents),
        ends=subtree_ends(builder.parents),
        own_bytes=tuple(builder.own_bytes),
        own_buffer_bytes=tuple(builder.own_buffer_bytes),
        own_tensors=tuple(builder.own_tensors),
        no_split=no_split,
        tensors=tuple(builder.tensors),
        tied_groups=tuple(tuple(group) for group in builder.groups.values()),
        kv=kv,
        dtype=target,
        rule=rule,
    )


class _ModuleWalk:
    """The single pass over a module tree (an explicit stack: `named_modules` is a recursive generator)."""

    def __init__(self, rule: DtypeRule, stored: Mapping[str, torch.dtype], no_split_classes: frozenset[str]) -> None:
        self.rule = rule
        self.stored = stored
        self.no_split_classes = no_split_classes
        self.names: list[str] = []
        self.classes: list[str] = []
        self.parents: list[int] = []
        self.own_bytes: list[int] = []
        self.own_buffer_bytes: list[int] = []
        self.own_tensors: list[int] = []
        self.no_split: list[bool] = []
        self.tensors: list[TensorEntry] = []
        self.first_name: dict[int, str] = {}  # id(tensor) -> its first name
        self.groups: dict[int, list[str]] = {}  # id(tensor) -> every name, first name first (tied only)
        self._widths: dict[torch.dtype, int] = {}
        self._by_dtypes: dict[tuple[torch.dtype, torch.dtype], tuple[torch.dtype, int]] = {}

    def walk(self, model: nn.Module) -> None:
        # The walk allocates a few objects per module; on a 200,000-module model the cyclic collector would
        # rescan the whole (acyclic, growing) heap many times over, doubling the time. Nothing here makes cycles.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._walk(model)
        finally:
            if was_enabled:
                gc.enable()

    def _walk(self, model: nn.Module) -> None:
        # One tight loop: locals instead of attribute lookups, the per-dtype cast looked up inline.
        names, classes, parents, no_split = self.names, self.classes, self.parents, self.no_split
        own_bytes, own_buffer_bytes, own_tensors = self.own_bytes, self.own_buffer_bytes, self.own_tensors
        tensors, first_name, groups = self.tensors, self.first_name, self.groups
        no_split_classes, loaded_as, stored_dtypes = self.no_split_classes, self._loaded_as, self.stored
        by_dtypes = self._by_dtypes if not self.rule.per_name else None
        stack: list[tuple[str, nn.Module, int]] = [("", model, -1)]
        pop, push = stack.pop, stack.extend
        while stack:
            name, module, parent = pop()
            index = len(names)
            names.append(name)
            cls = type(module).__name__
            classes.append(cls)
            parents.append(parent)
            no_split.append(cls in no_split_classes)
            prefix = f"{name}." if name else ""
            own = own_buffers = count = 0
            # A quantized Linear (`quant.QuantLinear`) declares its quantized tensors; they are built from a
            # float weight, so the checkpoint's dtype says nothing about theirs: they keep their own.
            # (Looked up on the class: a miss on an instance goes through nn.Module.__getattr__, slow here.)
            quantized = module.bigload_quantized if hasattr(type(module), "bigload_quantized") else None
            kernel = module.bigload_kernel if quantized else ""
            for table, is_buffer in ((module._parameters, False), (module._buffers, True)):
                if not table:
                    continue
                computed = module._non_persistent_buffers_set if is_buffer else ()
                for attr, tensor in table.items():
                    if tensor is None:
                        continue
                    count += 1
                    tensor_name = prefix + attr
                    key = id(tensor)
                    if key in first_name:
                        # A tied duplicate: its bytes count at the first name.
                        groups.setdefault(key, [first_name[key]]).append(tensor_name)
                        continue
                    first_name[key] = tensor_name
                    built = tensor.dtype
                    scheme = quantized.get(attr, "") if quantized else ""
                    if computed and attr in computed:
                        cast = (built, tensor.element_size())  # computed, never loaded: keeps its dtype
                    else:
                        stored = stored_dtypes.get(tensor_name, built) if stored_dtypes and not scheme else built
                        cast = by_dtypes.get((stored, built)) if by_dtypes is not None else None
                        if cast is None:
                            cast = loaded_as(tensor_name, stored, built)
                    nbytes = tensor.numel() * cast[1]
                    known = stored_dtypes.get(tensor_name) if stored_dtypes and not scheme else None
                    tensors.append(TensorEntry(tensor_name, index, nbytes, cast[0], is_buffer, scheme, known,
                                               kernel if scheme else ""))
                    own += nbytes
                    if is_buffer:
                        own_buffers += nbytes
            own_bytes.append(own)
            own_buffer_bytes.append(own_buffers)
            own_tensors.append(count)
            children = module._modules
            if children:
                push([(prefix + key, child, index) for key, child in reversed(children.items()) if child is not None])

    def _loaded_as(self, name: str, stored: torch.dtype, built: torch.dtype) -> tuple[torch.dtype, int]:
        """(dtype once loaded, its width); cached per (stored, built) dtypes when no per-name rule applies."""
        dtype = self.rule.dtype_of(name, stored, built)
        answer = (dtype, self._width(dtype))
        if not self.rule.per_name:
            self._by_dtypes[(stored, built)] = answer
        return answer

    def _width(self, dtype: torch.dtype) -> int:
        width = self._widths.get(dtype)
        if width is None:
            width = self._widths[dtype] = dtype_width(dtype)
        return width


def _no_split_classes(model: nn.Module, given: Iterable[str] | None) -> frozenset[str]:
    if given is None:
        given = getattr(model, "_no_split_modules", None) or ()
    if isinstance(given, str):
        given = (given,)
    return frozenset(given)


def _first_float(builder: _ModuleWalk) -> torch.dtype | None:
    """The dtype of the model's first floating tensor: the dtype its KV cache will have by default."""
    for entry in builder.tensors:
        if entry.dtype.is_floating_point:
            return entry.dtype
    return None


def subtree_ends(parents: Sequence[int]) -> tuple[int, ...]:
    """End (exclusive) of each subtree in a pre-order list: a child's end bounds its parent's."""
    ends = list(range(1, len(parents) + 1))
    for i in range(len(parents) - 1, 0, -1):
        parent = parents[i]
        if ends[i] > ends[parent]:
            ends[parent] = ends[i]
    return tuple(ends)


# --------------------------------------------------------------------------------------------------
# Parts of an inventory (pipeline stages)


def decoder_blocks(inventory: Inventory) -> tuple[str, ...]:
    """The decoder stack's blocks in order (`model.layers.0`, ...): the largest group of numbered children
    of one container, unsplittable ones preferred. Empty when the model has no numbered blocks."""
    return decoder_block_names(inventory.names, inventory.no_split)


def sub_inventory(inventory: Inventory, modules: Iterable[str]) -> Inventory:
    """The inventory of part of a model: the subtrees of `modules` and the ancestors that hold them.

    Ancestors keep their names (so device-map keys stay the model's) but none of their own tensors; tied
    groups keep their names inside the part; the KV-cache spec keeps the part's attention layers. What one
    pipeline stage plans on its host.

    Raises:
        PlanError: a name is not a module of `inventory`.
    """
    roots = sorted(inventory.index(name) for name in modules)
    keep = [False] * len(inventory)
    inside = [False] * len(inventory)
    for root in roots:
        for i in range(root, inventory.ends[root]):
            keep[i] = inside[i] = True
        parent = inventory.parents[root]
        while parent >= 0 and not keep[parent]:
            keep[parent] = True
            parent = inventory.parents[parent]
    old = [i for i, kept in enumerate(keep) if kept]
    new_index = {i: j for j, i in enumerate(old)}
    tensors = tuple(entry._replace(module=new_index[entry.module]) for entry in inventory.tensors
                    if inside[entry.module])
    parents = tuple(new_index.get(inventory.parents[i], -1) for i in old)

    def own(values: Sequence[int]) -> tuple[int, ...]:
        return tuple(values[i] if inside[i] else 0 for i in old)

    kept_names = {inventory.names[i] for i in old}
    owners = {inventory.names[i] for i in old if inside[i]}
    tied = tuple(group for group in (tuple(n for n in g if n.rpartition(".")[0] in owners)
                                     for g in inventory.tied_groups) if len(group) > 1)
    kv = inventory.kv
    if kv is not None:
        kv = dataclasses.replace(kv, layers=tuple(name for name in kv.layers if name in kept_names))
    return Inventory(
        names=tuple(inventory.names[i] for i in old),
        classes=tuple(inventory.classes[i] for i in old),
        parents=parents,
        ends=subtree_ends(parents),
        own_bytes=own(inventory.own_bytes),
        own_buffer_bytes=own(inventory.own_buffer_bytes),
        own_tensors=own(inventory.own_tensors),
        no_split=tuple(inventory.no_split[i] for i in old),
        tensors=tensors,
        tied_groups=tied,
        kv=kv,
        dtype=inventory.dtype,
        rule=inventory.rule,
    )

