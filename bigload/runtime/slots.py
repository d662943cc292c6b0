"""Slots: room for one offloaded block's weights on the device that runs it, reused for the runtime's whole
life (the plan's `SlotSpec`), and the ways a block comes into one.

- CPU execution: a stored tensor that is already a CPU tensor of the right dtype (an mmap'd `DiskStore.get`
  view, or a host tensor) is used in place, with no copy; such blocks are resolved once and handed out on
  every forward, and prefetching them is kernel advice (`mincore`, then `madvise(MADV_WILLNEED)` for pages
  not in memory), so the kernel reads a cold page cache while the current block computes and no Python code
  touches pages. Tensors that need a cast go into the slot's buffer.
- CUDA execution: weights are staged through the slot's pinned host buffer (or copied straight from pinned
  host weights) into its device buffer on a side stream; events order the copies against compute.
- Explicit reads (`DiskReads.READ`): a block whose tensors lie in files as they are used is read with large
  reads straight into the slot (`load.reads.layout` says where each tensor lands).

Before any of these touches a block's stored bytes, the files they lie in are checked (`check_block_files`): a
mapped file truncated since it was mapped would otherwise end the process with SIGBUS, and a store file
replaced since the store was checked would hand the block bytes nobody checked.
"""

from __future__ import annotations

import mmap
from typing import Iterable, Mapping

import torch

from bigload.errors import OffloadError
from bigload.formats import pages
from bigload.formats.mapped import FileUse, check_mapped, mapped_uses
from bigload.load.reads import BlockLayout, layout
from bigload.runtime.blocks import Block, Entry
from bigload.sizes import dtype_width

__all__ = ["Slot", "advise_willneed", "advised", "check_block_files", "files_used", "load_cpu", "load_cuda",
           "read_layout", "stable_views", "views_at"]


class Slot:
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

    def view(self, buffer: torch.Tensor, entry: Entry) -> torch.Tensor:
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


def advise_willneed(tensors: Iterable[torch.Tensor]) -> None:
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


def advised(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    advise_willneed(views.values())
    return views


def _usable_in_place(source_tensor: torch.Tensor, entry: Entry, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and source_tensor.device.type == "cpu"
        and source_tensor.dtype == entry.dtype
        and source_tensor.is_contiguous()
        and source_tensor.numel() * source_tensor.element_size() == entry.nbytes
    )


def stable_views(block: Block) -> dict[str, torch.Tensor] | None:
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


def load_cpu(block: Block, slot: Slot) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = {}
    for entry in block.entries:
        stored = entry.source.get(entry.key)
        if _usable_in_place(stored, entry, slot.device):
            advise_willneed((stored,))
            loaded[entry.key] = stored.view(entry.shape)
        else:
            target = slot.view(slot.device_buffer(), entry)
            target.copy_(stored.reshape(entry.shape))
            loaded[entry.key] = target
    return loaded


def load_cuda(block: Block, slot: Slot, stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
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


def read_layout(block: Block, slot_size: int) -> BlockLayout | None:
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


def views_at(block: Block, buffer: torch.Tensor, layout: BlockLayout) -> dict[str, torch.Tensor]:
    return {entry.key: buffer[at: at + entry.nbytes].view(entry.dtype).view(entry.shape)
            for entry, at in zip(block.entries, layout.offsets)}


def files_used(block: Block, views: Mapping[str, torch.Tensor] | None) -> tuple[FileUse, ...]:
    """The mapped files the block's stored tensors view (its in-place `views`, else what its sources hand out
    before any cast: `DiskStore.view`), with the bytes used of each. Reads no tensor's data."""
    if views is not None:
        return mapped_uses(views.values())
    return mapped_uses(getattr(entry.source, "view", entry.source.get)(entry.key) for entry in block.entries)


def check_block_files(block: Block, uses: tuple[FileUse, ...] | None) -> None:
    """Refuse to bring `block` in from files changed under it: mapped files (`uses`, from `files_used`) truncated
    or written in place since they were mapped (`formats.mapped.check_mapped`); with explicit reads (`uses` is
    None), files replaced since its store was checked (the source's `verify`, one `stat` per file).

    Raises:
        OffloadError (CheckpointError for a checkpoint file under host weights), naming the file and the fix.
    """
    what = f"block {block.name!r}"
    if uses is not None:
        check_mapped(uses, what)
        return
    keys: dict[int, tuple[object, list[str]]] = {}
    for entry in block.entries:
        keys.setdefault(id(entry.source), (entry.source, []))[1].append(entry.key)
    for source, names in keys.values():
        verify = getattr(source, "verify", None)
        if verify is not None:
            verify(names)
