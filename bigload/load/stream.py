"""The loader: stream a checkpoint into a model built on meta, each tensor straight to where the map says.

`load_checkpoint_in_model` checks the checkpoint's headers against the model first (missing, unexpected and
mis-shaped tensors are an error by default, before any byte is read), then walks the tensors in file order:

- CPU, same dtype: the model's tensor becomes the memory-mapped view itself (no copy, no private memory);
- CPU, another dtype: cast tensor by tensor, so private memory grows only by the cast results;
- GPU: copied through a small ring of pinned staging buffers on a side CUDA stream, filling one buffer
  (the read) while the previous one is in flight, and cast on the GPU;
- disk: written into a `DiskStore` in `offload_folder` (a reference to the safetensors file when nothing
  needs converting); the model's tensor stays on meta, in its final dtype.

The disk is read ahead of the reader thread by several threads at once (`bigload.load.readahead`: pages read into
the page cache and mapped, at most `window_bytes` ahead, pages already in memory skipped), since one stream of
page faults leaves the disk mostly idle. The bytes of temporaries in flight are capped by `window_bytes` too:
peak private memory is the CPU-resident cast results and requested copies plus that window (or the largest
single tensor, if larger), never a whole shard.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence, Union

import torch
from torch import nn

from bigload.plan.budget import check_devices_exist
from bigload.formats.checkpoint import CheckpointIndex, CheckpointReader, TensorRef, open_checkpoint
from bigload.devices import CPU, Device, DeviceKind, DeviceLike
from bigload.errors import BudgetError, CheckpointError, DeviceError, OffloadError
from bigload.plan.inventory import DtypeRule, Inventory, castable, inventory_from_module
from bigload.messages import Setting, Text, setting
from bigload.quant import (
    Layout,
    PackMemo,
    QuantLinear,
    Quantization,
    Scheme,
    check_device,
    pin_thread_counts,
    quantize_model,
    quantized_linears,
)
from bigload.load.readahead import Extent, ReadAhead
from bigload.sizes import dtype_width, format_size, parse_dtype
from bigload.load.folder import check_offload_folder
from bigload.load.store import DiskStore, StoreOrigin, StoreWriter, dtype_name
from bigload.tensors import Site, owner_of, tensor_groups

__all__ = [
    "DerivedTensor",
    "DeviceMapLike",
    "HasDeviceMap",
    "LoadResult",
    "Mismatch",
    "SourcePlan",
    "Transfer",
    "gpu_cast_bytes",
    "load_checkpoint_in_model",
    "prepare_quantization",
    "source_dtypes",
]

logger = logging.getLogger(__name__)

_PROGRESS_MIN_BYTES = 2**30
_MAX_PENDING = 64  # zero-copy tasks cost no window bytes; this bounds the queue of futures instead
_STAGING_SLOTS = 4
# One reader thread overlaps casting with placement; `ReadAhead`'s threads do the I/O and torch's intra-op
# threads already split each cast, so more reader threads would only hold more temporaries.
_READERS = 1
_LISTED = 20


class HasDeviceMap(Protocol):
    """Anything carrying a transformers-format device map, such as a bigload `Plan`."""

    @property
    def device_map(self) -> Mapping[str, DeviceLike]: ...


DeviceMapLike = Union[Mapping[str, DeviceLike], HasDeviceMap]


@dataclass(frozen=True)
class Mismatch:
    """A tensor whose shape in the checkpoint differs from the model's."""

    name: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name} (checkpoint {list(self.checkpoint_shape)}, model {list(self.model_shape)})"


