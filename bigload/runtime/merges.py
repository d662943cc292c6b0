"""peft merges into offloaded weights, run by peft itself on real tensors, with the result written where the
weights are stored.

peft merges by changing `base_layer.weight` (and `.bias` for `lora_bias`) in place, which for an offloaded
weight is the meta placeholder, and DoRA's weight norm and `safe_merge`'s NaN check need the real values.
When the runtime follows a peft layer wrapping an offloaded weight it gives the layer `merge`/`unmerge` instance
attributes that run peft's own method with the block installed and private copies of the base layer's
offloaded tensors registered in place of the installed ones; the tensors peft changed are then written into
the weight source (`DiskStore.rewrite`, `HostWeights.rewrite`), all of a layer's at once; when that fails the
layer is left unmerged. The checkpoint is never written.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from bigload.errors import OffloadError
from bigload.runtime.blocks import Block, Entry
from bigload.runtime.weights import HostWeights, WeightSource
from bigload.tensors import tensor_groups

if TYPE_CHECKING:
    from bigload.runtime.runtime import Runtime

__all__ = ["check_merges", "track_adapter_layer", "untrack_adapter_layer", "wraps_offloaded_weight"]

logger = logging.getLogger(__name__)

# peft's merge methods, which the runtime runs with the base layer's offloaded tensors real (`_merge_in_store`).
_MERGE_CALLS = ("merge", "unmerge")


def wraps_offloaded_weight(runtime: "Runtime", module: nn.Module) -> bool:
    """A peft tuner layer (it tracks `merged_adapters`) whose base layer's weight is offloaded."""
    get_base = getattr(module, "get_base_layer", None)
    if not callable(get_base) or not hasattr(module, "merged_adapters"):
        return False
    return (id(get_base()), "weight") in runtime._offloaded_sites


def track_adapter_layer(runtime: "Runtime", layer: nn.Module) -> None:
    """Follow peft `layer`, which wraps an offloaded weight: its `merge` and `unmerge` reach the stored weight.

    peft merges in place into `base_layer.weight`, which between forwards is the meta placeholder, and DoRA
    and `safe_merge` need the real values (a weight norm, a NaN check). No torch hook sees a method call, so
    the layer gets `merge`/`unmerge` instance attributes (the runtime's own state, removed by
    `untrack_adapter_layer` and `detach`) that run peft's own methods through `_merge_in_store`.
    """
    runtime._adapter_layers.append(layer)
    for name in _MERGE_CALLS:
        if name not in layer.__dict__:
            layer.__dict__[name] = functools.partial(_merge_in_store, runtime, layer, getattr(layer, name))


def untrack_adapter_layer(runtime: "Runtime", layer: nn.Module) -> None:
    """Stop following `layer` (peft replaced it by its base layer, or the runtime is detached)."""
    for name in _MERGE_CALLS:
        layer.__dict__.pop(name, None)
    runtime._adapter_layers.remove(layer)
    runtime._merged.pop(id(layer), None)


def _merge_in_store(runtime: "Runtime", layer: nn.Module, peft_call: Callable[..., Any], *args: Any,
                    **kwargs: Any) -> Any:
    """peft's `merge`/`unmerge` of `layer`, run by peft itself on real tensors, with the result stored.

    The block's tensors are installed (adapter weights streamed with the block are real) and each offloaded
    tensor of the base layer is replaced by a private copy, so peft's own arithmetic (plain LoRA, DoRA and
    its weight norm, `lora_bias`, `safe_merge`'s checks) runs exactly as in memory; the copies peft changed
    are then written where those tensors are stored, all of the layer's at once (`WeightSource.rewrite`), so
    the merged weight never stays in RAM. Resident tensors of the base layer (not offloaded) are changed in
    place by peft, as in memory. What peft merged before raising part way (an adapter before a failing one)
    is written too: the stored weights always hold what `layer.merged_adapters` says. When writing fails (a
    full disk), nothing was stored, and the layer is put back as it was: `merged_adapters` and its resident
    tensors as before the call, so the same call can be made again once the cause is fixed.
    """
    if id(layer) in runtime._merging:  # DoRA unmerges and re-merges the others to see the unmerged weight
        return peft_call(*args, **kwargs)
    check_merges(runtime, layer)
    block = runtime.blocks[runtime._offloaded_sites[(id(layer.get_base_layer()), "weight")][0]]
    before = tuple(layer.merged_adapters)
    resident = _resident_copies(runtime, layer.get_base_layer())
    changed: list[tuple[Entry, torch.Tensor]] = []
    runtime._merging.add(id(layer))
    try:
        with torch.no_grad(), _in_use(runtime, block):
            copies = _private_copies(runtime, layer.get_base_layer())
            try:
                return peft_call(*args, **kwargs)
            finally:
                if tuple(layer.merged_adapters) != before:
                    changed = _changed(copies)
    finally:
        runtime._merging.discard(id(layer))
        try:
            _write_merges(runtime, block, changed, before, tuple(layer.merged_adapters))
        except BaseException:
            _put_back(layer, before, resident)
            raise
        finally:
            runtime._merged[id(layer)] = tuple(layer.merged_adapters)


