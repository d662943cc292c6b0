"""Host-to-GPU copies while loading: a small ring of pinned staging buffers per load, on a side stream per GPU."""

from __future__ import annotations

from typing import Iterable

import torch

from bigload.devices import Device

__all__ = ["STAGING_BUFFERS", "GpuStager", "empty_pinned_cache"]

STAGING_BUFFERS = 4


class GpuStager:
    """Host-to-GPU copies through a ring of (pinned) staging buffers on one side stream per GPU.

    Filling buffer k+1 from the memory-mapped file (the actual disk read) overlaps the DMA out of buffer k;
    an event per buffer says when it may be refilled. `finish` waits for every copy before the model runs.

    The ring is pinned host memory beside the CPU-resident weights while loading, so it is part of the
    loader's window (`STAGING_BUFFERS` buffers of `window_bytes / STAGING_BUFFERS`, never a shard), not of the
    plan: the plan charges what is held while the model runs. `finish` gives it back to the system (torch's
    pinned allocator would otherwise cache it for good), so it never coexists with the runtime's staging
    buffers, which the plan charges to the CPU (`SlotSpec.staging_bytes`).
    """

    def __init__(self, window_bytes: int, pin: bool, devices: Iterable[Device]) -> None:
        buffer_bytes = max(1 << 20, window_bytes // STAGING_BUFFERS)
        self.buffers = [torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(STAGING_BUFFERS)]
        self.events: list[torch.cuda.Event | None] = [None] * STAGING_BUFFERS
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
            free = self._free_buffer()
            staging = self.buffers[free][:count]
            staging.copy_(src[start:start + count])  # the disk read happens here, while earlier DMAs run
            with torch.cuda.stream(stream):
                dst[start:start + count].copy_(staging, non_blocking=True)
                self.events[free] = torch.cuda.Event(blocking=True)  # waited on by sleeping, not spinning
                self.events[free].record(stream)
        landed.record_stream(stream)  # freed (after a cast) only once the side stream is done with it
        if dtype == source.dtype:
            return landed
        result = torch.empty(source.shape, dtype=dtype, device=device)
        with torch.cuda.stream(stream):
            result.copy_(landed)  # the cast runs on the GPU, not in host memory
        result.record_stream(stream)
        return result

    def _free_buffer(self) -> int:
        index = self.next
        self.next = (index + 1) % STAGING_BUFFERS
        event = self.events[index]
        if event is not None:
            event.synchronize()  # the DMA that last read this buffer is done
        return index

    def finish(self) -> None:
        """Wait for every copy, then return the ring's pinned memory to the system."""
        for stream in self.streams.values():
            stream.synchronize()
        self.buffers.clear()
        self.events.clear()
        empty_pinned_cache()


def empty_pinned_cache() -> None:
    """Release the pinned blocks torch's host allocator caches but nobody uses (freed staging rings)."""
    if not torch.cuda.is_initialized():
        return  # nothing was pinned (and the call below refuses to run without a device)
    # The public name (torch >= 2.9), else the one torch.cuda itself calls in older CUDA builds.
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    empty = empty or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()
