"""The loader: stream a checkpoint into a model built on meta, each tensor straight to where the plan says.

`load_plan` executes a `Plan` (with the inventory it was made from and the load's `SourceTable`). It checks
the checkpoint against the model first (missing, unexpected and mis-shaped tensors are reported before any
byte is read), then walks the tensors in file order, each by its transfer kind (`transfer.Transfer`):

- CPU, same dtype: the model's tensor becomes the memory-mapped view itself (no copy, no private memory);
- CPU, another dtype: cast tensor by tensor, so private memory grows only by the cast results;
- GPU: copied through a small ring of pinned staging buffers on a side CUDA stream (`gpu.GpuStager`), filling
  one buffer (the read) while the previous one is in flight, and cast on the GPU;
- disk: written into a `DiskStore` in the offload folder (a reference to the safetensors file when nothing
  needs converting); the model's tensor stays on meta, in its final dtype.

The disk is read ahead of the reader thread by several threads at once (`readahead.ReadAhead`: pages read into
the page cache and mapped, at most `window_bytes` ahead, pages already in memory skipped), since one stream of
page faults leaves the disk mostly idle. The bytes of temporaries in flight are capped by `window_bytes` too:
peak private memory is the CPU-resident cast results and requested copies plus that window (or the largest
single tensor, if larger), never a whole shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from bigload.devices import CPU, DeviceKind
from bigload.errors import CheckpointError, OffloadError
from bigload.formats.mapped import CheckpointReader
from bigload.load.folder import check_offload_folder
from bigload.load.gpu import GpuStager
from bigload.load.matching import Group, Mismatch, match, model_groups, report
from bigload.load.quantized import apply_layouts, storage_tags
from bigload.formats.refs import Extent
from bigload.load.readahead import ReadAhead
from bigload.load.sources import SourceTable, parts_of
from bigload.load.store import DiskStore, StoreOrigin, dtype_name
from bigload.load.store_lock import FolderLock
from bigload.load.store_writer import StoreWriter
from bigload.load.transfer import Placer, Task, transfer_kind
from bigload.messages import Setting, Text, setting
from bigload.plan.dtypes import DtypeRule, castable
from bigload.plan.inventory import Inventory
from bigload.plan.value import Plan
from bigload.quant import pin_thread_counts, quantized_linears
from bigload.sizes import format_size

__all__ = ["DEFAULT_WINDOW_BYTES", "LoadResult", "Mismatch", "load_plan"]

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_BYTES = 256 * 2**20
_PROGRESS_MIN_BYTES = 2**30
_MAX_PENDING = 64  # zero-copy tasks cost no window bytes; this bounds the queue of futures instead
# One reader thread overlaps casting with placement; `ReadAhead`'s threads do the I/O and torch's intra-op
# threads already split each cast, so more reader threads would only hold more temporaries.
_READERS = 1


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


def load_plan(model: nn.Module, table: SourceTable, plan: Plan, inventory: Inventory, *,
              offload_folder: str | os.PathLike[str] | None = None, strict: bool = False, materialize: bool = False,
              window_bytes: int = DEFAULT_WINDOW_BYTES, pin_memory: bool | None = None, progress: bool | None = None,
              only: Sequence[str] | None = None, label: object = None) -> LoadResult:
    """Stream `table`'s checkpoint into `model` as `plan` places it, each tensor in the dtype `inventory` gives.

    Args:
        model: built on meta (usually); its tensors are replaced, not copied into.
        table: where each model tensor is (`SourceTable.of(index, sources)`).
        plan: the plan made for this load (`plan`, `plan_for_map`, or one checked with `check_plan`).
        inventory: what the plan was made from (dtypes of every tensor).
        offload_folder: where the plan's disk tensors go (a `DiskStore`; reused when it holds them already).
        strict: missing or unexpected tensors are an error (mis-shaped ones always are).
        materialize: CPU tensors in private memory instead of views of the checkpoint files.
        window_bytes: cap on the bytes of temporaries in flight.
        pin_memory: pin the GPU staging ring; None pins when the plan names a GPU.
        progress: a progress bar over bytes; None shows it for loads over 1 GiB when stderr is a terminal.
        only: load only tensors under these module names (one pipeline stage).
        label: how the checkpoint is named in accelerate's warning (default: its folder).

    Raises:
        CheckpointError, DeviceError, OffloadError: see `integrations.dispatch.load_checkpoint_in_model`.
    """
    apply_layouts(model, plan)
    if quantized_linears(model):
        pin_thread_counts()  # before the reader thread quantizes (see `bigload.quant._one_thread`)
    table.index.check_unchanged()  # an index opened earlier may describe files changed since
    if offload_folder is not None:
        check_offload_folder(offload_folder, table.index.root)  # before anything is written there
    scope = list(only) if only is not None else [""]
    groups = model_groups(model, plan, inventory, scope)
    found = match(table, groups, scope)
    report(found, table, strict, label if label is not None else table.index.root, type(model).__name__)
    disk = [(source, group) for source, group in found.pairs if group.device.kind is DeviceKind.DISK]
    origin = _store_origin(table, disk, _policy_dtype(inventory.rule, groups), inventory.rule, storage_tags(model))
    store, reuse = _prepare_store(offload_folder, origin, disk, table)
    gpus = {group.device for _, group in found.pairs if group.device.is_gpu}
    stager = GpuStager(window_bytes, pin_memory is not False, gpus) if gpus else None
    writer = store if isinstance(store, StoreWriter) else None
    placer = Placer(writer, stager)
    tasks = [Task(source, group, transfer_kind(source, group, reuse, materialize)) for source, group in found.pairs]
    total = sum(task.source.nbytes for task in tasks)
    with CheckpointReader(table.index) as reader, _ProgressBar(total, progress) as advance:
        written = _stream_into(tasks, reader, placer, window_bytes, advance, writer, origin)
    if stager is not None:
        stager.finish()
    _settle_unloaded_buffers(groups, placer.placed)
    return LoadResult(found.missing, found.unexpected, found.mismatched, tuple(placer.offloaded),
                      written if writer is not None else store, total)  # type: ignore[arg-type]  # a reused DiskStore


def _policy_dtype(rule: DtypeRule, groups: Sequence[Group]) -> torch.dtype | None:
    # dtype=None means "the model's dtype": name it, so the same load spelled either way reuses a store.
    return rule.dtype or next((g.original.dtype for g in groups if castable(g.original.dtype)), None)


# ---------------------------------------------------------------------------------------------------------
# the pipeline


def _stream_into(tasks: Sequence[Task], reader: CheckpointReader, placer: Placer, window: int,
                 advance: Callable[[int], None], writer: StoreWriter | None, origin: StoreOrigin) -> DiskStore | None:
    """Run the load; with a store to write, commit it and return its reader."""
    if writer is None:
        _run(tasks, reader, placer, window, advance)
        return None
    with writer:  # an exception removes what was written, and no index is left behind
        _run(tasks, reader, placer, window, advance)
        return writer.commit(origin)


def _run(tasks: Sequence[Task], reader: CheckpointReader, placer: Placer, window: int,
         on_placed: Callable[[int], None]) -> None:
    """Read ahead on threads, place in file order; bytes of unplaced temporaries stay within `window`, and the
    disk is read at most `window` bytes ahead of the reader thread (`ReadAhead`)."""
    pending: deque[tuple[Task, Future[torch.Tensor | None], int]] = deque()
    in_flight = 0
    uses = [[Extent(part.file, part.offset, part.nbytes) for part in parts_of(task.source)] if task.reads else []
            for task in tasks]
    with ReadAhead(reader.populate, uses, window) as ahead, \
            ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="bigload-read") as pool:
        try:
            for position, task in enumerate(tasks):
                cost = task.cost
                while pending and (in_flight + cost > window or len(pending) >= _MAX_PENDING):
                    in_flight -= _place_oldest(pending, placer, reader, on_placed)
                pending.append((task, pool.submit(_prepare_read, ahead, position, reader, task), cost))
                in_flight += cost
            while pending:
                _place_oldest(pending, placer, reader, on_placed)
        finally:
            for _, future, _ in pending:
                future.cancel()


def _prepare_read(ahead: ReadAhead, position: int, reader: CheckpointReader, task: Task) -> torch.Tensor | None:
    ahead.wait(position)  # its bytes in memory first: a cast or copy then never waits on a page fault
    return Placer.prepare(reader, task)


def _place_oldest(pending: deque[tuple[Task, Future[torch.Tensor | None], int]], placer: Placer,
                  reader: CheckpointReader, on_placed: Callable[[int], None]) -> int:
    task, future, cost = pending.popleft()
    placer.place(task, future.result())
    if task.copies:
        reader.release(parts_of(task.source))  # keeps file-backed RSS at the bytes in flight, not the checkpoint
    on_placed(task.source.nbytes)
    return cost


# ---------------------------------------------------------------------------------------------------------
# buffers no checkpoint holds


def _settle_unloaded_buffers(groups: Sequence[Group], placed: set[int]) -> None:
    """Put non-persistent buffers (rotary inv_freq, ...) at their home, recomputing those on meta. A computed
    buffer has no bytes in any store: one whose home is disk stays in CPU memory."""
    rebuilt: dict[int, dict[str, torch.Tensor]] = {}
    for group in groups:
        site = group.sites[0]
        if id(group) in placed or site.is_parameter or group.persistent:
            continue
        tensor = group.original
        if tensor.device.type == "meta":
            fresh = rebuilt.get(id(site.module))
            if fresh is None:
                fresh = rebuilt[id(site.module)] = _rebuild_buffers(site.module, group.names[0])
            if site.attr not in fresh:
                raise _unrebuildable(group.names[0], "re-running its __init__ did not create it")
            tensor = fresh[site.attr]
        device = CPU if group.device.kind is DeviceKind.DISK else group.device
        group.assign(tensor.to(device.torch_device()))


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
# the offload store


def _prepare_store(folder: str | os.PathLike[str] | None, origin: StoreOrigin, disk: Sequence[tuple[object, Group]],
                   table: SourceTable) -> tuple[DiskStore | StoreWriter | None, bool]:
    """A writer for the disk tensors, or the store that already holds them all (reused: nothing is
    written; the bool says so)."""
    if not disk:
        return None, False
    if folder is None:
        raise OffloadError(
            Text(f"the device map sends {len(disk)} tensors (e.g. {disk[0][1].names[0]!r}) to "
                 "'disk' but no ", setting("offload_folder"), " was given; pass ",
                 Setting("offload_folder= a folder", "--offload-folder DIR, a folder"), " on a disk with room for them.")
        )
    path = Path(folder).expanduser().resolve()
    with contextlib.suppress(OSError):  # a folder that cannot be made is reported by the writer
        path.mkdir(parents=True, exist_ok=True)
    # One decision per folder at a time: a load running beside this one writes first, and this one then finds
    # its store (reused, or refused as another scheme) instead of writing over the files it checked.
    with FolderLock(path, doing="loading into"):  # a writer made here holds it on until its commit
        if (path / "index.json").is_file():
            existing = DiskStore.open(path, expect_fingerprint=origin)
            # Another plan of the same load may have sent other tensors to disk: reuse only a store holding all
            # of these, each as it would be written now; rebuild it otherwise.
            if all(_holds(existing, group) for _, group in disk):
                logger.info("reusing the offload store in %s (same checkpoint and dtypes)", path)
                return existing, True
            return StoreWriter(path, overwrite=True), False
        return StoreWriter(path), False


def _holds(store: DiskStore, group: Group) -> bool:
    name = group.names[0]
    if name not in store:
        return False
    meta = store.meta(name)
    return meta.dtype == group.dtype and meta.shape == group.shape


def _store_origin(table: SourceTable, disk: Sequence[tuple[object, Group]], dtype: torch.dtype | None,
                  rule: DtypeRule, quantize: str = "") -> StoreOrigin:
    # The stored bytes depend on the checkpoint, on how tensors are cast (the load's dtype policy) and on the
    # quantization scheme, not on which tensors a plan sends to disk: a store of the same load under another
    # plan is rebuilt in place.
    dtypes = sorted({dtype_name(group.dtype) for _, group in disk})
    policy = dtype_name(dtype) if dtype is not None else "model"
    variant = f"{policy};fp32:{','.join(sorted(rule.keep_in_fp32))}"
    if rule.special:
        variant += ";special:" + ",".join(f"{name}={dtype_name(dtype)}" for name, dtype in rule.special)
    if quantize:
        variant += f";quantize:{quantize}"
    origin = StoreOrigin.of(table.index, None, variant)
    return dataclasses.replace(origin, dtype="/".join(dtypes), quantize=quantize)


# ---------------------------------------------------------------------------------------------------------
# progress


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