def _resident_copies(runtime: "Runtime", base: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the base layer's resident tensors (peft changes them in place), to put back if the merge of
    its offloaded ones cannot be stored."""
    with torch.no_grad():
        return [(group.tensor, group.tensor.detach().clone()) for group in tensor_groups(base)
                if group.tensor.device.type != "meta"
                and not any((id(site.module), site.attr) in runtime._offloaded_sites for site in group.sites)]


def _put_back(layer: nn.Module, merged: tuple[str, ...], resident: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The layer as before a merge whose result could not be stored: peft's record of merged adapters and its
    resident tensors. Its offloaded tensors need nothing: peft changed private copies, now dropped."""
    layer.merged_adapters[:] = list(merged)
    with torch.no_grad():
        for tensor, value in resident:
            tensor.copy_(value)


@contextlib.contextmanager
def _in_use(runtime: "Runtime", block: Block) -> Iterator[None]:
    """The block's offloaded tensors installed: those of its running forward (peft unmerges in the forward of a
    merged layer whose adapters are disabled), else installed for the duration."""
    if block.name in runtime.prefetcher.in_use:
        yield
    else:
        with _installed(runtime, block):
            yield


_Copy = tuple[Entry, torch.Tensor, torch.Tensor]  # an offloaded tensor: its entry, installed value, private copy


def _private_copies(runtime: "Runtime", base: nn.Module) -> list[_Copy]:
    """Register a private copy of each installed offloaded tensor of `base` for peft to change in place: the
    installed values may be the store's own bytes (an mmap'd file, host weights) or kept for later forwards."""
    copies: dict[str, _Copy] = {}
    for group in tensor_groups(base):
        found = next((runtime._offloaded_sites.get((id(site.module), site.attr)) for site in group.sites), None)
        if found is None or found[1].key in copies:
            continue
        entry, tensor = found[1], group.tensor
        with torch.inference_mode(False):
            copy = entry.registered(tensor.detach().clone())
        for each in entry.sites:  # every alias of a tied weight, as peft changes them all in memory
            each.set(copy)
        copies[entry.key] = (entry, tensor, copy)
    return list(copies.values())


def _changed(copies: list[_Copy]) -> list[tuple[Entry, torch.Tensor]]:
    """The tensors peft changed (in place, or by giving the Parameter new data), with their new values."""
    changed = []
    for entry, installed, _ in copies:
        value = entry.sites[0].get()
        assert value is not None  # _private_copies registered a copy here
        if not torch.equal(value, installed):
            changed.append((entry, value.detach()))
    return changed


def _write_merges(runtime: "Runtime", block: Block, changed: list[tuple[Entry, torch.Tensor]],
                  before: tuple[str, ...], after: tuple[str, ...]) -> None:
    """Store the values a merge changed (`DiskStore.rewrite` records the change in the folder's fingerprint)
    and drop what the runtime loaded or cached of the old ones."""
    added = [name for name in after if name not in before]
    removed = [name for name in before if name not in after]
    change = f"merged {added} into" if added else f"unmerged {removed} from"
    by_source: dict[int, tuple[WeightSource, dict[str, torch.Tensor]]] = {}
    for entry, value in changed:
        values = by_source.setdefault(id(entry.source), (entry.source, {}))[1]
        stored = entry.source.get(entry.key)  # its stored dtype and shape (a view: no bytes are read)
        values[entry.key] = value.to(stored.dtype).reshape(stored.shape)
    # The disk store first: it is the one that can fail (a full disk), and then nothing has changed anywhere.
    for source, values in sorted(by_source.values(), key=lambda item: isinstance(item[0], HostWeights)):
        source.rewrite(values, change=change)
        logger.info("bigload: %s %s", change, ", ".join(values))
    if changed:
        runtime.prefetcher.forget(block.name)
        runtime._values.pop(block.name, None)


def check_merges(runtime: "Runtime", layer: nn.Module) -> None:
    """Check that the stored weights under peft `layer` hold the adapters peft says are merged into them.

    peft's `merge`/`unmerge` write where the weights are stored as they run (`_merge_in_store`). The runtime
    checks before each forward and when peft puts a merged base layer back, so a merge that bypassed them
    is an error rather than silently wrong outputs.

    Raises:
        OffloadError: the adapters peft marks merged differ from those the stored weights hold.
    """
    want, have = tuple(layer.merged_adapters), runtime._merged.get(id(layer), ())
    if want == have:
        return
    key = runtime._offloaded_sites[(id(layer.get_base_layer()), "weight")][1].key
    raise OffloadError(
        f"peft marks adapters {list(want)} merged into the offloaded weight {key!r}, whose stored value holds "
        f"{list(have)}: the change did not go through the layer's merge()/unmerge() (called on its class, or "
        "`merged_adapters` edited), so it never reached the stored weight. Use peft's calls on the model "
        "(merge_adapter(), unmerge_adapter(), merge_and_unload()), or reload the model."
    )


@contextlib.contextmanager
def _installed(runtime: "Runtime", block: Block) -> Iterator[None]:
    """The block's offloaded tensors installed, as during its forward."""
    runtime._install(block, runtime.prefetcher.acquire(block.name))
    try:
        yield
    finally:
        runtime._uninstall(block)
        runtime.prefetcher.release(block.name)
