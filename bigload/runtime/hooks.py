"""Runtime: run a dispatched model block by block, bringing offloaded weights in just in time.

Each top-level block of a device map gets an execution device. A forward pre-hook on the block moves its
inputs there and, when its weights are offloaded (they live on the CPU or on disk but the block runs
elsewhere, or they live on disk), installs them; a forward hook releases them afterwards, so the block's
parameters are meta placeholders again and the memory goes back to a fixed pool.

A prefetcher knows the execution order (the device map's order, confirmed by the first forward) and loads
the next `prefetch` blocks on a background thread while the current one computes:

- CPU execution: a stored tensor that is already a CPU tensor of the right dtype (an mmap'd `DiskStore.get`
  view, or a host tensor) is used in place, with no copy; such blocks are resolved once and handed out on
  every forward, and prefetching them is kernel advice on the background thread (`mincore`, then
  `madvise(MADV_WILLNEED)` for pages not in memory), so the kernel reads a cold page cache while the current
  block computes and no Python code touches pages. Tensors that need a cast go into a reused buffer, loaded
  on the background thread.
- CUDA execution: weights are staged through pinned host buffers (or copied straight from pinned host
  weights) into reused device buffers on a side stream; events order the copies against compute.
- Disk blocks that do not fit in memory (`DiskReads.READ`, decided by the planner from the budget, or by the
  caller): read explicitly into the slot (on the CPU) or its pinned staging buffer (CUDA) by a pool of reader
  threads (`bigload.load.reads`: large `preadv` calls, `O_DIRECT` where the filesystem allows), on the background
  thread, so compute never waits on page faults, the page cache never evicts the block about to run, and a
  file truncated since loading is an `OffloadError` in the caller rather than a SIGBUS.

The prefetcher owns the slots the plan decided (`Plan.slots`: count, size, and whether each has a pinned
host staging buffer, which the plan charged to the CPU budget; `bigload.plan.reserve`); for a
device map with no plan, the same rule gives `1 + prefetch` slots per execution device (more when offloaded
blocks nest), each as large as the largest offloaded block running there. `Runtime.stats()`
reports buffers, bytes held and the order blocks were prefetched in.

Cache objects (`past_key_values`, any `transformers` `Cache`) are never moved between devices: each layer
keeps its part of the KV cache on its own device (moving it made accelerate's multi-GPU generation 5-8x
slower, accelerate issue 1394).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import mmap
import sys
import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bigload.devices import CPU, Device, DeviceKind, DeviceLike, ExecutionPolicy
from bigload.errors import BigloadError, OffloadError, PlanError
from bigload.load import readahead as pages
from bigload.load.reads import READ_TIMEOUT_S, BlockLayout, BlockReader, layout
from bigload.plan.reserve import (
    DiskReads,
    SlotSpec,
    aligned,
    pinned_bytes,
    read_slot_bytes,
    slot_alignment,
    slot_bytes,
    slot_count,
)
from bigload.tensors import Site, owner_of, summarize_names, tensor_groups
from bigload.sizes import dtype_width

__all__ = [
    "DEFAULT_SKIP_KEYS",
    "ExecutionPolicy",
    "HostWeights",
    "OutputAlignment",
    "PrefetchStats",
    "Runtime",
    "WeightSource",
    "adopt",
    "attach",
    "check_merges",
    "detach",
    "execution_device_for",
    "runtime_of",
    "send_to_device",
]

logger = logging.getLogger(__name__)

# Keyword arguments that carry a KV cache in transformers' models: `cache` since transformers 5.24,
# `past_key_values` / `past_key_value` before. `cache_position` is a plain tensor input and must move like
# any other.
DEFAULT_SKIP_KEYS: tuple[str, ...] = ("cache", "past_key_values", "past_key_value", "layer_past", "cache_params")

_RUNTIME_ATTR = "_bigload_runtime"
PREFETCH_HISTORY = 4096  # how many prefetched block names `PrefetchStats.prefetched` remembers


def _is_cache(value: object) -> bool:
    """A transformers `Cache` (KV cache): never moved. Only looked up when transformers is already loaded,
    since no object can be one otherwise, so importing bigload does not import transformers."""
    module = sys.modules.get("transformers.cache_utils")
    return module is not None and isinstance(value, module.Cache)


# --------------------------------------------------------------------------------------------------
# Moving inputs and outputs


def send_to_device(value: Any, device: torch.device, *, skip_keys: Iterable[str] = ()) -> Any:
    """Move every tensor inside `value` (nested tuples, lists, dicts, ModelOutputs) to `device`.

    Cache objects and the entries of mappings named in `skip_keys` are returned untouched, so a KV cache
    never leaves the device of its layer.
    """
    skip = frozenset(skip_keys)
    return _send(value, device, skip)


# Device types a copy may be queued toward without waiting: the copy is ordered on the target's stream before
# any kernel that reads it. A copy toward the CPU must wait: the CPU reads its result as soon as `to` returns,
# and a queued GPU-to-CPU copy has not landed yet (uninitialised memory, no error).
_ASYNC_COPY_TARGETS = frozenset({"cuda"})


def _send(value: Any, device: torch.device, skip: frozenset[str]) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        return value.to(device, non_blocking=device.type in _ASYNC_COPY_TARGETS)
    if _is_cache(value):
        return value
    if isinstance(value, Mapping):
        moved = {key: (item if key in skip else _send(item, device, skip)) for key, item in value.items()}
        if all(moved[key] is item for key, item in value.items()):
            return value
        # ModelOutput and other Mapping types rebuild from a dict, as accelerate's send_to_device does.
        return moved if type(value) is dict else type(value)(moved)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_send(item, device, skip) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_send(item, device, skip) for item in value)
    return value


def _first_tensor_device(args: Sequence[Any], kwargs: Mapping[str, Any], skip: frozenset[str]) -> torch.device | None:
    stack: list[Any] = [*args, *(v for k, v in kwargs.items() if k not in skip)]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            return item.device
        if _is_cache(item):
            continue
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None


# --------------------------------------------------------------------------------------------------
# Where blocks run


_PLACED_TO_EXECUTION: dict[tuple[DeviceKind, ExecutionPolicy], Callable[[Device, Device], Device]] = {
    (DeviceKind.GPU, ExecutionPolicy.STREAM): lambda placed, main: placed,
    (DeviceKind.GPU, ExecutionPolicy.LOCAL): lambda placed, main: placed,
    (DeviceKind.CPU, ExecutionPolicy.STREAM): lambda placed, main: main,
    (DeviceKind.CPU, ExecutionPolicy.LOCAL): lambda placed, main: CPU,
    (DeviceKind.DISK, ExecutionPolicy.STREAM): lambda placed, main: main,
    # The policy is about CPU-resident blocks: disk weights must be read anyway and run on the main device.
    (DeviceKind.DISK, ExecutionPolicy.LOCAL): lambda placed, main: main,
}


def execution_device_for(placed: DeviceLike, *, main_device: DeviceLike, policy: ExecutionPolicy) -> Device:
    """The device a block runs on, given where its weights are placed.

    Args:
        placed: the block's value in the device map (GPU index, "cpu" or "disk").
        main_device: the GPU offloaded blocks run on (`CPU` when the machine has none).
        policy: what to do with CPU- and disk-resident blocks when `main_device` is a GPU.

    Returns:
        A GPU or `CPU`, never disk.

    >>> execution_device_for("cpu", main_device=0, policy=ExecutionPolicy.LOCAL)
    Device(kind=<DeviceKind.CPU: 1>, index=0)
    """
    placed_device, main = Device.parse(placed), Device.parse(main_device)
    if main.kind is DeviceKind.DISK:
        raise PlanError("the main execution device cannot be 'disk'; use a GPU index or 'cpu'.")
    return _PLACED_TO_EXECUTION[(placed_device.kind, policy)](placed_device, main)


# --------------------------------------------------------------------------------------------------
# Where offloaded weights come from


@runtime_checkable
class WeightSource(Protocol):
    """Somewhere offloaded tensors are kept: `DiskStore` (disk) or `HostWeights` (CPU RAM).

    `get` returns a CPU tensor in the stored dtype and shape; a zero-copy view (mmap'd file, host tensor)
    where possible. It may be called from the prefetch thread. `rewrite` replaces a tensor's value (an
    adapter merged into it), between forwards.
    """

    def __contains__(self, name: object) -> bool: ...

    def get(self, name: str) -> torch.Tensor: ...

    def rewrite(self, name: str, tensor: torch.Tensor, *, change: str) -> None: ...


class HostWeights:
    """Offloaded tensors kept in CPU RAM, by full tensor name, as they are (pinned only with `pin=True`).

    A GPU reads them through the runtime's pinned staging buffers; `pin=True` pins each tensor instead
    (a private, unswappable copy, rounded up by the pinned-memory allocator), so copies skip the staging.

    >>> weights = HostWeights({"fc.weight": torch.ones(2, 2)})
    >>> weights.get("fc.weight").sum().item()
    4.0
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None, *, pin: bool = False) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self.pin = pin
        for name, tensor in (tensors or {}).items():
            self.put(name, tensor)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Keep `tensor` (detached, on the CPU; pinned if this store pins)."""
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")
        if self.pin and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        self._tensors[name] = tensor

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def rewrite(self, name: str, tensor: torch.Tensor, *, change: str) -> None:
        """Replace `name` (e.g. with weights an adapter was merged into); `change` is for the disk store's
        fingerprint and needs no record in memory."""
        if name not in self._tensors:
            raise OffloadError(f"tensor {name!r} is not among the host-offloaded weights.")
        self.put(name, tensor)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise OffloadError(f"tensor {name!r} is not among the host-offloaded weights.") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


# --------------------------------------------------------------------------------------------------
# Blocks and the tensors they materialize


@dataclass(frozen=True)
class _Entry:
    """One offloaded tensor of a block: where it comes from, where it goes in the slot, where it is used."""

    key: str  # its name in the weight source (tied tensors: whichever alias the source holds)
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # byte offset in the block's slot
    sites: tuple[Site, ...]
    placeholder: torch.Tensor  # the meta tensor put back when the block is released
    source: WeightSource

    @functools.cached_property
    def nbytes(self) -> int:
        # Cached: the prefetcher asks for it on every load, and the answer never changes.
        return _nbytes(self.shape, self.dtype)

    @functools.cached_property
    def _registration(self) -> tuple[bool, bool]:
        # Cached: a placeholder answers attribute reads through Python (`OffloadedParameter`), every forward.
        return isinstance(self.placeholder, nn.Parameter), bool(self.placeholder.requires_grad)

    def registered(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as this entry's sites hold it: a Parameter (same requires_grad) or a buffer."""
        is_parameter, requires_grad = self._registration
        return nn.Parameter(tensor, requires_grad) if is_parameter else tensor


