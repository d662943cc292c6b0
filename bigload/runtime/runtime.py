"""The runtime attached to a model: a forward pre-hook on each entry of the plan moves its inputs to where it
runs and, when its weights are offloaded, installs them (from the prefetcher's slots); a forward hook releases
them afterwards, so the entry's parameters are meta placeholders again. The root's hooks return outputs to the
device the caller's inputs were on.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bigload.errors import BigloadError, PlanError
from bigload.formats.mapped import FileUse, check_mapped, mapped_uses
from bigload.plan.value import Plan
from bigload.runtime.blocks import Block, Entry, build_blocks
from bigload.runtime.interop import adopt, forget, take_back_placement, watch_additions
from bigload.runtime.merges import check_merges, untrack_adapter_layer
from bigload.runtime.moves import DEFAULT_SKIP_KEYS, first_tensor_device, send
from bigload.runtime.prefetch import PrefetchStats, Prefetcher
from bigload.runtime.weights import HostWeights, WeightSource

__all__ = ["Runtime", "attach", "check_not_attached", "detach", "runtime_of"]

_RUNTIME_ATTR = "_bigload_runtime"


@dataclass
class Runtime:
    """Hooks, blocks and prefetcher attached to one model. Get it with `runtime_of(model)`."""

    model: nn.Module
    blocks: dict[str, Block]
    skip_keys: frozenset[str]
    prefetcher: Prefetcher
    handles: list[RemovableHandle] = field(default_factory=list)
    observed: list[str] = field(default_factory=list)
    order_confirmed: bool = False
    forwards: int = 0
    owned_attributes: list[str] = field(default_factory=list)  # set on the model by dispatch; detach drops them
    on_detach: list[Callable[[], None]] = field(default_factory=list)  # undo what others added (detach runs them)
    _installed: dict[str, list[tuple[str, torch.Tensor]]] = field(default_factory=dict)
    # Per block whose tensors never change (CPU, in place): the tensors and the values made from them, so a
    # forward re-registers the same objects instead of wrapping new Parameters.
    _values: dict[str, tuple[Mapping[str, torch.Tensor], list[torch.Tensor]]] = field(default_factory=dict)
    _input_devices: list[torch.device | None] = field(default_factory=list)
    # Modules or tensors were registered somewhere since the last look (adapters added after attach).
    changed: bool = False
    # Offloaded tensors by (id of the module holding them, attribute): what a merge into them rewrites.
    _offloaded_sites: dict[tuple[int, str], tuple[str, Entry]] = field(default_factory=dict)
    _placeholders: set[int] = field(default_factory=set)
    # The model's modules: a registration elsewhere (transformers slicing a ModuleList per forward) is not ours.
    _members: "weakref.WeakSet[nn.Module]" = field(default_factory=weakref.WeakSet)
    # peft layers wrapping an offloaded weight, and which of their adapters that weight's stored bytes hold.
    _adapter_layers: list[nn.Module] = field(default_factory=list)
    _merged: dict[int, tuple[str, ...]] = field(default_factory=dict)
    _merging: set[int] = field(default_factory=set)  # layers inside a merge/unmerge (peft re-enters them)
    # Mapped files (checkpoint shards, store files) the model's resident tensors view; None: not looked at yet.
    _resident_files: tuple[FileUse, ...] | None = None

    def stats(self) -> PrefetchStats:
        """Counters of the prefetcher: buffers, bytes held, reserve, blocks prefetched in order."""
        return self.prefetcher.stats()

    # -- hooks

    def _pre_forward(self, block: Block, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.changed:  # also here: a caller may run the model's forward without its root's hooks
            self._settle()
        if block.offloaded:
            self._install(block, self.prefetcher.acquire(block.name))
            self._observe(block.name)
        moved_args = send(args, block.execution_device, self.skip_keys)
        moved_kwargs = send(kwargs, block.execution_device, self.skip_keys)
        return moved_args, moved_kwargs

    def _post_forward(self, block: Block, module: nn.Module, args: tuple, output: Any) -> None:
        if block.offloaded:
            self._uninstall(block)
            self.prefetcher.release(block.name)

    def _root_pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._input_devices:
            if self.changed:
                self._settle()
            for layer in self._adapter_layers:
                check_merges(self, layer)
            self._check_resident_files()
        self._input_devices.append(first_tensor_device(args, kwargs, self.skip_keys))

    def _settle(self) -> None:
        """Before running after the model changed: take back placement from another runtime's hooks (peft's
        re-dispatch), adopt added tensors."""
        take_back_placement(self)
        adopt(self)
        self._resident_files = None

    def _check_resident_files(self) -> None:
        """Before each forward: the files resident CPU tensors view (weights loaded as views of the checkpoint)
        are not truncated or written in place since they were mapped, which would be SIGBUS or unchecked bytes
        once the forward touches them (`formats.mapped.check_mapped`). One `stat` per file."""
        if self._resident_files is None:
            self._resident_files = mapped_uses(itertools.chain(self.model.parameters(), self.model.buffers()))
        check_mapped(self._resident_files, "the model's weights kept in CPU memory")

    def _root_post_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        device = self._input_devices.pop() if self._input_devices else None
        if not self._input_devices:
            self._confirm_order()
            self.forwards += 1
        if device is None:
            return output
        return send(output, device, self.skip_keys)

    # -- execution order

    def _observe(self, name: str) -> None:
        if self.order_confirmed:
            return
        if name in self.observed:
            # A block ran twice before the root finished (or the root is never called, only a submodule):
            # one pass is complete either way.
            self._confirm_order()
        else:
            self.observed.append(name)

    def _confirm_order(self) -> None:
        if not self.order_confirmed:
            self.prefetcher.reorder(self.observed)
            self.order_confirmed = True
            self.observed.clear()

    # -- installing weights

    def _install(self, block: Block, tensors: Mapping[str, torch.Tensor]) -> None:
        cached = self._values.get(block.name)
        if cached is not None and cached[0] is tensors:
            values = cached[1]
        else:
            with torch.inference_mode(False):  # cached values are reused by forwards in any grad mode
                values = [entry.registered(tensors[entry.key]) for entry in block.entries]
            if self.prefetcher.stable(block.name):
                self._values[block.name] = (tensors, values)
        for entry, value in zip(block.entries, values):
            self._installed.setdefault(entry.key, []).append((block.name, value))
            for site in entry.sites:
                site.set(value)

    def _uninstall(self, block: Block) -> None:
        for entry in block.entries:
            stack = [item for item in self._installed.get(entry.key, []) if item[0] != block.name]
            self._installed[entry.key] = stack
            # A tied tensor still in use by an enclosing block keeps that block's copy.
            value = stack[-1][1] if stack else entry.placeholder
            for site in entry.sites:
                site.set(value)


def runtime_of(model: nn.Module) -> Runtime | None:
    """The runtime `attach` put on `model`, or None."""
    return model.__dict__.get(_RUNTIME_ATTR)


def check_not_attached(model: nn.Module) -> None:
    """Refuse a model that already has a runtime. Every entry point that places weights asks first, before it
    reads or writes anything: the runtime's placeholders hold no data (a second `disk_offload` would find
    nothing to write), and a load into them would leave the old hooks running other tensors.

    Raises:
        BigloadError: naming the fix, `bigload.detach(model)`.
    """
    if runtime_of(model) is not None:
        raise BigloadError(
            f"{type(model).__name__} already has a bigload runtime (hooks attached by a previous dispatch); "
            "call bigload.detach(model) first to remove it, then load or dispatch again."
        )


def attach(model: nn.Module, plan: Plan, *, store: WeightSource | None = None, host_weights: HostWeights | None = None,
           skip_keys: Iterable[str] | None = None, order: Sequence[str] | None = None) -> Runtime:
    """Hook each entry of `plan` so `model` runs with its weights where the plan put them.

    Args:
        model: a model whose tensors are where `plan` says: real on GPUs and the CPU, meta (with their bytes in
            `store`) on disk.
        plan: the plan (`plan`, `plan_for_map`): where each block runs, its slots, prefetch depth, disk reads
            and whether the buffers of offloaded blocks go with them.
        store: where disk-placed tensors are (a `DiskStore`).
        host_weights: where CPU-placed tensors that run on another device are; built from the model's own
            CPU tensors (used where they are, never pinned) when None.
        skip_keys: keyword arguments never moved; default `DEFAULT_SKIP_KEYS` (cache objects never move).
        order: execution order of the blocks when it differs from the plan's order.

    Returns:
        The `Runtime` (also `runtime_of(model)`), with `stats()` counters.

    Raises:
        BigloadError: the model already has a runtime (detach it first).
        PlanError: an entry names no module, or `order` names blocks the plan does not have.
        OffloadError: an offloaded tensor is in no weight source, or a block does not fit the plan's slots.
    """
    check_not_attached(model)
    # Host weights stay as they are (views of the checkpoint, pageable): the slots' pinned staging buffers
    # already overlap the copies, and pinning them would copy the whole CPU share into unswappable memory.
    blocks, resident = build_blocks(model, plan, store, host_weights if host_weights is not None else HostWeights())
    ordered = _execution_order(blocks, order)
    offloaded = [blocks[name] for name in ordered if blocks[name].offloaded]
    prefetcher = Prefetcher(offloaded, plan.prefetch, plan.slots, plan.main_device.torch_device(),
                            resident_buffer_bytes=resident)
    runtime = Runtime(model=model, blocks={name: blocks[name] for name in ordered},
                      skip_keys=frozenset(DEFAULT_SKIP_KEYS if skip_keys is None else skip_keys), prefetcher=prefetcher)
    # The root's hooks go first so its pre-hook sees the caller's inputs before a root block moves them.
    runtime.handles.append(model.register_forward_pre_hook(runtime._root_pre_forward, with_kwargs=True))
    runtime.handles.append(model.register_forward_hook(runtime._root_post_forward, always_call=True))
    for name in ordered:
        _hook_block(runtime, model.get_submodule(name), blocks[name])
    model.__dict__[_RUNTIME_ATTR] = runtime
    watch_additions(runtime)
    return runtime


def _execution_order(blocks: Mapping[str, Block], order: Sequence[str] | None) -> list[str]:
    names = list(blocks)
    if order is None:
        return names
    unknown = [name for name in order if name not in blocks]
    if unknown:
        raise PlanError(f"execution order names blocks {unknown[:5]} that are not in the device map.")
    return list(dict.fromkeys(order)) + [name for name in names if name not in order]


def _hook_block(runtime: Runtime, module: nn.Module, block: Block) -> None:
    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return runtime._pre_forward(block, mod, args, kwargs)

    def post(mod: nn.Module, args: tuple, output: Any) -> None:
        runtime._post_forward(block, mod, args, output)

    runtime.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    runtime.handles.append(module.register_forward_hook(post, always_call=True))


def detach(model: nn.Module) -> nn.Module:
    """Remove bigload's hooks; every offloaded tensor becomes a real CPU tensor again. Returns `model`.

    The result is a plain module that runs without bigload: GPU-resident tensors stay where they are,
    offloaded ones are read back into CPU memory (tied tensors stay tied).
    """
    runtime = runtime_of(model)
    if runtime is None:
        return model
    for handle in runtime.handles:
        handle.remove()
    runtime.prefetcher.close()
    for block in runtime.blocks.values():
        for entry in block.entries:
            stored = entry.source.get(entry.key)
            check_mapped(mapped_uses([stored]), f"tensor {entry.key!r}")  # about to be read in full
            stored = stored.reshape(entry.shape).to(entry.dtype)
            # Host weights are already ours; a store's tensors are views of files the caller may delete.
            value = stored if isinstance(entry.source, HostWeights) else stored.clone()
            real = entry.registered(value)
            for site in entry.sites:
                site.set(real)
    del model.__dict__[_RUNTIME_ATTR]
    forget(runtime)
    for attr in runtime.owned_attributes:
        model.__dict__.pop(attr, None)
    for layer in list(runtime._adapter_layers):
        untrack_adapter_layer(runtime, layer)
    for undo in runtime.on_detach:
        undo()
    return model