@dataclass(frozen=True)
class DerivedTensor:
    """A model tensor the checkpoint holds in pieces (e.g. one tensor per MoE expert), built while loading.

    Attributes:
        name: the model tensor's name.
        shape, dtype: what `build` returns (before any cast to the load dtype).
        parts: the checkpoint tensors it is built from, in the order `build` receives them.
        build: called on the reader thread with the parts (CPU tensors in their stored dtype and shape,
            usually memory-mapped views); returns the tensor. Only one derived tensor's parts and result are
            in memory at a time.
        how: what `build` does, for messages (e.g. "stack 8 experts, then concatenate").
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[TensorRef, ...]
    build: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    how: str = ""

    @property
    def nbytes(self) -> int:
        """Checkpoint bytes read to build it."""
        return sum(part.nbytes for part in self.parts)

    @property
    def size_bytes(self) -> int:
        """Bytes of the built tensor."""
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * dtype_width(self.dtype)


Source = Union[TensorRef, DerivedTensor]


@dataclass(frozen=True)
class SourcePlan:
    """Where model tensors are in a checkpoint whose names (or layout) differ from the model's.

    The loader stays format-agnostic: whoever knows the conversion (bigload.integrations.hf, from transformers' conversion
    mapping) says, for the model tensors concerned, which checkpoint tensor holds each one (a `TensorRef`
    under another name) or how to build it from several (`DerivedTensor`). Checkpoint tensors no entry uses
    are matched by their own name.

    Attributes:
        tensors: model tensor name -> the `TensorRef` or `DerivedTensor` to load it from.
        ignored: checkpoint tensors the model does not use by design (a task head when loading the base
            model, stale buffers of old checkpoints); neither loaded nor reported as unexpected.
    """

    tensors: Mapping[str, Source] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LoadResult:
    """What a load did.

    Attributes:
        missing: model tensors the checkpoint does not hold (left on meta).
        unexpected: checkpoint tensors the model does not have (not read).
        mismatched: tensors whose shapes differ (not read; the model's stays on meta).
        offloaded: model tensors placed on disk (on meta in the model, their bytes in `store`).
        store: the offload store (a committed, read-only `DiskStore`), when anything went to disk.
        bytes_read: bytes of checkpoint data placed.
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[Mismatch, ...] = ()
    offloaded: tuple[str, ...] = ()
    store: DiskStore | None = None
    bytes_read: int = 0


# ---------------------------------------------------------------------------------------------------------
# the model side: which tensors exist, tied groups, where and in which dtype each goes


@dataclass
class _Group:
    """One model tensor object and every name it is registered under (several when tied)."""

    names: tuple[str, ...]
    sites: tuple[Site, ...]
    original: torch.Tensor
    persistent: bool
    device: Device = CPU
    dtype: torch.dtype = torch.float32
    loaded: bool = False


@dataclass(frozen=True)
class _Task:
    """Read `ref` (or build it from its parts) and put it into `group`, by `kind` (decided once, after
    matching, by `_with_kinds`; None only between matching and that decision)."""

    ref: Source
    group: _Group
    kind: Transfer | None = None


class Transfer(enum.Enum):
    """How one tensor gets to its place, decided once per tensor (`_transfer_kind`); the reading, placing,
    window cost and page release of the loader all look it up instead of re-deriving it.

    VIEW: CPU, same dtype: the model tensor is the memory-mapped view itself (no private memory).
    CPU_CAST: CPU, private memory: a cast, a built (derived) tensor, or a copy asked for (`materialize`).
    GPU_STAGE: to a GPU through the pinned staging ring (cast there).
    STORE_WRITE: into the offload store as raw bytes (cast while writing).
    STORE_REFERENCE: an offload-store entry pointing into the safetensors file (nothing written).
    STORE_REUSED: the offload store already holds it (nothing read, nothing written).
    """

    VIEW = "view"
    CPU_CAST = "cpu_cast"
    GPU_STAGE = "gpu_stage"
    STORE_WRITE = "store_write"
    STORE_REFERENCE = "store_reference"
    STORE_REUSED = "store_reused"


# Kinds that copy the tensor's bytes out of the checkpoint file: its pages can be released once placed.
_COPIES = frozenset({Transfer.CPU_CAST, Transfer.GPU_STAGE, Transfer.STORE_WRITE})
# Kinds whose bytes are never read while loading: the store has them, or will point into the file.
_UNREAD = frozenset({Transfer.STORE_REUSED, Transfer.STORE_REFERENCE})


def _transfer_kind(ref: Source, group: _Group, reuse_store: bool, materialize: bool) -> Transfer:
    derived = isinstance(ref, DerivedTensor)
    if group.device.kind is DeviceKind.DISK:
        if reuse_store:
            return Transfer.STORE_REUSED
        referenced = (not derived and ref.format == "safetensors" and ref.stride is None  # type: ignore[union-attr]
                      and ref.dtype == group.dtype)
        return Transfer.STORE_REFERENCE if referenced else Transfer.STORE_WRITE
    if group.device.is_gpu:
        return Transfer.GPU_STAGE
    return Transfer.CPU_CAST if derived or ref.dtype != group.dtype or materialize else Transfer.VIEW


def _with_kinds(tasks: Sequence[_Task], reuse_store: bool, materialize: bool) -> tuple[_Task, ...]:
    """The matched tasks, each with its transfer kind decided."""
    return tuple(_Task(t.ref, t.group, _transfer_kind(t.ref, t.group, reuse_store, materialize)) for t in tasks)


def _parts(source: Source) -> tuple[TensorRef, ...]:
    return source.parts if isinstance(source, DerivedTensor) else (source,)


def _read(reader: CheckpointReader, source: Source) -> torch.Tensor:
    if isinstance(source, DerivedTensor):
        return source.build([reader.read(part) for part in source.parts])
    return reader.read(source)


def _model_groups(model: nn.Module) -> list[_Group]:
    """Every parameter and buffer (`tensors.tensor_groups`: tied weights form one group), to be placed."""
    return [_Group(group.names, group.sites, group.tensor, group.persistent) for group in tensor_groups(model)]


def _resolve_map(device_map: DeviceMapLike | str | None) -> dict[str, Device]:
    if device_map is None:
        return {"": CPU}
    device_map = getattr(device_map, "device_map", device_map)  # a bigload Plan carries one
    if isinstance(device_map, str):
        raise DeviceError(
            f"device_map={device_map!r} must be planned first; use bigload.plan.planner (or load_checkpoint_and_dispatch) "
            "to turn it into a dict such as {'model.layers.0': 0, 'lm_head': 'cpu'}."
        )
    if not isinstance(device_map, Mapping):
        raise DeviceError(f"device_map must be a dict of module name to device, got {type(device_map).__name__}.")
    return {str(name): Device.parse(value) for name, value in device_map.items()}


def _device_of(name: str, dmap: Mapping[str, Device]) -> Device | None:
    """Where tensor `name` goes: the map value of its owner (`tensors.owner_of`), None when unmapped."""
    owner = owner_of(name, dmap)
    return None if owner is None else dmap[owner]


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


# ---------------------------------------------------------------------------------------------------------
# matching checkpoint names to model tensors


@dataclass(frozen=True)
class _Match:
    tasks: tuple[_Task, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[Mismatch, ...]


def _sources(index: CheckpointIndex, plan: SourcePlan | None) -> tuple[dict[str, Source], list[str]]:
    """Model-side name -> where its bytes are, in the order the checkpoint's files hold them (a derived
    tensor at its first part); and the checkpoint tensors a plan entry's name shadows (unexpected)."""
    if plan is None:
        return dict(index.tensors), []
    consumers: dict[str, list[str]] = {}  # checkpoint name -> model names built from it (a fused qkv: 3)
    for name, source in plan.tensors.items():
        for part in _parts(source):
            consumers.setdefault(part.name, []).append(name)
    table: dict[str, Source] = {}
    shadowed: list[str] = []
    for checkpoint_name, ref in index.tensors.items():
        if checkpoint_name in plan.ignored:
            continue
        if checkpoint_name in consumers:
            for name in consumers[checkpoint_name]:
                table.setdefault(name, plan.tensors[name])
        elif checkpoint_name in plan.tensors:
            shadowed.append(checkpoint_name)
        else:
            table[checkpoint_name] = ref
    return table, shadowed


def source_dtypes(index: CheckpointIndex, sources: SourcePlan | None = None) -> dict[str, torch.dtype]:
    """Model tensor name -> the dtype its bytes have in the checkpoint (headers only), for the inventory's
    dtype decisions (`inventory_from_module(stored_dtypes=...)`)."""
    return {name: source.dtype for name, source in _sources(index, sources)[0].items()}


def _match(index: CheckpointIndex, groups: list[_Group], only: Sequence[str],
           plan: SourcePlan | None = None) -> _Match:
    sources, shadowed = _sources(index, plan)
    by_name = {name: group for group in groups for name in group.names}
    chosen: dict[str, _Group] = {}
    missing: list[str] = []
    mismatched: list[Mismatch] = []
    for group in groups:
        wanted = [name for name in group.names if _under(name, only)]
        if not wanted or not group.persistent:
            continue  # non-persistent buffers are computed, never loaded (old checkpoints hold stale copies)
        present = next((name for name in wanted if name in sources), None)
        if present is None:
            missing.extend(wanted)
            continue
        ref_shape, model_shape = sources[present].shape, tuple(group.original.shape)
        if ref_shape != model_shape:
            mismatched.append(Mismatch(present, ref_shape, model_shape))
            continue
        chosen[present] = group
    unexpected = [name for name in sources if name not in by_name and _under(name, only)]
    unexpected += [name for name in shadowed if _under(name, only)]
    tasks = tuple(_Task(ref, chosen[name]) for name, ref in sources.items() if name in chosen)
    return _Match(tasks, tuple(missing), tuple(unexpected), tuple(mismatched))


def _report(match: _Match, index: CheckpointIndex, strict: bool, checkpoint: object, model_name: str) -> None:
    """Raise for what cannot be loaded (before any byte is read); warn, as accelerate does, about the rest."""
    problems = [
        (f"{len(match.missing)} missing", list(match.missing)),
        (f"{len(match.unexpected)} unexpected", list(match.unexpected)),
        (f"{len(match.mismatched)} with mismatched shapes", [str(m) for m in match.mismatched]),
    ]
    lines = [f"{label}: {_first(names)}" for label, names in problems if names]
    where = index.files[0] if len(index.files) == 1 else index.root
    if match.mismatched or (strict and lines):
        fix = ("Check that the checkpoint is for this model and config" + (
            ", or pass strict=False to load the matching tensors and get the rest in the LoadResult."
            if not match.mismatched else "; tensors of another shape cannot be loaded into it."))
        raise CheckpointError(f"the checkpoint {where} does not match the model: " + "; ".join(lines) + ". " + fix)
    if match.unexpected:
        # accelerate's words, so logs and tests written against accelerate read the same.
        logger.warning(
            f"Some weights of the model checkpoint at {checkpoint} were not used when initializing {model_name}: "
            f"{set(match.unexpected)}. This may or may not be an issue - make sure that the checkpoint does not "
            "have unnecessary parameters, or that the model definition correctly corresponds to the checkpoint."
        )
    if match.missing:
        # accelerate leaves them on meta silently; bigload says so.
        logger.warning("%d tensors of %s are not in the checkpoint %s and stay on the meta device: %s",
                       len(match.missing), model_name, where, _first(list(match.missing)))


def _first(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _LISTED else "")


# ---------------------------------------------------------------------------------------------------------
# placing tensors


def _assign(group: _Group, tensor: torch.Tensor) -> None:
    """Register `tensor` in every slot of the group as one object (tied weights stay one Parameter)."""
    original = group.original
    if isinstance(original, nn.Parameter):
        grad = original.requires_grad and (tensor.is_floating_point() or tensor.is_complex())
        value: torch.Tensor = type(original)(tensor, requires_grad=grad)
        value.__dict__.update(original.__dict__)
    else:
        value = tensor
    for site in group.sites:
        site.set(value)
    group.original = value
    group.loaded = True


def gpu_cast_bytes(index: CheckpointIndex, dtype: torch.dtype | None) -> int:
    """The most a GPU briefly holds beyond a tensor's final bytes while loading into `dtype`.

    `_GpuStager` lands a tensor in its stored dtype, then casts it on the GPU: the largest castable tensor
    stored in another dtype is that temporary (its stored bytes). 0 when `dtype` is None (the model's own
    dtype; nothing is known to be cast) or nothing needs a cast. The planner keeps this much free per GPU.

    >>> gpu_cast_bytes(open_checkpoint("llama-f32/"), torch.bfloat16)  # doctest: +SKIP
    2101346304
    """
    if dtype is None or not castable(dtype):
        return 0
    return max((ref.nbytes for ref in index.tensors.values() if castable(ref.dtype) and ref.dtype != dtype),
               default=0)


class _GpuStager:
    """Host-to-GPU copies through a ring of (pinned) staging buffers on one side stream per GPU.

    Filling buffer k+1 from the memory-mapped file (the actual disk read) overlaps the DMA out of buffer k;
    an event per buffer says when it may be refilled. `finish` waits for every copy before the model runs.

    The ring is pinned host memory beside the CPU-resident weights while loading, so it is part of the
    loader's window (`_STAGING_SLOTS` buffers of `window_bytes / _STAGING_SLOTS`, never a shard), not of the
    plan: the plan charges what is held while the model runs. `finish` gives it back to the system (torch's
    pinned allocator would otherwise cache it for good), so it never coexists with the runtime's staging
    buffers, which the plan charges to the CPU (`SlotSpec.staging_bytes`).
    """

    def __init__(self, window_bytes: int, pin: bool, devices: Iterable[Device]) -> None:
        slot_bytes = max(1 << 20, window_bytes // _STAGING_SLOTS)
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(_STAGING_SLOTS)]
        self.events: list[torch.cuda.Event | None] = [None] * _STAGING_SLOTS
        self.next = 0
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        for device in devices:
            target = device.torch_device()
            stream = torch.cuda.Stream(target)
            # Memory the default stream freed may be reused here; order after its pending work.
            stream.wait_stream(torch.cuda.current_stream(target))
            self.streams[target] = stream

    def copy(self, source: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`source` (CPU, contiguous) on `device` in `dtype`; asynchronous until `finish`."""
        stream = self.streams[device]
        landed = torch.empty(source.shape, dtype=source.dtype, device=device)
        src = source.reshape(-1).view(torch.uint8)
        dst = landed.reshape(-1).view(torch.uint8)
        size = len(self.buffers[0])
        for start in range(0, src.numel(), size):
            count = min(size, src.numel() - start)
            slot = self._free_slot()
            staging = self.buffers[slot][:count]
            staging.copy_(src[start:start + count])  # the disk read happens here, while earlier DMAs run
            with torch.cuda.stream(stream):
                dst[start:start + count].copy_(staging, non_blocking=True)
                self.events[slot] = torch.cuda.Event(blocking=True)  # waited on by sleeping, not spinning
                self.events[slot].record(stream)
        landed.record_stream(stream)  # freed (after a cast) only once the side stream is done with it
        if dtype == source.dtype:
            return landed
        result = torch.empty(source.shape, dtype=dtype, device=device)
        with torch.cuda.stream(stream):
            result.copy_(landed)  # the cast runs on the GPU, not in host memory
        result.record_stream(stream)
        return result

    def _free_slot(self) -> int:
        slot = self.next
        self.next = (slot + 1) % _STAGING_SLOTS
        event = self.events[slot]
        if event is not None:
            event.synchronize()  # the DMA that last read this buffer is done
        return slot

    def finish(self) -> None:
        """Wait for every copy, then return the ring's pinned memory to the system."""
        for stream in self.streams.values():
            stream.synchronize()
        self.buffers.clear()
        self.events.clear()
        _empty_pinned_cache()


def _empty_pinned_cache() -> None:
    """Release the pinned blocks torch's host allocator caches but nobody uses (freed staging rings)."""
    if not torch.cuda.is_initialized():
        return  # nothing was pinned (and the call below refuses to run without a device)
    # The public name (torch >= 2.9), else the one torch.cuda itself calls in older CUDA builds.
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    empty = empty or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


@dataclass
class _Placer:
    """Executes each task's transfer kind: reads (on the reader thread), places, writes the store."""

    store: StoreWriter | None  # None when nothing is written (no disk tensors, or a reused store)
    stager: _GpuStager | None
    offloaded: list[str] = field(default_factory=list)

    @staticmethod
    def cost(task: _Task) -> int:
        """Private bytes `prepare` (or, for disk, `put`) allocates for this task until it is placed."""
        ref, group, kind = task.ref, task.group, task.kind
        if kind is Transfer.STORE_REUSED:
            return 0
        cast_bytes = group.original.numel() * dtype_width(group.dtype)
        if isinstance(ref, DerivedTensor):
            return ref.size_bytes + (cast_bytes if kind is Transfer.CPU_CAST and ref.dtype != group.dtype else 0)
        if ref.stride is not None:
            return ref.size_bytes  # strided .bin views are made contiguous first
        # Views cost nothing; disk casts go through the store's small reused buffer; GPU casts run on the GPU.
        return cast_bytes if kind is Transfer.CPU_CAST else 0

    @staticmethod
    def prepare(reader: CheckpointReader, task: _Task) -> torch.Tensor | None:
        """Read (and for the CPU, cast) one tensor; runs on the reader thread."""
        kind = task.kind
        if kind in _UNREAD:
            return None  # nothing to read: the store already has it, or will point into the file
        tensor = _read(reader, task.ref)
        if kind is Transfer.GPU_STAGE:
            return tensor.contiguous()  # a copy only for the rare strided .bin view
        if kind is not Transfer.CPU_CAST:
            return tensor  # a view (VIEW), or bytes the store casts while writing (STORE_WRITE)
        if tensor.dtype != task.group.dtype:
            return tensor.to(task.group.dtype)
        # A derived tensor is already private memory; a plain read is a view of the file: copy it (materialize).
        return tensor if isinstance(task.ref, DerivedTensor) else tensor.clone()

    def place(self, task: _Task, tensor: torch.Tensor | None) -> None:
        group, kind = task.group, task.kind
        if kind in (Transfer.STORE_WRITE, Transfer.STORE_REFERENCE, Transfer.STORE_REUSED):
            self._offload(task, tensor)
        elif kind is Transfer.GPU_STAGE:
            assert self.stager is not None and tensor is not None  # set up whenever the map names a GPU
            _assign(group, self.stager.copy(tensor, group.device.torch_device(), group.dtype))
        else:
            assert tensor is not None  # CPU tasks always read
            _assign(group, tensor)

    @staticmethod
    def reads(task: _Task) -> bool:
        """Whether `prepare` reads this task's bytes from the checkpoint (a store entry may need none)."""
        return task.kind not in _UNREAD

    @staticmethod
    def copied(task: _Task) -> bool:
        """Whether placing `task` copied its bytes out of the file, so no tensor views them any more."""
        return task.kind in _COPIES

    def _offload(self, task: _Task, tensor: torch.Tensor | None) -> None:
        group, name = task.group, task.group.names[0]
        if task.kind is Transfer.STORE_REFERENCE:
            assert self.store is not None  # created whenever the map names disk
            self.store.put_reference(name, task.ref)  # type: ignore[arg-type]  # only TensorRefs are referenced
        elif task.kind is Transfer.STORE_WRITE:
            assert self.store is not None and tensor is not None
            self.store.put(name, tensor, dtype=group.dtype)
        _assign(group, torch.empty(group.original.shape, dtype=group.dtype, device="meta"))
        self.offloaded.extend(group.names)


# ---------------------------------------------------------------------------------------------------------
# the pipeline


def _run(tasks: Sequence[_Task], reader: CheckpointReader, placer: _Placer, window: int,
         on_placed: Callable[[int], None]) -> None:
    """Read ahead on threads, place in file order; bytes of unplaced temporaries stay within `window`, and the
    disk is read at most `window` bytes ahead of the reader thread (`ReadAhead`)."""
    pending: deque[tuple[_Task, Future[torch.Tensor | None], int]] = deque()
    in_flight = 0
    uses = [[Extent(part.file, part.offset, part.nbytes) for part in _parts(task.ref)] if placer.reads(task) else []
            for task in tasks]
    with ReadAhead(reader.populate, uses, window) as ahead, \
            ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="bigload-read") as pool:
        try:
            for position, task in enumerate(tasks):
                cost = placer.cost(task)
                while pending and (in_flight + cost > window or len(pending) >= _MAX_PENDING):
                    in_flight -= _place_oldest(pending, placer, reader, on_placed)
                pending.append((task, pool.submit(_prepare_read, ahead, position, placer, reader, task), cost))
                in_flight += cost
            while pending:
                _place_oldest(pending, placer, reader, on_placed)
        finally:
            for _, future, _ in pending:
                future.cancel()


def _prepare_read(ahead: ReadAhead, position: int, placer: _Placer, reader: CheckpointReader,
                  task: _Task) -> torch.Tensor | None:
    ahead.wait(position)  # its bytes in memory first: a cast or copy then never waits on a page fault
    return placer.prepare(reader, task)


def _place_oldest(pending: deque[tuple[_Task, Future[torch.Tensor | None], int]], placer: _Placer,
                  reader: CheckpointReader, on_placed: Callable[[int], None]) -> int:
    task, future, cost = pending.popleft()
    placer.place(task, future.result())
    if placer.copied(task):
        reader.release(_parts(task.ref))  # keeps file-backed RSS at the bytes in flight, not the checkpoint
    on_placed(task.ref.nbytes)
    return cost


# ---------------------------------------------------------------------------------------------------------
# buffers no checkpoint holds


def _settle_unloaded_buffers(groups: list[_Group]) -> None:
    """Put non-persistent buffers (rotary inv_freq, ...) on their device, recomputing those on meta."""
    rebuilt: dict[int, dict[str, torch.Tensor]] = {}
    for group in groups:
        slot = group.sites[0]
        if group.loaded or slot.is_parameter or group.persistent:
            continue
        tensor = group.original
        if tensor.device.type == "meta":
            fresh = rebuilt.get(id(slot.module))
            if fresh is None:
                fresh = rebuilt[id(slot.module)] = _rebuild_buffers(slot.module, group.names[0])
            if slot.attr not in fresh:
                raise _unrebuildable(group.names[0], "re-running its __init__ did not create it")
            tensor = fresh[slot.attr]
        device = CPU if group.device.kind is DeviceKind.DISK else group.device
        _assign(group, tensor.to(device.torch_device()))


def _rebuild_buffers(module: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Re-run the `__init__` of a parameter-free module built from a config (transformers' rotary
    embeddings) on the CPU, and return its buffers."""
    config = getattr(module, "config", None)
    if config is None or any(True for _ in module.parameters()):
        raise _unrebuildable(name, f"{type(module).__name__} has no config to rebuild it from")
    try:
        with torch.device("cpu"):
            fresh = type(module)(config)
    except Exception as exc:  # any failure of foreign __init__ code means: cannot rebuild
        raise _unrebuildable(name, f"{type(module).__name__}(config) failed: {exc}") from exc
    return dict(fresh.named_buffers(recurse=False))


def _unrebuildable(name: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"buffer {name!r} is on the meta device and no checkpoint holds it ({why}). Build the model with "
        "init_empty_weights(include_buffers=False) so such buffers keep their computed values."
    )


# ---------------------------------------------------------------------------------------------------------
# the entry point


def load_checkpoint_in_model(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | CheckpointIndex,
    device_map: DeviceMapLike | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    offload_state_dict: bool = False,
    offload_buffers: bool = False,
    keep_in_fp32_modules: Sequence[str] | None = None,
    offload_8bit_bnb: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
    *,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    window_bytes: int = 256 * 2**20,
    materialize: bool = False,
    pin_memory: bool | None = None,
    progress: bool | None = None,
    only: Sequence[str] | None = None,
    sources: SourcePlan | None = None,
    inventory: Inventory | None = None,
    quantize: str | Quantization | None = None,
    quantize_skip: Sequence[str] | None = None,
) -> LoadResult:
    """Stream `checkpoint` into `model`, each tensor straight to its device.

    Args:
        model: typically built under `init_empty_weights()`; its parameters are replaced, not copied into.
        checkpoint: a checkpoint file, index or folder (see `open_checkpoint`), or an already open index.
        device_map: transformers' format (`{"model.layers.0": 0, "lm_head": "cpu", "model.layers.9": "disk"}`,
            `""` for the whole model) or a bigload `Plan`; a tensor goes where its longest dotted prefix says.
            None puts everything on the CPU.
        dtype: cast floating-point tensors to this dtype; None casts them to the dtype the model was built
            with. Integer, bool, complex and float8 tensors are never cast (`inventory.DtypeRule`).
        offload_folder: where tensors mapped to "disk" go (a `DiskStore`). A store already there for the same
            checkpoint and dtypes is reused as is.
        offload_state_dict: accepted for accelerate compatibility and ignored: bigload never holds a whole
            state dict in memory, so there is nothing to offload while loading.
        offload_buffers: also send the buffers of disk modules to disk; by default they are loaded into CPU
            memory (the runtime keeps them on the execution device), as accelerate keeps them in memory.
        keep_in_fp32_modules: module names (or name components, e.g. "wo") kept in float32. None:
            transformers' default for the model (its `_keep_in_fp32_modules` at float16,
            `_keep_in_fp32_modules_strict` at float16 and bfloat16), as the planner sizes them; accelerate
            keeps none unless given the list (pass `[]` for that).
        offload_8bit_bnb: accelerate's bitsandbytes 8-bit offload; bigload has none (True raises).
        strict: accelerate's default False: checkpoint tensors the model lacks are skipped with accelerate's
            warning naming them, and model tensors the checkpoint lacks stay on meta with a warning naming
            them (both returned in the LoadResult). True: either is an error, raised before any byte is read.
            Mis-shaped tensors are always an error (accelerate raises for them too).
        full_state_dict, broadcast_from_rank0: accelerate's options for sharded (DTensor) models loaded
            through `torch.distributed.checkpoint`; bigload loads plain tensors and every rank maps the files
            itself, so both are accepted and change nothing.
        special_dtypes: tensor name -> dtype for those tensors, whatever `dtype` says.
        window_bytes: cap on the bytes of temporaries in flight (cast results not yet placed, readahead,
            pinned staging for GPUs).
        materialize: copy CPU tensors into private memory instead of keeping memory-mapped views.
        pin_memory: pin the GPU staging buffers; None pins when the map names a GPU.
        progress: a progress bar over bytes; None shows it for loads over 1 GiB when stderr is a terminal.
        only: load only tensors under these module names (one pipeline stage of a bigger plan); the rest of
            the model is left alone and not reported.
        sources: where model tensors are when the checkpoint names or lays them out differently (renamed
            keys, per-expert tensors of a fused MoE weight); see `SourcePlan`. None: matched by name.
        inventory: the inventory the load was planned with; every tensor is placed in the dtype its entry
            carries. None: built here from the model, `dtype`, `keep_in_fp32_modules`, `special_dtypes` and
            the checkpoint's dtypes, exactly as the planner builds it.
        quantize: "int8", "int4" or "int4:GROUP" (see `bigload.quant`): the model's Linear layers (not the
            output head) become `QuantLinear`s and each weight is quantized as it streams in, one tensor at a
            time; quantized bytes are what goes to each device and to the offload store. A model already
            holding `QuantLinear`s (swapped by `load_checkpoint_and_dispatch` before planning) is loaded
            into as it is. int4 weights are packed in the byte order of the device that runs their block.
        quantize_skip: module names whose Linears stay unquantized.

    Returns:
        LoadResult with the missing/unexpected/mismatched names, the disk store and what went to disk.

    Raises:
        DeviceError: the map names a GPU this machine lacks, or is not a dict (checked before reading).
        CheckpointError: a malformed checkpoint, a strict mismatch, or a meta buffer that cannot be rebuilt.
        OffloadError: the map names disk without `offload_folder`, or the folder belongs to another
            checkpoint, dtype or quantization scheme, or cannot be written.
        QuantizationError: an unknown scheme, or a model it cannot apply to (see `bigload.quant`).

    >>> with init_empty_weights():  # doctest: +SKIP
    ...     model = LlamaForCausalLM(config)
    >>> result = load_checkpoint_in_model(model, "llama/", {"": "cpu"}, dtype=torch.bfloat16)  # doctest: +SKIP
    """
    del offload_state_dict, full_state_dict, broadcast_from_rank0  # see the docstring
    if offload_8bit_bnb:
        raise OffloadError(
            "offload_8bit_bnb=True asks for bitsandbytes 8-bit offload, which bigload does not do; load without it "
            "(weights are offloaded in their dtype), or use accelerate for bitsandbytes models."
        )
    if window_bytes <= 0:
        raise BudgetError(f"window_bytes must be positive, got {window_bytes}.")
    dmap = _resolve_map(device_map)
    check_devices_exist(dmap.values())
    target_dtype = None if dtype is None else parse_dtype(dtype)
    rule = inventory.rule if inventory is not None else DtypeRule.for_model(
        model, target_dtype, special_dtypes, keep_in_fp32_modules)
    if prepare_quantization(model, quantize, quantize_skip, rule=rule) is not None or quantized_linears(model):
        pin_thread_counts()  # before the reader thread quantizes (see `bigload.quant._one_thread`)
    index = checkpoint if isinstance(checkpoint, CheckpointIndex) else open_checkpoint(checkpoint)
    index.check_unchanged()  # an index opened earlier may describe files changed since
    if offload_folder is not None:
        check_offload_folder(offload_folder, index.root)  # before anything is written there
    scope = list(only) if only is not None else [""]
    groups = [group for group in _model_groups(model) if any(_under(name, scope) for name in group.names)]
    if inventory is None:
        inventory = inventory_from_module(
            model, dtype=target_dtype, special_dtypes=special_dtypes, keep_in_fp32_modules=keep_in_fp32_modules,
            stored_dtypes=source_dtypes(index, sources))
    sources = _quantized_sources(model, index, sources, inventory, dmap, getattr(device_map, "execution_devices",
                                                                                 None))
    table = _sources(index, sources)[0]
    _place_groups(groups, dmap, table, inventory, offload_buffers)
    match = _match(index, groups, scope, sources)
    _report(match, index, strict, index.root if isinstance(checkpoint, CheckpointIndex) else checkpoint,
            type(model).__name__)

    disk_tasks = [task for task in match.tasks if task.group.device.kind is DeviceKind.DISK]
    # dtype=None means "the model's dtype": name it, so the same load spelled either way reuses a store.
    rule = inventory.rule
    policy_dtype = rule.dtype or next((g.original.dtype for g in groups if castable(g.original.dtype)), None)
    origin = _store_origin(index, disk_tasks, policy_dtype, rule, _storage_tags(model))
    store, reuse = _prepare_store(offload_folder, origin, disk_tasks)
    gpus = {task.group.device for task in match.tasks if task.group.device.is_gpu}
    stager = _GpuStager(window_bytes, pin_memory is not False, gpus) if gpus else None
    writer = store if isinstance(store, StoreWriter) else None
    placer = _Placer(writer, stager)
    tasks = _with_kinds(match.tasks, reuse, materialize)
    total = sum(task.ref.nbytes for task in tasks)
    with CheckpointReader(index) as reader, _ProgressBar(total, progress) as advance:
        reading = _stream_into(tasks, reader, placer, window_bytes, advance, writer, origin)
    if stager is not None:
        stager.finish()
    _settle_unloaded_buffers(groups)
    return LoadResult(
        missing=match.missing,
        unexpected=match.unexpected,
        mismatched=match.mismatched,
        offloaded=tuple(placer.offloaded),
        store=reading if writer is not None else store,  # type: ignore[arg-type]  # a reused DiskStore
        bytes_read=total,
    )


def _stream_into(tasks: Sequence[_Task], reader: CheckpointReader, placer: _Placer, window: int,
                 advance: Callable[[int], None], writer: StoreWriter | None,
                 origin: StoreOrigin) -> DiskStore | None:
    """Run the load; with a store to write, commit it and return its reader."""
    if writer is None:
        _run(tasks, reader, placer, window, advance)
        return None
    with writer:  # an exception removes what was written, and no index is left behind
        _run(tasks, reader, placer, window, advance)
        return writer.commit(origin)


def _place_groups(groups: list[_Group], dmap: Mapping[str, Device], sources: Mapping[str, Source],
                  inventory: Inventory, offload_buffers: bool) -> None:
    """Find each group's device (its first name's; buffers of disk modules stay in CPU memory unless
    `offload_buffers`) and the dtype the inventory decided for it."""
    for group in groups:
        devices = {_device_of(name, dmap) for name in group.names}
        device = _device_of(group.names[0], dmap)
        if None in devices:
            unmapped = next(name for name in group.names if _device_of(name, dmap) is None)
            raise DeviceError(
                f"the device map places no module containing {unmapped!r}; add an entry for it or a '' entry "
                "for everything else."
            )
        if len(devices) > 1:
            logger.warning("tied tensors %s are mapped to different devices; all are placed on %s",
                           ", ".join(group.names), device)
        buffer = not group.sites[0].is_parameter
        if device is not None and device.kind is DeviceKind.DISK and buffer and not offload_buffers:
            device = CPU
        group.device = device  # type: ignore[assignment]
        decided = next((d for n in group.names if (d := inventory.dtype_of(n)) is not None), None)
        if decided is None:  # an inventory of another model: the same rule, asked here
            stored = next((sources[n].dtype for n in group.names if n in sources), group.original.dtype)
            decided = inventory.rule.dtype_of(group.names[0], stored, group.original.dtype)
        group.dtype = decided


def _prepare_store(folder: str | os.PathLike[str] | None, origin: StoreOrigin,
                   disk_tasks: Sequence[_Task]) -> tuple[DiskStore | StoreWriter | None, bool]:
    """A writer for the disk tensors, or the store that already holds them all (reused: nothing is
    written; the bool says so)."""
    if not disk_tasks:
        return None, False
    if folder is None:
        raise OffloadError(
            Text(f"the device map sends {len(disk_tasks)} tensors (e.g. {disk_tasks[0].group.names[0]!r}) to "
                 "'disk' but no ", setting("offload_folder"), " was given; pass ",
                 Setting("offload_folder= a folder", "--offload-folder DIR, a folder"), " on a disk with room for them.")
        )
    if (Path(folder) / "index.json").is_file():
        existing = DiskStore.open(folder, expect_fingerprint=origin)
        # Another plan of the same load may have sent other tensors to disk: reuse only a store holding all
        # of these, each as it would be written now; rebuild it otherwise.
        if all(_holds(existing, task) for task in disk_tasks):
            logger.info("reusing the offload store in %s (same checkpoint and dtypes)", folder)
            return existing, True
        return StoreWriter(folder, overwrite=True), False
    return StoreWriter(folder), False


def _holds(store: DiskStore, task: _Task) -> bool:
    name = task.group.names[0]
    if name not in store:
        return False
    meta = store.meta(name)
    return meta.dtype == task.group.dtype and meta.shape == tuple(task.group.original.shape)


def _store_origin(index: CheckpointIndex, disk_tasks: Sequence[_Task], dtype: torch.dtype | None,
                  rule: DtypeRule, quantize: str = "") -> StoreOrigin:
    # The stored bytes depend on the checkpoint, on how tensors are cast (the load's dtype policy) and on the
    # quantization scheme, not on which tensors a plan sends to disk: a store of the same load under another
    # plan is rebuilt in place.
    dtypes = sorted({dtype_name(task.group.dtype) for task in disk_tasks})
    policy = dtype_name(dtype) if dtype is not None else "model"
    variant = f"{policy};fp32:{','.join(sorted(rule.keep_in_fp32))}"
    if rule.special:
        variant += ";special:" + ",".join(f"{name}={dtype_name(dtype)}" for name, dtype in rule.special)
    if quantize:
        variant += f";quantize:{quantize}"
    origin = StoreOrigin.of(index, None, variant)
    return StoreOrigin(origin.fingerprint, origin.source, "/".join(dtypes), quantize)


# ---------------------------------------------------------------------------------------------------------
# quantized Linears: their tensors are built from the checkpoint's float weights while streaming


def prepare_quantization(model: nn.Module, quantize: str | Quantization | None,
                         quantize_skip: Sequence[str] | None = None, *, rule: DtypeRule) -> Quantization | None:
    """Read `quantize=`/`quantize_skip=` and swap the model's Linears for `QuantLinear`s (once), keeping
    scales, zeros and biases in the dtype `rule` gives each float weight; Linears the rule keeps in float32
    stay unquantized. Call it before planning, so the inventory sizes quantized bytes;
    `load_checkpoint_in_model` calls it too (a no-op the second time).

    Raises:
        QuantizationError: see `bigload.quant.Quantization.parse` and `choose_linears`.
    """
    quantization = Quantization.parse(quantize, quantize_skip)
    if quantization is not None:
        # Modules kept in float32 are kept so for accuracy (T5's `wo` in float16), and their callers cast
        # activations to their weight's dtype: they stay unquantized.
        kept = tuple(name for name, module in model.named_modules()
                     if isinstance(module, nn.Linear) and rule.keeps_fp32(f"{name}.weight"))
        quantization = Quantization(quantization.scheme, quantization.group_size, quantization.skip + kept)
        quantize_model(model, quantization, lambda name, built: rule.dtype_of(name, built, built))
    return quantization


def _storage_tags(model: nn.Module) -> str:
    return ", ".join(sorted({module.storage_tag for module in quantized_linears(model).values()}))


def _quantized_sources(model: nn.Module, index: CheckpointIndex, sources: SourcePlan | None, inventory: Inventory,
                       dmap: Mapping[str, Device], execution: Mapping[str, Device] | None) -> SourcePlan | None:
    """`sources` plus, for each Linear the inventory says is quantized, its quantized tensors as tensors
    derived from the float weight (found by name, or where `sources` says); each module's int4 byte order
    follows its execution device."""
    owners = dict.fromkeys(inventory.names[entry.module] for entry in inventory.quantized())
    modules = {name: module for name, module in quantized_linears(model).items() if name in owners}
    if not modules:
        return sources
    table: dict[str, Source] = dict(sources.tensors) if sources is not None else {}
    memo = PackMemo()
    for name, module in modules.items():
        module.layout = _layout_for(name, module, _runs_on(name, dmap, execution))
        weight = table.get(f"{name}.weight", index.tensors.get(f"{name}.weight"))
        if weight is None:
            continue  # reported as missing
        shapes = _quantized_shapes_from(module, weight.shape)
        for part, (shape, dtype) in shapes.items():
            table[f"{name}.{part}"] = DerivedTensor(
                f"{name}.{part}", shape, dtype, _parts(weight),
                functools.partial(_build_quantized, memo, weight, part, module),
                how=f"quantize {name}.weight to {module.storage_tag}",
            )
    return SourcePlan(table, sources.ignored if sources is not None else frozenset())


def _quantized_shapes_from(module: QuantLinear, float_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...],
                                                                                            torch.dtype]]:
    """The module's tensors as the checkpoint's weight would make them: a float weight of another shape gives
    other shapes, which the loader reports as mismatched instead of quantizing it."""
    if float_shape == (module.out_features, module.in_features):
        return module.shapes()
    return {part: (tuple(float_shape), dtype) for part, (_, dtype) in module.shapes().items()}


def _build_quantized(memo: PackMemo, weight: Source, part: str, module: QuantLinear,
                     parts: Sequence[torch.Tensor]) -> torch.Tensor:
    key = weight.name
    return memo.tensor(key, part, lambda: weight.build(parts) if isinstance(weight, DerivedTensor) else parts[0],
                       module)


def _runs_on(name: str, dmap: Mapping[str, Device], execution: Mapping[str, Device] | None) -> Device:
    """The device module `name` computes on: the plan's execution device, else a GPU it is placed on, else
    (cpu or disk) the map's first GPU, which dispatch streams such blocks to, else the CPU."""
    if execution:
        device = _device_of(name, {key: Device.parse(value) for key, value in execution.items()})
        if device is not None:
            return device
    placed = _device_of(name, dmap)
    if placed is not None and placed.is_gpu:
        return placed
    return min((device for device in dmap.values() if device.is_gpu), default=CPU)