@dataclass(frozen=True)
class Block:
    """A top-level block of the device map as the runtime sees it."""

    name: str
    placed: Device
    execution_device: torch.device
    entries: tuple[_Entry, ...] = ()

    @property
    def offloaded(self) -> bool:
        return bool(self.entries)

    @property
    def nbytes(self) -> int:
        """Bytes its offloaded tensors take on the execution device (tied tensors once)."""
        return sum(entry.nbytes for entry in self.entries)

    @property
    def slot_bytes(self) -> int:
        """Bytes of a slot holding it: its tensors at aligned offsets (`reserve.slot_bytes`)."""
        return slot_bytes((entry.nbytes for entry in self.entries), _alignment(self.execution_device))


def _alignment(device: torch.device) -> int:
    return slot_alignment(device.type == "cuda")


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype_width(dtype)



@dataclass(frozen=True)
class PrefetchStats:
    """What the prefetcher holds, for checking it against the planned reserve.

    buffers / buffer_bytes: slot buffers allocated on the execution devices, and their bytes (0 on the CPU
        when stored tensors are used in place); never more than `reserve_bytes`;
    staging_bytes: pinned host memory the CUDA copies go through (one buffer per slot, the slot's size), as
        torch's pinned allocator takes it (`reserve.pinned_bytes`); equal to the plan's
        `slots.staging_bytes`, the cpu's reserve;
    reserve_bytes: what the slots may hold on the execution devices (slots x largest offloaded block);
    resident_buffer_bytes: buffers of offloaded blocks kept on their execution device for good (not
        offloaded, so not in slots); with `reserve_bytes`, the planned reserve;
    bytes_held / peak_bytes_held: bytes of weights the prefetcher keeps ready or in use, now and at most;
    prefetched: blocks loaded ahead on the background thread, in the order they were started (the last
        `PREFETCH_HISTORY`);
    sync_loads: blocks that had to be loaded on the caller's thread (not prefetched in time or evicted);
    bytes_loaded: bytes of offloaded weights brought in since attach (read from disk or host memory);
    order: the execution order the prefetcher follows;
    disk_reads: how disk blocks are brought in ("mapped" or "read", see `reserve.DiskReads`);
    paths: per offloaded block loaded so far, the path it takes: "read (O_DIRECT)", "read (buffered)",
        "mapped (in place)" or "copy" (cast or staged into a slot);
    buffered_files: files read explicitly but through the page cache, because their filesystem refused
        `O_DIRECT` (tmpfs, some network filesystems).
    """

    buffers: int
    buffer_bytes: int
    staging_bytes: int
    reserve_bytes: int
    resident_buffer_bytes: int
    bytes_held: int
    peak_bytes_held: int
    prefetched: tuple[str, ...]
    sync_loads: int
    bytes_loaded: int
    order: tuple[str, ...]
    disk_reads: str = DiskReads.MAPPED.value
    paths: Mapping[str, str] = field(default_factory=dict)
    buffered_files: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# Slots and loading


class _Slot:
    """Room for one block's weights on one execution device, reused for the runtime's whole life.

    Buffers are made outside inference mode even when the first forward runs under `torch.inference_mode()`:
    the prefetch thread writes into them and later forwards (under `no_grad`, or with grad) wrap views of them
    in Parameters, and a tensor created in inference mode allows neither. Events are blocking: waiting on
    one sleeps instead of spinning a core that CPU-executed blocks compute on.
    """

    def __init__(self, device: torch.device, nbytes: int, staged: bool = False) -> None:
        self.device = device
        self.nbytes = nbytes
        self.staged = staged  # has a pinned host staging buffer (`SlotSpec.staged`)
        self.buffer: torch.Tensor | None = None  # on `device`, allocated once (CUDA: at attach)
        self.staging: torch.Tensor | None = None  # pinned host bytes for CUDA copies
        is_cuda = device.type == "cuda"
        # Copies into this slot are done / compute reading this slot is done.
        self.loaded = torch.cuda.Event(blocking=True) if is_cuda else None
        self.released = torch.cuda.Event(blocking=True) if is_cuda else None

    def view(self, buffer: torch.Tensor, entry: _Entry) -> torch.Tensor:
        raw = buffer[entry.offset : entry.offset + entry.nbytes]
        return raw.view(entry.dtype).view(entry.shape)

    def device_buffer(self) -> torch.Tensor:
        if self.buffer is None:
            with torch.inference_mode(False):
                if self.device.type == "cpu":
                    # Page-aligned (an anonymous mapping), so explicit reads can go straight in with O_DIRECT.
                    self.buffer = torch.frombuffer(mmap.mmap(-1, max(1, self.nbytes)),
                                                   dtype=torch.uint8)[: self.nbytes]
                else:
                    self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        return self.buffer

    def staging_buffer(self) -> torch.Tensor:
        if self.staging is None:
            if not self.staged:
                raise OffloadError(f"a slot on {self.device} has no staging buffer (the plan did not stage its "
                                   "slots); attach with the plan made for this machine.")
            with torch.inference_mode(False):
                self.staging = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
        return self.staging


def _advise_willneed(tensors: Iterable[torch.Tensor]) -> None:
    """Ask the kernel to start reading these CPU tensors' pages now, in the background.

    The kernel does the I/O: no Python code touches pages, so nothing competes with compute for the GIL. A
    `mincore` check first skips tensors whose pages are all in memory already (the usual, warm case), since
    `madvise` walks the page cache page by page and costs several times more. A no-op where the calls do
    not exist (Windows): pages then fault in on first use.
    """
    for tensor in tensors:
        length = tensor.numel() * tensor.element_size()
        if length == 0 or tensor.device.type != "cpu" or pages.resident(tensor.data_ptr(), length):
            continue
        pages.advise(tensor.data_ptr(), length)


