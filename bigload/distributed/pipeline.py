"""A model split across `torch.distributed` ranks (launched by `torchrun`), each rank streaming only its part:
the entry point `from_pretrained_distributed`.

The pipeline, on every rank from the same inputs:

1. build the whole model on meta (no memory) and inventory it;
2. agree (`agreement`): every rank sends a fingerprint of its plan inputs (config, checkpoint, options) and
   its memory budget; different inputs stop every rank with an error naming the rank;
3. plan: `hosts.plan_hosts` (pure) splits the decoder blocks into one contiguous range per rank (rank 0 also
   holds the embeddings, final norm and head) and plans each rank's part on that rank's budget;
4. cut (`stage`): the rank's model keeps only its blocks, placeholders stand for the rest;
5. load: only the shards holding the rank's tensors are opened (`open_checkpoint(select=...)`) and streamed
   (`load_checkpoint_and_dispatch(..., only=...)`) to the places the rank's plan says, with bigload's hooks.

At run time rank 0 runs `generate` as usual; when the hidden state reaches `remote.RemoteStages` it goes
around the ring (`wire.Link`: a fixed header, then the tensors) through ranks 1..N-1, each of which runs its
blocks with its own KV cache (`server.StageServer`; caches never move) and rebuilds mask, positions and rotary
embeddings with the model's own code from what the header carries. Ranks other than 0 serve inside
`from_pretrained` until rank 0 stops the pipeline. Control and hidden states travel over gloo on the CPU (or
NCCL between distinct GPUs); every wait has a timeout.
"""

from __future__ import annotations

import atexit
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from bigload.formats.discover import open_checkpoint
from bigload.errors import DistributedError
from bigload.integrations.loading import load_checkpoint_and_dispatch
from bigload.integrations.hf import checkpoint_sources, load_generation_config, meta_model_for_folder
from bigload.plan.hosts import HostPlan, HostSplit, Stage, plan_hosts
from bigload.plan.inventory import Inventory, inventory_from_module
from bigload.plan.dtypes import default_keep_in_fp32_modules
from bigload.distributed.agreement import agree, fingerprint
from bigload.distributed.remote import Pipeline, RemoteStages
from bigload.distributed.server import StageServer
from bigload.distributed.stage import base_model, check_layer_types, cut_to_stage, entry_device, stack_of, \
    stage_selector
from bigload.distributed.startup import RankLoad, end_group, gather_loads, local_budget, open_link, start_group
from bigload.distributed.wire import Link

__all__ = ["from_pretrained_distributed"]

logger = logging.getLogger("bigload")


@dataclass(frozen=True)
class _Options:
    """What every rank is called with besides the folder (all of it must agree across ranks, except budgets
    given per rank through `max_memory_hosts`)."""

    model_class: Any
    max_memory: Mapping[Any, Any] | None
    max_memory_hosts: Mapping[int, Mapping[Any, Any]] | None
    strategy: str
    dtype: torch.dtype | str | None
    offload_folder: str | Path | None
    context_length: int | None
    batch_size: int
    strict: bool
    progress: bool
    prefetch: int
    no_split_module_classes: list[str] | None
    policy: Any

    def planning(self, target: torch.dtype, world: int) -> dict[str, Any]:
        """The options that change any rank's plan or load: fingerprinted and compared across ranks."""
        return {"dtype": str(target), "strategy": self.strategy, "context_length": self.context_length,
                "world": world, "batch_size": self.batch_size, "prefetch": self.prefetch,
                "no_split": self.no_split_module_classes, "max_memory": self.max_memory,
                "max_memory_hosts": self.max_memory_hosts, "strict": self.strict,
                "model_class": getattr(self.model_class, "__name__", self.model_class), "policy": str(self.policy)}


@dataclass(frozen=True)
class _Loaded:
    """One rank after steps 1-5: its cut and loaded model, the agreed plan, its load figures."""

    model: nn.Module
    host_plan: HostPlan
    load: RankLoad
    hostnames: list[str]
    agreed: float  # perf_counter when the ranks agreed on their inputs