def _layout_for(name: str, module: QuantLinear, device: Device) -> Layout:
    """The byte order of the module's packed weight: decided here, where the device that runs it is known."""
    if module.scheme is Scheme.INT8:
        return Layout.ANY
    if device.is_gpu:
        check_device(module.quantization, device.torch_device(), f" ({name!r} runs on {device})")
        return Layout.NIBBLES
    return Layout.CPU


class _ProgressBar:
    """Progress over bytes when asked (or for long loads on a terminal); otherwise a no-op callable.

    On a terminal, a tqdm bar. When stderr is not a terminal (a log file, a pipe) a bar's redraws would pile
    up as carriage-return noise, so only one final line is written: bytes and seconds.
    """

    def __init__(self, total: int, progress: bool | None) -> None:
        terminal = sys.stderr.isatty()
        show = progress if progress is not None else total >= _PROGRESS_MIN_BYTES and terminal
        self.bar = None
        self.total = total
        self.final_line = show and not terminal
        self.start = time.perf_counter()
        if show and terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading")

    def __enter__(self) -> Callable[[int], None]:
        return self.bar.update if self.bar is not None else _ignore

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.final_line and exc_type is None:
            seconds = time.perf_counter() - self.start
            sys.stderr.write(f"loading: {format_size(self.total)} in {seconds:.2f} s\n")


def _ignore(_: int) -> None:
    return None