def _advised(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    _advise_willneed(views.values())
    return views


def _usable_in_place(source_tensor: torch.Tensor, entry: _Entry, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and source_tensor.device.type == "cpu"
        and source_tensor.dtype == entry.dtype
        and source_tensor.is_contiguous()
        and source_tensor.numel() * source_tensor.element_size() == entry.nbytes
    )


def _stable_views(block: Block) -> dict[str, torch.Tensor] | None:
    """The block's tensors, used where they are stored, if its source hands back the same memory every time.

    True of mmap'd store views and host tensors: the block then needs no slot buffer and no copy (its slot
    is still taken, so bytes held match the planned reserve); its tensors are kept and handed out on every
    forward (they stay file-backed or host memory the caller already owns). A source that casts on `get`
    returns new memory each time and is loaded into a slot buffer.
    """
    if block.execution_device.type != "cpu":
        return None
    views: dict[str, torch.Tensor] = {}
    for entry in block.entries:
        first, again = entry.source.get(entry.key), entry.source.get(entry.key)
        if not (_usable_in_place(first, entry, block.execution_device) and first.data_ptr() == again.data_ptr()):
            return None
        views[entry.key] = first.view(entry.shape)
    return views


def _load_cpu(block: Block, slot: _Slot) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = {}
    for entry in block.entries:
        stored = entry.source.get(entry.key)
        if _usable_in_place(stored, entry, slot.device):
            _advise_willneed((stored,))
            loaded[entry.key] = stored.view(entry.shape)
        else:
            target = slot.view(slot.device_buffer(), entry)
            target.copy_(stored.reshape(entry.shape))
            loaded[entry.key] = target
    return loaded


def _load_cuda(block: Block, slot: _Slot, stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
    assert slot.loaded is not None and slot.released is not None
    device_buffer = slot.device_buffer()
    # The previous host-to-device copy out of this slot's staging buffer must be over before we overwrite it.
    slot.loaded.synchronize()
    loaded: dict[str, torch.Tensor] = {}
    with torch.cuda.stream(stream):
        # Compute that read the slot's previous block must be over before we overwrite the device buffer.
        stream.wait_event(slot.released)
        for entry in block.entries:
            stored = entry.source.get(entry.key).reshape(entry.shape)
            target = slot.view(device_buffer, entry)
            if stored.is_pinned() and stored.dtype == entry.dtype:
                target.copy_(stored, non_blocking=True)
            else:
                staged = slot.view(slot.staging_buffer(), entry)
                staged.copy_(stored)  # the disk read (and any cast) happens here, on this thread
                target.copy_(staged, non_blocking=True)
            loaded[entry.key] = target
        slot.loaded.record(stream)
    return loaded


def _read_layout(block: Block, slot_size: int) -> BlockLayout | None:
    """The block's explicit-read layout, when every tensor's source says where its bytes lie as used."""
    extents = []
    for entry in block.entries:
        locate = getattr(entry.source, "locate", None)
        extent = locate(entry.key) if locate is not None else None
        if extent is None or extent.nbytes != entry.nbytes:
            return None
        extents.append(extent)
    widths = [dtype_width(entry.dtype) for entry in block.entries]
    return layout(extents, widths, [entry.offset for entry in block.entries], slot_size)


def _views_at(block: Block, buffer: torch.Tensor, plan: BlockLayout) -> dict[str, torch.Tensor]:
    return {entry.key: buffer[at: at + entry.nbytes].view(entry.dtype).view(entry.shape)
            for entry, at in zip(block.entries, plan.offsets)}


def _slot_specs(blocks: Sequence[Block], prefetch: int, planned: SlotSpec | None,
                reads: DiskReads) -> dict[torch.device, SlotSpec]:
    """Slots per execution device: the plan's (one device runs every offloaded block of a plan: count, size,
    staging), else `reserve.slot_count` over the blocks running there, sized by `reserve.slot_bytes` (plus
    `reserve.read_slot_bytes`' slack with explicit reads), staged on CUDA. A slot is never smaller
    than the largest block it must hold (a plan made for other dtypes, or `offload_buffers=True`, which the
    plan does not know), and CUDA slots are always staged (copies need the pinned buffer): both with a
    warning, since the pinned memory then exceeds what the plan charged."""
    by_device: dict[torch.device, list[Block]] = {}
    for block in blocks:
        by_device.setdefault(block.execution_device, []).append(block)
    specs = {}
    for device, group in by_device.items():
        largest = max(block.slot_bytes for block in group)
        if planned is not None and planned.count and len(by_device) == 1:
            if largest > planned.nbytes:
                logger.warning("offloaded block of %d bytes exceeds the plan's slot of %d bytes; slots grow to "
                               "fit it", largest, planned.nbytes)
            if device.type == "cuda" and not planned.staged:
                logger.warning("the plan keeps no pinned staging for slots on %s (planned for another main "
                               "device); staging them anyway, uncharged", device)
            specs[device] = SlotSpec(planned.count, max(planned.nbytes, largest), reads,
                                     staged=planned.staged or device.type == "cuda")
        else:
            specs[device] = SlotSpec(slot_count([block.name for block in group], prefetch),
                                     read_slot_bytes(largest, reads), reads, staged=device.type == "cuda")
    return specs


class _Ticket:
    """A block being loaded or ready in a slot."""

    def __init__(self, block: Block, slot: _Slot, future: Future[dict[str, torch.Tensor]]) -> None:
        self.block = block
        self.slot = slot
        self.future = future


class _Prefetcher:
    """Loads offloaded blocks into a fixed set of slots, ahead of execution, on one background thread.

    Call order, all on the caller's thread: `acquire(block)` in the block's pre-hook (returns its tensors,
    ready to use), `release(block)` in its post-hook. Each call tops the pipeline up: the next `prefetch`
    blocks in execution order (wrapping around to the next forward) are loaded while the current one runs.
    """

    def __init__(self, blocks: Sequence[Block], prefetch: int, slots: SlotSpec | None = None,
                 resident_buffer_bytes: int = 0, reads: DiskReads = DiskReads.MAPPED) -> None:
        self.prefetch = prefetch
        self.resident_buffer_bytes = resident_buffer_bytes
        self.reads = reads
        self.order: list[str] = [block.name for block in blocks]
        self.blocks = {block.name: block for block in blocks}
        self.free: dict[torch.device, list[_Slot]] = {
            device: [_Slot(device, spec.nbytes, spec.staged) for _ in range(spec.count)]
            for device, spec in _slot_specs(blocks, prefetch, slots, reads).items()
        }
        self.all_slots = [slot for slots in self.free.values() for slot in slots]
        self.streams = {device: torch.cuda.Stream(device) for device in self.free if device.type == "cuda"}
        self._allocate_cuda_slots()
        self.tickets: dict[str, _Ticket] = {}  # scheduled or in use
        self.in_use: list[str] = []
        self.bytes_held = 0
        self.peak_bytes_held = 0
        self.prefetched: deque[str] = deque(maxlen=PREFETCH_HISTORY)
        self.bytes_loaded = 0
        self.sync_loads = 0
        self._views: dict[str, dict[str, torch.Tensor] | None] = {}  # per block, computed on its first load
        self._layouts: dict[str, BlockLayout | None] = {}  # per block, with explicit reads: how it is read
        self.paths: dict[str, str] = {}  # per block loaded so far: the path it takes (stats)
        self._reader: BlockReader | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _allocate_cuda_slots(self) -> None:
        """Device and staging buffers of CUDA slots, now, on the caller's thread and stream.

        The caching allocator may hand the side stream memory that kernels queued on the caller's stream
        still read (tensors freed just before attach); `wait_stream` orders every later copy into a slot
        after them, which waiting on a never-recorded `released` event would not.
        """
        for device, stream in self.streams.items():
            for slot in self.free[device]:
                slot.device_buffer()
                if slot.staged:
                    slot.staging_buffer()
            stream.wait_stream(torch.cuda.current_stream(device))

    # -- public, caller's thread

    def acquire(self, name: str) -> dict[str, torch.Tensor]:
        ticket = self.tickets.get(name)
        if ticket is None:
            ticket = self._start(name, background=False)
            self.sync_loads += 1
        if ticket is None:
            raise OffloadError(
                f"no free slot to load block {name!r}: more offloaded blocks are running at once than the "
                f"runtime planned for ({len(self.in_use)} in use: {self.in_use}). Put nested blocks on one "
                "device-map entry."
            )
        try:
            tensors = ticket.future.result(timeout=READ_TIMEOUT_S)
        except FutureTimeout:
            self._drop(ticket)
            raise OffloadError(
                f"loading the offloaded weights of block {name!r} did not finish in {READ_TIMEOUT_S:.0f} s; check "
                "the disk holding the offload folder (or the checkpoint it points into).") from None
        except Exception as error:
            self._drop(ticket)
            raise OffloadError(
                f"loading the offloaded weights of block {name!r} onto {ticket.block.execution_device} failed: "
                f"{error}. Check the offload store (folder, disk space, file permissions) and reload."
            ) from error
        if ticket.slot.loaded is not None:
            torch.cuda.current_stream(ticket.slot.device).wait_event(ticket.slot.loaded)
        self.in_use.append(name)
        self._top_up(name)
        return tensors

    def release(self, name: str) -> None:
        ticket = self.tickets.get(name)
        if ticket is None or name not in self.in_use:
            return
        self.in_use.remove(name)
        if ticket.slot.released is not None:
            ticket.slot.released.record(torch.cuda.current_stream(ticket.slot.device))
        self._drop(ticket)
        # The slot just freed goes to the block after the one that runs next: between two blocks, the next one
        # counts as running. With explicit reads its read then starts while the next block's last pieces are
        # still being read, instead of after them (the disk never waits for the next acquire).
        self._top_up(name, ahead=self.prefetch + 1)

    def reorder(self, observed: Sequence[str]) -> None:
        """Follow the order blocks really ran in (first forward), keeping unseen blocks in planned order."""
        seen = [name for name in dict.fromkeys(observed) if name in self.blocks]
        new_order = seen + [name for name in self.order if name not in seen]
        if new_order != self.order:
            logger.info("bigload: execution order differs from the device map; prefetching in %s", new_order)
            self.order = new_order

    def stats(self) -> PrefetchStats:
        allocated = [slot.buffer for slot in self.all_slots if slot.buffer is not None]
        staging = [slot.staging for slot in self.all_slots if slot.staging is not None]
        return PrefetchStats(
            buffers=len(allocated),
            buffer_bytes=sum(buf.numel() for buf in allocated),
            staging_bytes=sum(pinned_bytes(buf.numel()) for buf in staging),
            reserve_bytes=sum(slot.nbytes for slot in self.all_slots),
            resident_buffer_bytes=self.resident_buffer_bytes,
            bytes_held=self.bytes_held,
            peak_bytes_held=self.peak_bytes_held,
            prefetched=tuple(self.prefetched),
            sync_loads=self.sync_loads,
            bytes_loaded=self.bytes_loaded,
            order=tuple(self.order),
            disk_reads=self.reads.value,
            paths=dict(self.paths),
            buffered_files=tuple(str(path) for path in self._reader.buffered_files) if self._reader else (),
        )

    def forget(self, name: str) -> None:
        """Drop what is loaded or cached for block `name` (its stored tensors changed); it loads afresh."""
        ticket = self.tickets.get(name)
        if ticket is not None and name not in self.in_use:
            self._wait_quietly(ticket)
            self._drop(ticket)
        self._views.pop(name, None)
        layout = self._layouts.pop(name, None)  # its tensors may now lie in other files (`DiskStore.rewrite`)
        if layout is not None and self._reader is not None:
            self._reader.reopen(run.path for run in layout.runs)
        block = self.blocks.get(name)
        if block is not None and self._reader is not None:
            locate = [getattr(entry.source, "locate", None) for entry in block.entries]
            paths = []
            for entry, find in zip(block.entries, locate):
                try:
                    extent = find(entry.key) if find is not None else None
                except Exception:  # surfaced when the block is next read
                    extent = None
                if extent is not None:
                    paths.append(extent.path)
            self._reader.reopen(paths)

    def close(self) -> None:
        for ticket in list(self.tickets.values()):
            self._wait_quietly(ticket)
        self.tickets.clear()
        self.in_use.clear()
        self.bytes_held = 0
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        # A prefetch copy may still be in flight on a side stream: its buffers are freed only after it lands.
        for stream in self.streams.values():
            stream.synchronize()
        for slot in self.all_slots:
            slot.buffer = slot.staging = None

    # -- internals

    def _top_up(self, current: str, ahead: int | None = None) -> None:
        """Start loading the `ahead` (default `prefetch`) blocks after `current` in order, as slots allow."""
        if self.prefetch == 0 or current not in self.order:
            return
        start = self.order.index(current)
        for step in range(1, min(self.prefetch if ahead is None else ahead, len(self.order) - 1) + 1):
            name = self.order[(start + step) % len(self.order)]
            if name in self.tickets:
                continue
            if self._start(name, background=True) is None:
                return  # keep the order: never skip a block that has no slot yet
            self.prefetched.append(name)

    def stable(self, name: str) -> bool:
        """Whether block `name` hands out the same tensors on every forward (used in place on the CPU)."""
        return self._views.get(name) is not None

    def _start(self, name: str, *, background: bool) -> _Ticket | None:
        # Views resolved and buffers filled here are kept across forwards: never make them inference tensors.
        with torch.inference_mode(False):
            return self._start_ticket(name, background=background)

    def _start_ticket(self, name: str, *, background: bool) -> _Ticket | None:
        block = self.blocks[name]
        slot = self._free_slot(block.execution_device, evict=not background)
        if slot is None:
            return None
        future: Future[dict[str, torch.Tensor]] = Future()
        try:
            plan = self._layout(block)
            views = None if plan is not None else self._stable(block)
        except Exception as error:  # surfaced by acquire, which names the block
            future.set_exception(error)
        else:
            if plan is not None:
                future = self._start_read(block, slot, plan, background)
            elif views is not None:
                # Nothing to copy: prefetching is asking the kernel to read the pages while the current block
                # runs. On the thread, since `madvise` blocks while it queues the reads of a cold block.
                future = self._run(functools.partial(_advised, views), background)
            else:
                future = self._run(functools.partial(self._load, block, slot), background)
        ticket = _Ticket(block, slot, future)
        self.tickets[name] = ticket
        self.bytes_held += block.nbytes
        self.bytes_loaded += block.nbytes
        self.peak_bytes_held = max(self.peak_bytes_held, self.bytes_held)
        return ticket

    def _stable(self, block: Block) -> dict[str, torch.Tensor] | None:
        if block.name not in self._views:
            self._views[block.name] = _stable_views(block)
            self.paths[block.name] = "mapped (in place)" if self._views[block.name] is not None else "copy"
        return self._views[block.name]

    def _layout(self, block: Block) -> BlockLayout | None:
        """How block is read explicitly (`DiskReads.READ`, a disk block whose tensors lie in files as they are
        used), or None: it takes the mapped or copy path."""
        if block.name not in self._layouts:
            self._layouts[block.name] = None
            if self.reads is DiskReads.READ and block.placed.kind is DeviceKind.DISK:
                slot_size = next(slot.nbytes for slot in self.all_slots if slot.device == block.execution_device)
                self._layouts[block.name] = _read_layout(block, slot_size)
            if self._layouts[block.name] is not None:
                direct = self._layouts[block.name].direct  # type: ignore[union-attr]
                self.paths[block.name] = "read (O_DIRECT)" if direct else "read (buffered)"
        return self._layouts[block.name]

    def _run(self, load: Callable[[], dict[str, torch.Tensor]], background: bool) -> Future[dict[str, torch.Tensor]]:
        """`load` on the background thread, or now on the caller's thread (its error kept in the future)."""
        if background:
            return self._pool().submit(load)
        future: Future[dict[str, torch.Tensor]] = Future()
        try:
            future.set_result(load())
        except Exception as error:  # surfaced by acquire with its cause
            future.set_exception(error)
        return future

    def _start_read(self, block: Block, slot: _Slot, plan: BlockLayout,
                    background: bool) -> Future[dict[str, torch.Tensor]]:
        """Explicit reads. Into a CPU slot, queued straight on the reader threads, so the reads of the next
        blocks can be in flight at once (`BlockReader.start`); for a GPU, through the slot's pinned staging
        buffer, on the prefetch thread (`_read_staged`)."""
        if slot.device.type != "cpu":
            return self._run(functools.partial(self._read_staged, block, slot, plan), background)
        buffer = slot.device_buffer()
        views = _views_at(block, buffer, plan)  # on this thread, outside inference mode (see `_start`)
        read = self._block_reader().start(plan, buffer, what=f"block {block.name!r}")
        done: Future[dict[str, torch.Tensor]] = Future()

        def finish(landed: Future[None]) -> None:
            error = landed.exception()
            if error is None:
                done.set_result(views)
            else:
                done.set_exception(error)

        if not background:
            try:
                read.wait()  # bounded: a read that does not finish in time is an OffloadError
            except OffloadError as error:
                done.set_exception(error)
                return done
        read.future.add_done_callback(finish)
        return done

    def _read_staged(self, block: Block, slot: _Slot, plan: BlockLayout) -> dict[str, torch.Tensor]:
        reader = self._block_reader()
        assert slot.loaded is not None and slot.released is not None
        slot.loaded.synchronize()  # the previous copy out of the staging buffer is over
        staging = slot.staging_buffer()
        reader.read(plan, staging, what=f"block {block.name!r}")
        device_buffer = slot.device_buffer()
        stream = self.streams[slot.device]
        with torch.cuda.stream(stream):
            stream.wait_event(slot.released)  # compute reading the slot's previous block is over
            device_buffer[: plan.nbytes].copy_(staging[: plan.nbytes], non_blocking=True)
            slot.loaded.record(stream)
        return _views_at(block, device_buffer, plan)

    def _block_reader(self) -> BlockReader:
        with self._lock:
            if self._reader is None:
                self._reader = BlockReader()
            return self._reader

    def _free_slot(self, device: torch.device, *, evict: bool) -> _Slot | None:
        free = self.free[device]
        if free:
            return free.pop()
        if not evict:
            return None
        # A block ran out of the expected order: give up the prefetched block needed furthest in the future.
        waiting = [t for n, t in self.tickets.items() if n not in self.in_use and t.slot.device == device]
        if not waiting:
            return None
        victim = max(waiting, key=lambda t: self.order.index(t.block.name))
        self._wait_quietly(victim)
        self._drop(victim)
        return free.pop()

    def _drop(self, ticket: _Ticket) -> None:
        if self.tickets.get(ticket.block.name) is ticket:
            del self.tickets[ticket.block.name]
            self.bytes_held -= ticket.block.nbytes
            self.free[ticket.slot.device].append(ticket.slot)

    @staticmethod
    def _wait_quietly(ticket: _Ticket) -> None:
        # Used before reusing or freeing a slot: the load must be over; its error, if any, is reported
        # when (and if) the block is acquired again.
        try:
            ticket.future.result()
        except Exception:
            logger.debug("bigload: discarded failed prefetch of %s", ticket.block.name, exc_info=True)

    def _load(self, block: Block, slot: _Slot) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            if slot.device.type == "cuda":
                return _load_cuda(block, slot, self.streams[slot.device])
            return _load_cpu(block, slot)

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigload-prefetch")
            return self._executor


# --------------------------------------------------------------------------------------------------
# The runtime attached to a model


@dataclass
class Runtime:
    """Hooks, blocks and prefetcher attached to one model. Get it with `runtime_of(model)`."""

    model: nn.Module
    blocks: dict[str, Block]
    skip_keys: frozenset[str]
    prefetcher: _Prefetcher
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
    _offloaded_sites: dict[tuple[int, str], tuple[str, _Entry]] = field(default_factory=dict)
    _placeholders: set[int] = field(default_factory=set)
    # The model's modules: a registration elsewhere (transformers slicing a ModuleList per forward) is not ours.
    _members: "weakref.WeakSet[nn.Module]" = field(default_factory=weakref.WeakSet)
    # peft layers wrapping an offloaded weight, and which of their adapters that weight's stored bytes hold.
    _adapter_layers: list[nn.Module] = field(default_factory=list)
    _merged: dict[int, tuple[str, ...]] = field(default_factory=dict)
    _merging: set[int] = field(default_factory=set)  # layers inside a merge/unmerge (peft re-enters them)

    def stats(self) -> PrefetchStats:
        """Counters of the prefetcher: buffers, bytes held, reserve, blocks prefetched in order."""
        return self.prefetcher.stats()

    @property
    def execution_order(self) -> tuple[str, ...]:
        return tuple(self.prefetcher.order)

    # -- hooks

    def _pre_forward(self, block: Block, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.changed:  # also here: a caller may run the model's forward without its root's hooks
            self._settle()
        if block.offloaded:
            self._install(block, self.prefetcher.acquire(block.name))
            self._observe(block.name)
        moved_args = _send(args, block.execution_device, self.skip_keys)
        moved_kwargs = _send(kwargs, block.execution_device, self.skip_keys)
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
        self._input_devices.append(_first_tensor_device(args, kwargs, self.skip_keys))

    def _settle(self) -> None:
        """Before running after the model changed: take back placement from another runtime's hooks (peft's
        re-dispatch), adopt added tensors."""
        take_back_placement(self)
        adopt(self)

    def _root_post_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        device = self._input_devices.pop() if self._input_devices else None
        if not self._input_devices:
            self._confirm_order()
            self.forwards += 1
        if device is None:
            return output
        return _send(output, device, self.skip_keys)

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


def _like(placeholder: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` registered the way `placeholder` was: as a Parameter (same requires_grad) or a buffer."""
    if isinstance(placeholder, nn.Parameter):
        return nn.Parameter(tensor, placeholder.requires_grad)
    return tensor


class OutputAlignment:
    """Returns a module's outputs on the device its inputs came from, while `io_same_device` is set.

    The root of an attached model always does this. A submodule that callers run on its own, such as the
    encoder of an encoder-decoder (transformers' `generate` calls it directly), can get the same with one of
    these. Its hooks run outside the module's own (the pre-hook first, the post-hook last), so the input
    device recorded is the caller's, before any block hook moves the inputs.

    >>> alignment = OutputAlignment(encoder, io_same_device=True)  # doctest: +SKIP
    >>> alignment.remove()  # doctest: +SKIP
    """

    def __init__(self, module: nn.Module, *, io_same_device: bool = False,
                 skip_keys: Iterable[str] = DEFAULT_SKIP_KEYS) -> None:
        self.io_same_device = io_same_device
        self._skip = frozenset(skip_keys)
        self._devices: list[torch.device | None] = []
        self._handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
            module.register_forward_hook(self._post, always_call=True),
        ]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._devices.append(_first_tensor_device(args, kwargs, self._skip))

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        device = self._devices.pop() if self._devices else None
        if not self.io_same_device or device is None:
            return output
        return _send(output, device, self._skip)

    def remove(self) -> None:
        """Remove the hooks; the module runs as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def runtime_of(model: nn.Module) -> Runtime | None:
    """The runtime `attach` put on `model`, or None."""
    return model.__dict__.get(_RUNTIME_ATTR)


# --------------------------------------------------------------------------------------------------
# Attaching


def _resolve_module(model: nn.Module, key: str) -> nn.Module:
    try:
        return model.get_submodule(key)
    except AttributeError:
        raise PlanError(
            f"device-map key {key!r} names no submodule of {type(model).__name__}; device maps name modules "
            "(e.g. 'model.layers.0'). Use the module that owns that tensor."
        ) from None


def attach(
    model: nn.Module,
    device_map: Mapping[str, DeviceLike],
    *,
    execution_device: Mapping[str, DeviceLike] | DeviceLike,
    store: WeightSource | None = None,
    host_weights: HostWeights | None = None,
    prefetch: int = 1,
    skip_keys: Iterable[str] | None = None,
    offload_buffers: bool = False,
    policy: ExecutionPolicy = ExecutionPolicy.STREAM,
    order: Sequence[str] | None = None,
    slots: SlotSpec | None = None,
    disk_reads: DiskReads | str | None = None,
) -> Runtime:
    """Hook each block of `device_map` so `model` runs with its weights spread over GPUs, CPU and disk.

    Args:
        model: a model whose tensors are where `device_map` says: real on GPUs and the CPU, meta (with
            their bytes in `store`) on disk.
        device_map: transformers' format, block name -> GPU index, "cpu" or "disk"; in execution order.
        execution_device: per block (e.g. `Plan.execution_devices`), or the main device: GPU blocks run on
            their GPU, disk blocks on the main device, CPU blocks as `policy` says.
        store: where disk-placed tensors are (a `DiskStore`).
        host_weights: where CPU-placed tensors that run on another device are; built from the model's own
            CPU tensors (used where they are, never pinned) when None.
        prefetch: how many blocks to load ahead of the one computing (0: load on demand).
        skip_keys: keyword arguments never moved; default `DEFAULT_SKIP_KEYS` (cache objects never move).
        offload_buffers: offload the buffers of offloaded blocks too; otherwise they stay on the execution
            device for good (as accelerate does).
        policy: where CPU-placed blocks run when `execution_device` is a single GPU (ignored for a mapping).
        order: execution order of the blocks when it differs from the device map's order.
        slots: the slots to keep for offloaded blocks, decided by the planner (`Plan.slots`); None (a map
            with no plan): `reserve.slot_count` of the offloaded blocks, each the largest one's size.
        disk_reads: how disk blocks are brought in on the CPU ("mapped" in place, or "read" explicitly into
            the slots; see `reserve.DiskReads`); None: the plan's (`slots.reads`), else "mapped".

    Returns:
        The `Runtime` (also `runtime_of(model)`), with `stats()` counters.

    Raises:
        BigloadError: the model already has a runtime (detach it first).
        PlanError: a key names no module, or tied tensors are split between a resident and an offloaded block.
        OffloadError: a disk-placed tensor is missing from `store`.
    """
    if runtime_of(model) is not None:
        raise BigloadError(
            f"{type(model).__name__} already has a bigload runtime (hooks attached by a previous dispatch); "
            "call bigload.detach(model) first to remove it, then attach or dispatch again."
        )
    if prefetch < 0:
        raise PlanError(f"prefetch={prefetch} is negative; use 0 (no prefetch) or a positive depth.")
    keys = list(device_map)
    placed = {key: Device.parse(value) for key, value in device_map.items()}
    runs_on = _execution_devices(keys, placed, execution_device, policy)
    offloaded_keys = [key for key in keys if placed[key] != runs_on[key]]
    exec_of = {key: device.torch_device() for key, device in runs_on.items()}
    # Host weights stay as they are (views of the checkpoint, pageable): the slots' pinned staging buffers
    # already overlap the copies, and pinning them would copy the whole CPU share into unswappable memory.
    host = host_weights if host_weights is not None else HostWeights()
    blocks, resident = _build_blocks(model, keys, placed, exec_of, set(offloaded_keys), store, host,
                                     offload_buffers)
    ordered = _execution_order(blocks, order)
    offloaded = [blocks[name] for name in ordered if blocks[name].offloaded]
    if disk_reads is not None:
        reads = DiskReads.parse(disk_reads)
    else:
        reads = slots.reads if slots is not None else DiskReads.MAPPED
    prefetcher = _Prefetcher(offloaded, prefetch, slots, resident_buffer_bytes=resident, reads=reads)
    runtime = Runtime(
        model=model,
        blocks={name: blocks[name] for name in ordered},
        skip_keys=frozenset(DEFAULT_SKIP_KEYS if skip_keys is None else skip_keys),
        prefetcher=prefetcher,
    )
    # The root's hooks go first so its pre-hook sees the caller's inputs before a root block moves them.
    runtime.handles.append(model.register_forward_pre_hook(runtime._root_pre_forward, with_kwargs=True))
    runtime.handles.append(model.register_forward_hook(runtime._root_post_forward, always_call=True))
    for name in ordered:
        _hook_block(runtime, model.get_submodule(name), blocks[name])
    model.__dict__[_RUNTIME_ATTR] = runtime
    _watch_additions(runtime)
    return runtime


def _execution_devices(
    keys: Sequence[str],
    placed: Mapping[str, Device],
    execution_device: Mapping[str, DeviceLike] | DeviceLike,
    policy: ExecutionPolicy,
) -> dict[str, Device]:
    if isinstance(execution_device, Mapping):
        missing = [key for key in keys if key not in execution_device]
        if missing:
            raise PlanError(f"no execution device for blocks {missing[:5]}; give one for every device-map key.")
        chosen = {key: Device.parse(execution_device[key]) for key in keys}
    else:
        main = Device.parse(execution_device)
        chosen = {key: execution_device_for(placed[key], main_device=main, policy=policy) for key in keys}
    disk = [key for key, device in chosen.items() if device.kind is DeviceKind.DISK]
    if disk:
        raise PlanError(f"blocks {disk[:5]} are given 'disk' as execution device; they run on a GPU or 'cpu'.")
    return chosen


def _build_blocks(
    model: nn.Module,
    keys: Sequence[str],
    placed: Mapping[str, Device],
    exec_of: Mapping[str, torch.device],
    offloaded: set[str],
    store: WeightSource | None,
    host: HostWeights,
    offload_buffers: bool,
) -> tuple[dict[str, Block], int]:
    """The runtime's blocks, and the bytes of offloaded blocks' buffers kept resident where they run."""
    for key in keys:
        _resolve_module(model, key)
    # Everything is checked before the model changes: registrations are rewritten only after the loop.
    rewrites: list[tuple[Sequence[Site], torch.Tensor]] = []
    entries: dict[str, list[_Entry]] = {key: [] for key in keys}
    offsets = {key: 0 for key in keys}
    resident = 0
    # Offsets are aligned as `reserve.slot_alignment` says (GPU slots); wider dtypes first keep them aligned to
    # the element size too.
    key_set = set(keys)
    by_width = sorted(tensor_groups(model), key=lambda group: -group.tensor.element_size())
    for names, sites in ((group.names, group.sites) for group in by_width):
        owners = {owner for owner in (owner_of(name, key_set) for name in names) if owner is not None}
        in_offloaded = sorted(owners & offloaded, key=keys.index)
        if not in_offloaded:
            continue
        if owners - offloaded:
            raise PlanError(
                f"tied tensor {names} is shared by resident block(s) {sorted(owners - offloaded)} and offloaded "
                f"block(s) {in_offloaded}; put every block of a tied group on the same device."
            )
        tensor = sites[0].get()
        assert tensor is not None  # tensor_groups skips None entries
        if not sites[0].is_parameter and not offload_buffers:
            buffer = _resident_buffer(names, tensor, exec_of[in_offloaded[0]], store)
            resident += buffer.numel() * buffer.element_size()
            rewrites.append((sites, buffer))
            continue
        source, key = _source_for(names, tensor, placed[in_offloaded[0]], store, host, in_offloaded[0])
        # One placeholder object for every registration keeps tied parameters tied while released.
        meta = tensor.detach().to("meta")
        placeholder = _placeholder(meta, sites[0].is_parameter, tensor.requires_grad,
                                   (names[0], in_offloaded[0], _home(source)))
        rewrites.append((sites, placeholder))
        for owner in in_offloaded:
            entry = _Entry(key, meta.dtype, tuple(meta.shape), offsets[owner], tuple(sites), placeholder, source)
            entries[owner].append(entry)
            offsets[owner] += aligned(entry.nbytes, _alignment(exec_of[owner]))
    for sites, value in rewrites:
        for site in sites:
            site.set(value)
    return {key: Block(key, placed[key], exec_of[key], tuple(entries[key])) for key in keys}, resident


# --------------------------------------------------------------------------------------------------
# Placeholders: what an offloaded tensor's registrations hold between forwards

def _outside_forward(cls: type, func: Callable[..., Any], types: Any, args: Sequence[Any] = (),
                     kwargs: Mapping[str, Any] | None = None) -> Any:
    """`__torch_function__` of placeholders: torch's own behaviour (meta in, meta out), except that reading
    their data, which torch refuses with "Cannot copy out of meta tensor", names the tensor and the fix. A
    meta tensor made from one (`detach()` in `state_dict()`, a view) is a placeholder too, so code reading a
    state dict gets the same error."""
    kwargs = kwargs or {}
    try:
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
    except (NotImplementedError, RuntimeError) as error:
        found = _placeholder_in(args, kwargs)
        if found is None or "meta" not in str(error):
            raise
        raise OffloadError(_placeholder_message(found)) from error
    if func in _SAME_TENSOR and type(result) is torch.Tensor and result.device.type == "meta":  # noqa: E721
        found = _placeholder_in(args, kwargs)
        if found is not None:
            result = result.as_subclass(OffloadedBuffer)
            result._bigload_where = getattr(found, "_bigload_where", None)  # type: ignore[attr-defined]
    return result


def _placeholder_in(args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    return next((value for value in (*args, *kwargs.values()) if isinstance(value, _PLACEHOLDERS)), None)


# Ops whose meta result is the placeholder's tensor under another name (state_dict() detaches; views), so it
# stays a placeholder. Computed results (a linear on a placeholder gives meta output) are not the tensor.
_SAME_TENSOR = frozenset({
    torch.Tensor.detach, torch.Tensor.clone, torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.view,
    torch.Tensor.reshape, torch.Tensor.view_as, torch.Tensor.__getitem__, torch.Tensor.data.__get__,
    torch.Tensor.t, torch.Tensor.T.__get__, torch.Tensor.transpose, torch.Tensor.flatten, torch.detach,
    torch.clone, torch.reshape,
})


class _Placeholder:
    """What both placeholder classes add to torch's meta tensor: the error on reading data, a repr naming the
    tensor and where it is stored, and a refusal to be pickled (`torch.save(model.state_dict())` would save
    no data for it, silently)."""

    __torch_function__ = classmethod(_outside_forward)

    def __repr__(self, **_: Any) -> str:
        name, block, home = getattr(self, "_bigload_where", None) or ("?", "?", "offloaded")
        shape = tuple(self.shape)  # type: ignore[attr-defined]
        return (f"{type(self).__name__}({name!r}, size={shape}, dtype={self.dtype}, {home}; "  # type: ignore[attr-defined]
                f"real while block {block!r} runs)")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise OffloadError(_placeholder_message(self))  # type: ignore[arg-type]


class OffloadedParameter(_Placeholder, nn.Parameter):
    """The meta placeholder of an offloaded parameter; the runtime installs the real values during its block's
    forward. A plain meta Parameter to torch, peft and transformers, except for the error on reading its data."""


class OffloadedBuffer(_Placeholder, torch.Tensor):
    """The meta placeholder of an offloaded buffer (`offload_buffers=True`) and the meta result of an op on a
    placeholder (`detach()` in `state_dict()`); see `OffloadedParameter`."""


_PLACEHOLDERS = (OffloadedParameter, OffloadedBuffer)


def _placeholder(meta: torch.Tensor, is_parameter: bool, requires_grad: bool,
                 where: tuple[str, str, str]) -> torch.Tensor:
    """The placeholder of an offloaded tensor; `where` is (its first name, its block, where it is stored)."""
    placeholder = (OffloadedParameter(meta, requires_grad) if is_parameter
                   else torch.Tensor._make_subclass(OffloadedBuffer, meta, False))
    placeholder._bigload_where = where  # type: ignore[attr-defined]
    return placeholder


def _home(source: WeightSource) -> str:
    folder = getattr(source, "folder", None)
    return f"on disk in {folder}" if folder is not None else "in CPU memory"


def _placeholder_message(placeholder: torch.Tensor) -> str:
    name, block, home = getattr(placeholder, "_bigload_where", None) or ("an offloaded tensor", "?", "offloaded")
    return (
        f"{name!r} is offloaded by bigload ({home}): its values are on the execution device only while block "
        f"{block!r} runs, and outside that forward it is a placeholder on the meta device, with no data. Run "
        "the model (or that block) to use it, or bigload.detach(model) for a plain model in memory. From "
        "peft's PeftModel.from_pretrained (its re-dispatch copies weights when peft's own device map reaches "
        "disk): pass it device_map={'': DEVICE}, DEVICE being where your input ids are (0, or "
        "'cpu'), or load the adapter with bigload.from_pretrained(..., adapter=PATH)."
    )


def _resident_buffer(names: Sequence[str], tensor: torch.Tensor, device: torch.device,
                     store: WeightSource | None) -> torch.Tensor:
    """A buffer of an offloaded block, on its execution device for good (offload_buffers=False)."""
    if tensor.device.type == "meta":
        name = next((n for n in names if store is not None and n in store), None)
        if name is None or store is None:
            raise OffloadError(
                f"buffer {names[0]!r} is on the meta device and not in the offload store; load the checkpoint "
                "(or pass the folder it was offloaded to) before dispatching."
            )
        tensor = store.get(name)
    return tensor.to(device)


def _source_for(names: Sequence[str], tensor: torch.Tensor, placed: Device, store: WeightSource | None,
                host: HostWeights, block: str) -> tuple[WeightSource, str]:
    if placed.kind is DeviceKind.DISK:
        for name in names:
            if store is not None and name in store:
                return store, name
        raise OffloadError(
            f"tensor {names[0]!r} of block {block!r} is placed on disk but is not in the offload store; write it "
            "there first (dispatch_model does, given offload_dir) or pass the store it was offloaded to."
        )
    if tensor.device.type != "meta":
        # A real tensor of a block that runs elsewhere: keep it in host memory where it is.
        if names[0] not in host:
            host.put(names[0], tensor)
        return host, names[0]
    for name in names:
        if name in host:
            return host, name
    raise OffloadError(
        f"tensor {names[0]!r} of block {block!r} is placed on the CPU but is still on the meta device and not "
        "among the host weights; load the checkpoint (or pass state_dict) before dispatching."
    )


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
            stored = entry.source.get(entry.key).reshape(entry.shape).to(entry.dtype)
            # Host weights are already ours; a store's tensors are views of files the caller may delete.
            value = stored if isinstance(entry.source, HostWeights) else stored.clone()
            real = entry.registered(value)
            for site in entry.sites:
                site.set(real)
    del model.__dict__[_RUNTIME_ATTR]
    _LIVE_RUNTIMES.pop(id(runtime), None)
    for attr in runtime.owned_attributes:
        model.__dict__.pop(attr, None)
    for layer in list(runtime._adapter_layers):
        _untrack_adapter_layer(runtime, layer)
    for undo in runtime.on_detach:
        undo()
    return model


# --------------------------------------------------------------------------------------------------
# Modules added after attach (adapters)
#
# peft wraps layers of an attached model (LoRA's `lora_A`/`lora_B` beside the original layer, which becomes
# `base_layer`) and moves the new weights to the device of the base weight: for an offloaded layer that is
# the meta placeholder, so the weights would have no data. The runtime watches module and tensor
# registrations (torch's global registration hooks: no monkeypatching) and, before the next forward or
# state-dict load, gives every tensor added under a block a home: resident on the block's execution device
# (adapters are small). peft merges (`merge_adapter`, `merge_and_unload`, any variant) run peft's own code on
# real copies of the stored base tensors, and what they change is written where those tensors live.

_LIVE_RUNTIMES: "weakref.WeakValueDictionary[int, Runtime]" = weakref.WeakValueDictionary()
_WATCH_HANDLES: list[RemovableHandle] = []


def _watch_additions(runtime: Runtime) -> None:
    """Index the runtime's offloaded tensors and have registrations anywhere mark it changed."""
    for block in runtime.blocks.values():
        for entry in block.entries:
            runtime._placeholders.add(id(entry.placeholder))
            for site in entry.sites:
                runtime._offloaded_sites[(id(site.module), site.attr)] = (block.name, entry)
    for module in runtime.model.modules():
        runtime._members.add(module)
        if _wraps_offloaded_weight(runtime, module):  # wrapped before dispatch (adapters.py)
            _track_adapter_layer(runtime, module)
    runtime.handles.append(runtime.model.register_load_state_dict_pre_hook(_before_state_dict_load))
    # `model.to(...)` (peft's `from_pretrained` calls it on an offloaded base) must not touch placeholders.
    runtime.model.__dict__["_apply"] = functools.partial(_apply_to_resident, runtime)
    runtime.owned_attributes.append("_apply")
    _LIVE_RUNTIMES[id(runtime)] = runtime
    if not _WATCH_HANDLES:
        from torch.nn.modules import module as torch_module

        _WATCH_HANDLES.extend((
            torch_module.register_module_module_registration_hook(_module_registered),
            torch_module.register_module_parameter_registration_hook(_tensor_registered),
            torch_module.register_module_buffer_registration_hook(_tensor_registered),
        ))


def _tensor_registered(module: nn.Module, name: str, value: Any) -> None:
    for runtime in list(_LIVE_RUNTIMES.values()):
        if module in runtime._members:
            runtime.changed = True


def _module_registered(parent: nn.Module, name: str, value: Any) -> None:
    # Called before `value` replaces `parent._modules[name]`: the old module is still there.
    for runtime in list(_LIVE_RUNTIMES.values()):
        if parent not in runtime._members:
            continue
        runtime.changed = True
        old = parent._modules.get(name)
        if old is not None and old is not value and old in runtime._adapter_layers:
            check_merges(runtime, old)  # peft's merge_and_unload is putting the merged base layer back
            _untrack_adapter_layer(runtime, old)


def _before_state_dict_load(module: nn.Module, *args: Any) -> None:
    runtime = runtime_of(module)
    if runtime is not None:
        take_back_placement(runtime)
        adopt(runtime, materialize=True)
        # Look again before the next forward: peft re-dispatches the model right after loading an adapter.
        runtime.changed = True


# accelerate's hook attributes (duck-typed: bigload does not import accelerate): `add_hook_to_module` sets
# `_hf_hook` on the module and keeps the module's own forward in `_old_forward`; a `SequentialHook` holds
# several in `hooks`; every hook has `detach_hook(module)`, which `remove_hook_from_module` calls.
_ACCELERATE_HOOK = "_hf_hook"
_ACCELERATE_FORWARD = "_old_forward"


def take_back_placement(runtime: Runtime) -> list[str]:
    """Take off the model's modules the accelerate hooks that place weights, put there after bigload
    dispatched it, as accelerate's `remove_hook_from_module` would; bigload's placement holds again.

    peft's `PeftModel.from_pretrained` re-dispatches an offloaded model with accelerate's `dispatch_model` on
    a map of its own; when that map spans a GPU and the CPU, accelerate hooks every module to set its tensors
    to meta between forwards and load them from its copy of the state dict (which for offloaded weights holds
    bigload's placeholders). bigload already runs every block and keeps adapter weights with their block, so
    the runtime undoes that before the next forward: each hook's own `detach_hook` puts back the tensors it
    took (resident ones, adapters), the module's forward is restored, and offloaded sites get their
    placeholders back. Hooks that place nothing (peft's `AlignDevicesHook(io_same_device=True)`) stay.

    Returns:
        The names of the modules whose hooks were taken off (logged as a warning when any).

    Raises:
        OffloadError: a hook without `detach_hook` (not accelerate's): naming the modules and the fix.
    """
    hooked = [(name, module) for name, module in runtime.model.named_modules() if _places_weights(module)]
    if not hooked:
        return []
    foreign = [name for name, module in hooked if not callable(getattr(module.__dict__[_ACCELERATE_HOOK],
                                                                        "detach_hook", None))]
    if foreign:
        raise OffloadError(
            f"hooks of another library were put on {summarize_names(foreign)} after bigload dispatched this model, and "
            "bigload cannot take them off: two runtimes cannot own the same weights. Dispatch the model once; "
            "for a peft adapter use bigload.from_pretrained(MODEL, adapter=PATH), or pass device_map={'': DEVICE} "
            "to PeftModel.from_pretrained (DEVICE being where your input ids are: 0, or 'cpu')."
        )
    for _, module in hooked:
        module.__dict__.pop(_ACCELERATE_HOOK).detach_hook(module)
        _restore_forward(module)
    for block in runtime.blocks.values():
        for entry in block.entries:
            for site in entry.sites:
                current = site.get()
                if current is not entry.placeholder and (current is None or current.device.type == "meta"):
                    site.set(entry.placeholder)
    names = [name for name, _ in hooked]
    logger.warning("bigload took accelerate's hooks off %s (a re-dispatch, such as peft's PeftModel."
                   "from_pretrained on an offloaded model): bigload's own placement runs the model.", summarize_names(names))
    return names


def _restore_forward(module: nn.Module) -> None:
    """Undo accelerate's `module.forward = partial(new_forward, module)`."""
    old = module.__dict__.pop(_ACCELERATE_FORWARD, None)
    if old is None:
        return
    if getattr(old, "__self__", None) is module and getattr(old, "__func__", None) is type(module).forward:
        module.__dict__.pop("forward", None)  # the class's own forward: no instance attribute, as before
    else:
        module.forward = old  # a forward set on the instance before accelerate wrapped it


def _places_weights(module: nn.Module) -> bool:
    """The module carries an accelerate hook that offloads its weights or runs it on a device of its own."""
    hook = module.__dict__.get(_ACCELERATE_HOOK)
    if hook is None:
        return False
    return any(getattr(part, "offload", False) or getattr(part, "execution_device", None) is not None
               for part in getattr(hook, "hooks", (hook,)))


def adopt(runtime: Runtime, *, materialize: bool = False) -> None:
    """Make tensors added to an attached model since `attach` (adapter weights) resident on their block's
    execution device. The runtime calls this itself before a forward and before a state-dict load.

    Args:
        runtime: `runtime_of(model)`.
        materialize: give tensors left on the meta device (peft creates the adapter weights of an offloaded
            layer there) zero-filled storage, about to be overwritten by a state-dict load.

    Raises:
        OffloadError: (without `materialize`) tensors added after attach are on the meta device: they have
            no data.
    """
    keys = set(runtime.blocks)
    empty: list[str] = []
    for module_name, module in runtime.model.named_modules():
        runtime._members.add(module)
        if _wraps_offloaded_weight(runtime, module) and module not in runtime._adapter_layers:
            _track_adapter_layer(runtime, module)
        owner = owner_of(module_name, keys)
        if owner is None:
            continue
        device = runtime.blocks[owner].execution_device
        for site, tensor in _own_tensors(module):
            if id(tensor) in runtime._placeholders or tensor.device == device:
                continue
            if tensor.device.type == "meta" and not materialize:
                empty.append(f"{module_name}.{site.attr}" if module_name else site.attr)
                continue
            with torch.no_grad():
                value = (torch.zeros(tensor.shape, dtype=tensor.dtype, device=device)
                         if tensor.device.type == "meta" else tensor.detach().to(device))
            site.set(_like(tensor, value))
    if empty:
        raise OffloadError(
            f"tensors {empty[:5]} were added to the dispatched model after dispatch and have no data (meta "
            "device). Load their weights (PeftModel.from_pretrained, load_adapter or load_state_dict), or add the "
            "adapter before dispatching (bigload.from_pretrained(..., adapter=PATH))."
        )
    runtime.changed = False


def _own_tensors(module: nn.Module) -> Iterable[tuple[Site, torch.Tensor]]:
    for table, is_parameter in ((module._parameters, True), (module._buffers, False)):
        for attr, tensor in list(table.items()):
            if tensor is not None:
                yield Site(module, attr, is_parameter), tensor


def _apply_to_resident(runtime: Runtime, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
                       ) -> nn.Module:
    """`nn.Module._apply` for an attached model: `fn` (a `.to`, a `.float()`) reaches every tensor except the
    placeholders of offloaded weights, and no tensor of a block changes device: the plan placed them and the
    runtime moves their inputs there. peft's re-dispatch calls `model.to(device)` on the whole model; moving a
    GPU share into RAM (or RAM into the GPU) only to be moved back at the next forward would double its memory.
    A dtype change still applies to resident tensors, on their device."""
    keys = set(runtime.blocks)
    hidden: list[tuple[Site, torch.Tensor]] = []
    recast: list[tuple[Site, torch.Tensor, torch.dtype]] = []
    kept = 0
    applied = functools.lru_cache(maxsize=None)(functools.partial(_applied, fn))  # one probe per device/dtype
    for module_name, module in runtime.model.named_modules():
        owned = owner_of(module_name, keys) is not None
        for site, tensor in _own_tensors(module):
            if id(tensor) in runtime._placeholders:
                hidden.append((site, tensor))
                continue
            if not owned:
                continue
            device, dtype = applied(tensor.device, tensor.dtype)
            if device != tensor.device:
                hidden.append((site, tensor))
                kept += 1
                if dtype != tensor.dtype:
                    recast.append((site, tensor, dtype))
    for site, _ in hidden:
        site.set(None)  # type: ignore[arg-type]  # nn.Module._apply skips None entries
    try:
        nn.Module._apply(runtime.model, fn, recurse)
    finally:
        for site, tensor in hidden:
            site.set(tensor)
    with torch.no_grad():
        for site, tensor, dtype in recast:
            site.set(_like(tensor, tensor.detach().to(dtype)))
    if kept:
        logger.warning("bigload keeps a dispatched model where its plan put it: %d resident tensors stayed on "
                       "their blocks' devices (model.to / .cuda / .cpu move nothing; see model.hf_device_map).",
                       kept)
    runtime.changed = True
    return runtime.model


def _applied(fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device, dtype: torch.dtype
             ) -> tuple[torch.device, torch.dtype]:
    """Where and as what `fn` would put a tensor on `device` of `dtype`, found on an empty one (no data copied)."""
    probe = fn(torch.empty(0, dtype=dtype, device=device))
    return probe.device, probe.dtype


def _wraps_offloaded_weight(runtime: Runtime, module: nn.Module) -> bool:
    """A peft tuner layer (it tracks `merged_adapters`) whose base layer's weight is offloaded."""
    get_base = getattr(module, "get_base_layer", None)
    if not callable(get_base) or not hasattr(module, "merged_adapters"):
        return False
    return (id(get_base()), "weight") in runtime._offloaded_sites


# peft's merge methods, which the runtime runs with the base layer's offloaded tensors real (`_merge_in_store`).
_MERGE_CALLS = ("merge", "unmerge")


def _track_adapter_layer(runtime: Runtime, layer: nn.Module) -> None:
    """Follow peft `layer`, which wraps an offloaded weight: its `merge` and `unmerge` reach the stored weight.

    peft merges in place into `base_layer.weight`, which between forwards is the meta placeholder, and DoRA
    and `safe_merge` need the real values (a weight norm, a NaN check). No torch hook sees a method call, so
    the layer gets `merge`/`unmerge` instance attributes (the runtime's own state, removed by
    `_untrack_adapter_layer` and `detach`) that run peft's own methods through `_merge_in_store`.
    """
    runtime._adapter_layers.append(layer)
    for name in _MERGE_CALLS:
        if name not in layer.__dict__:
            layer.__dict__[name] = functools.partial(_merge_in_store, runtime, layer, getattr(layer, name))


def _untrack_adapter_layer(runtime: Runtime, layer: nn.Module) -> None:
    """Stop following `layer` (peft replaced it by its base layer, or the runtime is detached)."""
    for name in _MERGE_CALLS:
        layer.__dict__.pop(name, None)
    runtime._adapter_layers.remove(layer)
    runtime._merged.pop(id(layer), None)


def _merge_in_store(runtime: Runtime, layer: nn.Module, peft_call: Callable[..., Any], *args: Any,
                    **kwargs: Any) -> Any:
    """peft's `merge`/`unmerge` of `layer`, run by peft itself on real tensors, with the result stored.

    The block's tensors are installed (adapter weights streamed with the block are real) and each offloaded
    tensor of the base layer is replaced by a private copy, so peft's own arithmetic (plain LoRA, DoRA and
    its weight norm, `lora_bias`, `safe_merge`'s checks) runs exactly as in memory; the copies peft changed
    are then written where those tensors are stored, so the merged weight never stays in RAM. Resident
    tensors of the base layer (not offloaded) are changed in place by peft, as in memory. What peft merged
    before raising part way (an adapter before a failing one) is written too: the stored weights always hold
    what `layer.merged_adapters` says.
    """
    if id(layer) in runtime._merging:  # DoRA unmerges and re-merges the others to see the unmerged weight
        return peft_call(*args, **kwargs)
    check_merges(runtime, layer)
    block = runtime.blocks[runtime._offloaded_sites[(id(layer.get_base_layer()), "weight")][0]]
    before = tuple(layer.merged_adapters)
    changed: list[tuple[_Entry, torch.Tensor]] = []
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
        _write_merges(runtime, block, changed, before, tuple(layer.merged_adapters))
        runtime._merged[id(layer)] = tuple(layer.merged_adapters)


@contextlib.contextmanager
def _in_use(runtime: Runtime, block: Block) -> Iterator[None]:
    """The block's offloaded tensors installed: those of its running forward (peft unmerges in the forward of a
    merged layer whose adapters are disabled), else installed for the duration."""
    if block.name in runtime.prefetcher.in_use:
        yield
    else:
        with _installed(runtime, block):
            yield


_Copy = tuple[_Entry, torch.Tensor, torch.Tensor]  # an offloaded tensor: its entry, installed value, private copy


def _private_copies(runtime: Runtime, base: nn.Module) -> list[_Copy]:
    """Register a private copy of each installed offloaded tensor of `base` for peft to change in place: the
    installed values may be the store's own bytes (an mmap'd file, host weights) or kept for later forwards."""
    copies: dict[str, _Copy] = {}
    for module in base.modules():
        for site, tensor in _own_tensors(module):
            found = runtime._offloaded_sites.get((id(module), site.attr))
            if found is None or found[1].key in copies:
                continue
            entry = found[1]
            with torch.inference_mode(False):
                copy = entry.registered(tensor.detach().clone())
            for each in entry.sites:  # every alias of a tied weight, as peft changes them all in memory
                each.set(copy)
            copies[entry.key] = (entry, tensor, copy)
    return list(copies.values())


def _changed(copies: list[_Copy]) -> list[tuple[_Entry, torch.Tensor]]:
    """The tensors peft changed (in place, or by giving the Parameter new data), with their new values."""
    changed = []
    for entry, installed, _ in copies:
        value = entry.sites[0].get()
        assert value is not None  # _private_copies registered a copy here
        if not torch.equal(value, installed):
            changed.append((entry, value.detach()))
    return changed


def _write_merges(runtime: Runtime, block: Block, changed: list[tuple[_Entry, torch.Tensor]],
                  before: tuple[str, ...], after: tuple[str, ...]) -> None:
    """Store the values a merge changed (`DiskStore.rewrite` records the change in the folder's fingerprint)
    and drop what the runtime loaded or cached of the old ones."""
    added = [name for name in after if name not in before]
    removed = [name for name in before if name not in after]
    for entry, value in changed:
        stored = entry.source.get(entry.key)
        change = f"merged {added} into {entry.key}" if added else f"unmerged {removed} from {entry.key}"
        entry.source.rewrite(entry.key, value.to(stored.dtype).reshape(stored.shape), change=change)
        logger.info("bigload: %s", change)
    if changed:
        runtime.prefetcher.forget(block.name)
        runtime._values.pop(block.name, None)


def check_merges(runtime: Runtime, layer: nn.Module) -> None:
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
def _installed(runtime: Runtime, block: Block) -> Iterator[None]:
    """The block's offloaded tensors installed, as during its forward."""
    runtime._install(block, runtime.prefetcher.acquire(block.name))
    try:
        yield
    finally:
        runtime._uninstall(block)
        runtime.prefetcher.release(block.name)