def from_pretrained_distributed(
    path: str | Path,
    *,
    model_class: Any = None,
    max_memory: Mapping[Any, Any] | None = None,
    max_memory_hosts: Mapping[int, Mapping[Any, Any]] | None = None,
    strategy: str = "auto",
    dtype: torch.dtype | str | None = None,
    offload_folder: str | Path | None = None,
    context_length: int | None = None,
    batch_size: int = 1,
    strict: bool = True,
    progress: bool = True,
    prefetch: int = 1,
    no_split_module_classes: list[str] | None = None,
    policy: Any = None,
    timeout: float = 300.0,
    idle_timeout: float = 3600.0,
) -> nn.Module | None:
    """Load a model folder split over the ranks of `torchrun`; rank 0 gets the model, the others serve.

    Every rank must call it with the same arguments (checked: a rank given another folder or other options
    stops every rank with an error naming it). Each rank opens only the shards holding its blocks.

    Args:
        path: a Hugging Face model folder (decoder-only models).
        max_memory: each rank's budget (None: what its machine has free, shared between its local ranks).
        max_memory_hosts: rank -> budget, for ranks that differ.
        strategy: the planning strategy inside each rank ("auto", "balanced", "sequential", ...).
        offload_folder: where ranks put their disk-offloaded weights: each rank in its own subfolder
            `rank-N`, so local ranks can share one folder (each rank's store holds only its own blocks, and
            is reused by the next load with the same split; another split is refused, naming the shards).
        timeout: seconds any wait inside an operation may take (also the process group's timeout).
        idle_timeout: seconds a serving rank waits for rank 0's next request before giving up.
        The other arguments are `bigload.from_pretrained`'s.

    Returns:
        On rank 0 the model (`generate` works unchanged; `model.bigload_pipeline` has per-rank load figures
        and wire statistics; `bigload.stop_pipeline(model)` releases the other ranks, as exit does). On other
        ranks None, once rank 0 has stopped the pipeline.

    Raises:
        DistributedError: not under torchrun, ranks given different inputs, a rank that died or did not answer
            within the timeout, a stage that failed (the message names the rank).
        PlanError, CheckpointError, OffloadError: as `from_pretrained`, on the rank concerned.
    """
    options = _Options(model_class, max_memory, max_memory_hosts, strategy, dtype, offload_folder, context_length,
                       batch_size, strict, progress, prefetch, no_split_module_classes, policy)
    rank, world, owns_group = start_group(timeout)
    try:
        loaded = _load_stage(Path(path), rank, world, options)
        loads = gather_loads(loaded.load, world)
        link = open_link(loaded.host_plan, loaded.hostnames, rank, timeout)
    except BaseException:
        end_group(owns_group)
        raise
    split = loaded.host_plan.split
    if rank != 0:
        try:
            StageServer(loaded.model, split, split.stages[rank], link, idle_timeout=idle_timeout,
                        device=entry_device(loaded.host_plan, rank)).serve()
        finally:
            end_group(owns_group)
        return None
    model = loaded.model
    pipeline = Pipeline(loaded.host_plan, loads, _attach_remote(model, split, link), owns_group,
                        ready_seconds=time.perf_counter() - loaded.agreed)
    model.bigload_pipeline = pipeline  # type: ignore[assignment]
    atexit.register(_stop_quietly, pipeline)
    return model


def _attach_remote(model: nn.Module, split: HostSplit, link: Link) -> RemoteStages:
    """Rank 0: a `RemoteStages` after its own blocks in the stack, fed by a pre-hook on the base model."""
    remote = RemoteStages(link, int(model.config.hidden_size))
    _, container = stack_of(model, split)
    container._modules["remote"] = remote
    base_model(model, split).register_forward_pre_hook(remote.capture, with_kwargs=True)
    return remote


def _stop_quietly(pipeline: Pipeline) -> None:
    try:
        pipeline.stop()
    except DistributedError as error:
        logger.warning("stopping the pipeline at exit: %s", error)


def _load_stage(path: Path, rank: int, world: int, options: _Options) -> _Loaded:
    """Steps 1-5 of the module docstring on this rank: meta model, agreement, plans, cut, load."""
    model, target, checkpoint = meta_model_for_folder(path, model_class=options.model_class, dtype=options.dtype)
    check_layer_types(model)
    keep_fp32 = default_keep_in_fp32_modules(model, target)
    inventory = inventory_from_module(model, dtype=target, no_split_module_classes=options.no_split_module_classes,
                                      keep_in_fp32_modules=keep_fp32)
    budgets, hostnames = agree(rank, world, fingerprint(path, checkpoint, options.planning(target, world)),
                               local_budget(options.max_memory, options.max_memory_hosts, rank))
    agreed = time.perf_counter()
    host_plan = _plan(inventory, budgets, target, options)
    stage = host_plan.split.stages[rank]
    index = open_checkpoint(checkpoint, select=stage_selector(model, checkpoint, stage))
    cut_to_stage(model, host_plan.split, stage)
    start = time.perf_counter()
    load_checkpoint_and_dispatch(
        model, index, device_map=host_plan.plans[rank], dtype=target, strict=options.strict,
        prefetch=options.prefetch, offload_folder=_rank_folder(options.offload_folder, rank),
        progress=options.progress, keep_in_fp32_modules=keep_fp32, sources=checkpoint_sources(model, index),
        only=stage.modules)
    seconds = time.perf_counter() - start
    load_generation_config(model, path)
    load = RankLoad(rank, seconds, model.bigload_load.bytes_read, tuple(p.name for p in index.files),
                    _blocks(host_plan.split, stage))
    return _Loaded(model.eval(), host_plan, load, hostnames, agreed)


def _rank_folder(offload_folder: str | Path | None, rank: int) -> Path | None:
    """This rank's part of the offload folder: ranks on one machine may be given the same folder, and each
    rank's store (its blocks, fingerprinted from its own shards) must not replace another's."""
    return None if offload_folder is None else Path(offload_folder) / f"rank-{rank}"


def _plan(inventory: Inventory, budgets: list[Any], target: torch.dtype, options: _Options) -> HostPlan:
    return plan_hosts(inventory, budgets, strategy=options.strategy, dtype=target,
                      context_length=options.context_length, batch_size=options.batch_size,
                      prefetch=options.prefetch, policy=options.policy)


def _blocks(split: HostSplit, stage: Stage) -> str:
    """`model.layers.0..3`: the stage's decoder blocks, for the load report."""
    span = split.layers[stage.first_layer:stage.end_layer]
    return f"{span[0]}..{span[-1].rpartition('.')[2]}" if len(span) > 1 else span[0]
