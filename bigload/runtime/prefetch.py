"""The prefetcher: loads offloaded blocks into the plan's slots, ahead of execution, on one background thread.

It knows the execution order (the plan's order, confirmed by the first forward) and loads the next `prefetch`
blocks while the current one computes. Disk blocks the plan reads explicitly (`DiskReads.READ`) are read by a
pool of reader threads (`load.reads`: large `preadv` calls, `O_DIRECT` where the filesystem allows), so compute
never waits on page faults, the page cache never evicts the block about to run, and a file truncated since
loading is an `OffloadError` in the caller rather than a SIGBUS.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from bigload.devices import DeviceKind
from bigload.errors import OffloadError
from bigload.load.reads import READ_TIMEOUT_S, BlockLayout, BlockReader
from bigload.plan.reserve import DiskReads, SlotSpec, pinned_bytes
from bigload.runtime.blocks import Block
from bigload.formats.mapped import FileUse, check_mapped
from bigload.runtime.slots import (
    Slot, advised, check_block_files, files_used, load_cpu, load_cuda, read_layout, stable_views, views_at,
)

__all__ = ["PREFETCH_HISTORY", "PrefetchStats", "Prefetcher", "Ticket"]

logger = logging.getLogger(__name__)

PREFETCH_HISTORY = 4096  # how many prefetched block names `PrefetchStats.prefetched` remembers


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


class Ticket:
    """A block being loaded or ready in a slot."""

    def __init__(self, block: Block, slot: Slot, future: Future[dict[str, torch.Tensor]]) -> None:
        self.block = block
        self.slot = slot
        self.future = future


class Prefetcher:
    """Loads offloaded blocks into a fixed set of slots, ahead of execution, on one background thread.

    Call order, all on the caller's thread: `acquire(block)` in the block's pre-hook (returns its tensors,
    ready to use), `release(block)` in its post-hook. Each call tops the pipeline up: the next `prefetch`
    blocks in execution order (wrapping around to the next forward) are loaded while the current one runs.
    """

    def __init__(self, blocks: Sequence[Block], prefetch: int, slots: SlotSpec, device: torch.device,
                 resident_buffer_bytes: int = 0) -> None:
        _check_fit(blocks, slots, device)
        self.prefetch = prefetch
        self.resident_buffer_bytes = resident_buffer_bytes
        self.reads = slots.reads
        self.order: list[str] = [block.name for block in blocks]
        self.blocks = {block.name: block for block in blocks}
        self.free: dict[torch.device, list[Slot]] = (
            {device: [Slot(device, slots.nbytes, slots.staged) for _ in range(slots.count)]} if blocks else {})
        self.all_slots = [slot for slots in self.free.values() for slot in slots]
        self.streams = {device: torch.cuda.Stream(device) for device in self.free if device.type == "cuda"}
        self._allocate_cuda_slots()
        self.tickets: dict[str, Ticket] = {}  # scheduled or in use
        self.in_use: list[str] = []
        self.bytes_held = 0
        self.peak_bytes_held = 0
        self.prefetched: deque[str] = deque(maxlen=PREFETCH_HISTORY)
        self.bytes_loaded = 0
        self.sync_loads = 0
        self._views: dict[str, dict[str, torch.Tensor] | None] = {}  # per block, computed on its first load
        self._layouts: dict[str, BlockLayout | None] = {}  # per block, with explicit reads: how it is read
        self._uses: dict[str, tuple[FileUse, ...]] = {}  # per block read through mappings: the files it views
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
            if self.stable(name):  # used in place by the forward about to run: its files once more
                check_mapped(self._uses.get(name, ()), f"block {name!r}")
        except FutureTimeout:
            self._drop(ticket)
            raise OffloadError(
                f"loading the offloaded weights of block {name!r} did not finish in {READ_TIMEOUT_S:.0f} s; check "
                "the disk holding the offload folder (or the checkpoint it points into).") from None
        except Exception as error:
            self._drop(ticket)
            raise OffloadError(
                f"loading the offloaded weights of block {name!r} onto {ticket.block.execution_device} failed: "
                f"{str(error).rstrip('.')}. Check the offload store (folder, disk space, file permissions) and reload."
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
        self._uses.pop(name, None)
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

    def _start(self, name: str, *, background: bool) -> Ticket | None:
        # Views resolved and buffers filled here are kept across forwards: never make them inference tensors.
        with torch.inference_mode(False):
            return self._start_ticket(name, background=background)

    def _start_ticket(self, name: str, *, background: bool) -> Ticket | None:
        block = self.blocks[name]
        slot = self._free_slot(block.execution_device, evict=not background)
        if slot is None:
            return None
        future: Future[dict[str, torch.Tensor]] = Future()
        try:
            layout = self._layout(block)
            views = None if layout is not None else self._stable(block)
            self._check_files(block, layout, views)
        except Exception as error:  # surfaced by acquire, which names the block
            future.set_exception(error)
        else:
            if layout is not None:
                future = self._start_read(block, slot, layout, background)
            elif views is not None:
                # Nothing to copy: prefetching is asking the kernel to read the pages while the current block
                # runs. On the thread, since `madvise` blocks while it queues the reads of a cold block.
                future = self._run(functools.partial(advised, views), background)
            else:
                future = self._run(functools.partial(self._load, block, slot), background)
        ticket = Ticket(block, slot, future)
        self.tickets[name] = ticket
        self.bytes_held += block.nbytes
        self.bytes_loaded += block.nbytes
        self.peak_bytes_held = max(self.peak_bytes_held, self.bytes_held)
        return ticket

    def _stable(self, block: Block) -> dict[str, torch.Tensor] | None:
        if block.name not in self._views:
            self._views[block.name] = stable_views(block)
            self.paths[block.name] = "mapped (in place)" if self._views[block.name] is not None else "copy"
        return self._views[block.name]

    def _check_files(self, block: Block, layout: BlockLayout | None, views: dict[str, torch.Tensor] | None) -> None:
        """Before the block's bytes are touched (here, on the caller's thread, before a background copy
        starts): its files are still the ones checked and mapped (`slots.check_block_files`)."""
        if layout is not None:
            check_block_files(block, None)
            return
        if block.name not in self._uses:
            self._uses[block.name] = files_used(block, views)
        if views is None:  # a copy is about to read them; views used in place are checked by `acquire`
            check_block_files(block, self._uses[block.name])

    def _layout(self, block: Block) -> BlockLayout | None:
        """How block is read explicitly (`DiskReads.READ`, a disk block whose tensors lie in files as they are
        used), or None: it takes the mapped or copy path."""
        if block.name not in self._layouts:
            self._layouts[block.name] = None
            if self.reads is DiskReads.READ and block.placed.kind is DeviceKind.DISK:
                slot_size = next(slot.nbytes for slot in self.all_slots if slot.device == block.execution_device)
                self._layouts[block.name] = read_layout(block, slot_size)
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

    def _start_read(self, block: Block, slot: Slot, layout: BlockLayout,
                    background: bool) -> Future[dict[str, torch.Tensor]]:
        """Explicit reads. Into a CPU slot, queued straight on the reader threads, so the reads of the next
        blocks can be in flight at once (`BlockReader.start`); for a GPU, through the slot's pinned staging
        buffer, on the prefetch thread (`_read_staged`)."""
        if slot.device.type != "cpu":
            return self._run(functools.partial(self._read_staged, block, slot, layout), background)
        buffer = slot.device_buffer()
        views = views_at(block, buffer, layout)  # on this thread, outside inference mode (see `_start`)
        read = self._block_reader().start(layout, buffer, what=f"block {block.name!r}")
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

    def _read_staged(self, block: Block, slot: Slot, layout: BlockLayout) -> dict[str, torch.Tensor]:
        reader = self._block_reader()
        assert slot.loaded is not None and slot.released is not None
        slot.loaded.synchronize()  # the previous copy out of the staging buffer is over
        staging = slot.staging_buffer()
        reader.read(layout, staging, what=f"block {block.name!r}")
        device_buffer = slot.device_buffer()
        stream = self.streams[slot.device]
        with torch.cuda.stream(stream):
            stream.wait_event(slot.released)  # compute reading the slot's previous block is over
            device_buffer[: layout.nbytes].copy_(staging[: layout.nbytes], non_blocking=True)
            slot.loaded.record(stream)
        return views_at(block, device_buffer, layout)

    def _block_reader(self) -> BlockReader:
        with self._lock:
            if self._reader is None:
                self._reader = BlockReader()
            return self._reader

    def _free_slot(self, device: torch.device, *, evict: bool) -> Slot | None:
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

    def _drop(self, ticket: Ticket) -> None:
        if self.tickets.get(ticket.block.name) is ticket:
            del self.tickets[ticket.block.name]
            self.bytes_held -= ticket.block.nbytes
            self.free[ticket.slot.device].append(ticket.slot)

    @staticmethod
    def _wait_quietly(ticket: Ticket) -> None:
        # Used before reusing or freeing a slot: the load must be over; its error, if any, is reported
        # when (and if) the block is acquired again.
        try:
            ticket.future.result()
        except Exception:
            logger.debug("bigload: discarded failed prefetch of %s", ticket.block.name, exc_info=True)

    def _load(self, block: Block, slot: Slot) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            if slot.device.type == "cuda":
                return load_cuda(block, slot, self.streams[slot.device])
            return load_cpu(block, slot)

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigload-prefetch")
            return self._executor


def _check_fit(blocks: Sequence[Block], slots: SlotSpec, device: torch.device) -> None:
    """Every offloaded block runs on the slots' device and fits one slot, as the plan reserved.

    Raises:
        OffloadError: a block the plan did not size (a plan made for another model, dtype or quantization).
    """
    for block in blocks:
        if block.execution_device != device:
            raise OffloadError(f"offloaded block {block.name!r} runs on {block.execution_device} but the plan keeps its "
                               f"slots on {device}; plan this model again (one main device runs offloaded blocks).")
        if block.slot_bytes > slots.nbytes:
            raise OffloadError(
                f"offloaded block {block.name!r} needs {block.slot_bytes} bytes in a slot but the plan's slots hold "
                f"{slots.nbytes}: the plan was made for another model, dtype or quantization. Plan again for this "
                "load (the same dtype=, quantize= and adapter=), or pass its device map instead of the plan.")
