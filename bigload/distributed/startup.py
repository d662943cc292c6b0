"""Starting a pipeline: the process group, each rank's budget, the link hidden states cross, and the per-rank
load figures rank 0 reports.

Every rank runs these in the same order (collectives must match); a failure of one rank reaches the others as
a failed collective and becomes a `DistributedError` there too.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from bigload.devices import Budget
from bigload.errors import DistributedError
from bigload.integrations.hf import inventory_for
from bigload.plan.budget import detect_budget, parse_max_memory
from bigload.plan.hosts import HostPlan, plan_hosts
from bigload.distributed.stage import entry_device
from bigload.distributed.wire import Link

__all__ = ["RankLoad", "choose_backend", "end_group", "gather_loads", "local_budget", "open_link",
           "plan_model_hosts", "rank_budget", "start_group"]

logger = logging.getLogger("bigload")


# ---------------------------------------------------------------------------------------------------------
# the process group


def start_group(timeout: float) -> tuple[int, int, bool]:
    """(rank, world size, whether bigload started the process group). torchrun's environment tells where.

    Raises:
        DistributedError: not under torchrun (no RANK / WORLD_SIZE), or the ranks did not all meet within
            `timeout` seconds (how many arrived when that is known, and the fix).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise DistributedError(
            "distributed=True needs torchrun (or RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set): e.g. "
            "`torchrun --nnodes 2 --nproc-per-node 1 --rdzv-endpoint HOST:29500 script.py`.")
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as error:  # DistStoreError, DistNetworkError, gloo's own
        raise _start_failure(error, timeout) from None
    return dist.get_rank(), dist.get_world_size(), True


def _start_failure(error: BaseException, timeout: float) -> DistributedError:
    """What went wrong while the ranks met, in the environment's terms. Only rank 0, which hosts the
    rendezvous store, learns how many ranks arrived (torch says "2/3 clients joined")."""
    env = {key: os.environ.get(key, "?") for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    text = str(error)
    where = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    if "address already in use" in text.lower():
        fix = f"{where} is taken by another program; pick a free port (torchrun --master-port)"
    else:
        joined = re.search(r"(\d+)/(\d+) clients joined", text)
        arrived = f"only {joined[1]} of {joined[2]} ranks arrived; " if joined else ""
        fix = (f"{arrived}start every rank (torchrun's --nnodes x --nproc-per-node must equal WORLD_SIZE="
               f"{env['WORLD_SIZE']}), each able to reach {where}")
    first = text.splitlines()[0][:200] if text else type(error).__name__
    return DistributedError(f"rank {env['RANK']}: the ranks did not all meet within {timeout:g} s: {fix}. "
                            f"({type(error).__name__}: {first})")


def end_group(owns_group: bool) -> None:
    """Destroy the process group if bigload started it (a caller's own group is left alone). Best effort:
    it runs while an error from a failed rank is on its way up, which must not be replaced by torch's."""
    if owns_group and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError as error:
            logger.warning("destroying the process group: %s", str(error).splitlines()[0][:200])


# ---------------------------------------------------------------------------------------------------------
# budgets and the dry run


def rank_budget(max_memory: Mapping[Any, Any] | None, max_memory_hosts: Mapping[int, Mapping[Any, Any]] | None,
                rank: int) -> Budget | None:
    """The budget a rank plans with: its `max_memory_hosts` entry, else `max_memory` (None: detect)."""
    chosen = (max_memory_hosts or {}).get(rank, max_memory)
    return None if chosen is None else parse_max_memory(chosen)


def local_budget(max_memory: Mapping[Any, Any] | None, max_memory_hosts: Mapping[int, Mapping[Any, Any]] | None,
                 rank: int) -> Budget:
    """This rank's budget: given, else this machine's free memory shared between the ranks on it (each local
    rank gets its own GPUs when there are enough, and an equal share of the CPU memory)."""
    given = rank_budget(max_memory, max_memory_hosts, rank)
    if given is not None:
        return given
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    detected = detect_budget(None)
    gpus = list(detected.gpus)
    limits: dict[Any, int] = {}
    for device, nbytes in detected:
        if device.is_gpu and len(gpus) >= local_world and gpus.index(device) % local_world != local_rank:
            continue
        limits[device.key] = nbytes // local_world if device.key == "cpu" else nbytes
    return Budget.of(limits)


def plan_model_hosts(spec: str | Path, hosts: int, *, max_memory: Mapping[Any, Any] | None = None,
                     max_memory_hosts: Mapping[int, Mapping[Any, Any]] | None = None, strategy: str = "auto",
                     dtype: torch.dtype | str | None = None, context_length: int | None = None,
                     batch_size: int = 1, no_split_module_classes: list[str] | None = None,
                     prefetch: int = 1, policy: Any = None) -> HostPlan:
    """A dry run over `hosts` ranks: which blocks each owns and where they go on it. Reads no weight.

    Args:
        spec: a catalog name, model folder, config.json or checkpoint (as `bigload plan`).
        hosts: how many ranks.
        max_memory: every host's budget (None: this machine's, for each host).
        max_memory_hosts: rank -> budget, for hosts that differ.
        strategy, dtype, context_length, batch_size, no_split_module_classes, prefetch, policy: as
            `plan_model`, for every host.

    Raises:
        PlanError: the model cannot be split over `hosts`, or a host's part does not fit.
    """
    inventory = inventory_for(spec, dtype=dtype, no_split_module_classes=no_split_module_classes)
    budgets = [rank_budget(max_memory, max_memory_hosts, rank) or detect_budget(None) for rank in range(hosts)]
    return plan_hosts(inventory, budgets, strategy=strategy, dtype=inventory.dtype, context_length=context_length,
                      batch_size=batch_size, prefetch=prefetch, policy=policy)


# ---------------------------------------------------------------------------------------------------------
# the link hidden states cross


def choose_backend(host_plan: HostPlan, hostnames: Sequence[str]) -> str:
    """"nccl" when every rank's blocks run on a GPU and no two ranks of one machine share a GPU (NCCL refuses
    that), else "gloo" (hidden states cross through CPU memory)."""
    seen: set[tuple[str, int]] = set()
    for rank, host in enumerate(hostnames):
        device = entry_device(host_plan, rank)
        if not device.is_gpu or (host, device.index) in seen or not dist.is_nccl_available():
            return "gloo"
        seen.add((host, device.index))
    return "nccl"


def open_link(host_plan: HostPlan, hostnames: Sequence[str], rank: int, timeout: float) -> Link:
    """This rank's link over the chosen backend (a NCCL group is made on every rank, as it must be)."""
    world = len(hostnames)
    if choose_backend(host_plan, hostnames) == "nccl":
        device = entry_device(host_plan, rank).torch_device()
        torch.cuda.set_device(device)
        try:
            group = dist.new_group(backend="nccl", timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as error:
            raise DistributedError(f"rank {rank}: the NCCL group for hidden states could not be made "
                                   f"({str(error).splitlines()[0][:200]}); see the other ranks' errors.") from None
        return Link(rank, world, timeout=timeout, device=device, group=group)
    return Link(rank, world, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------
# per-rank load figures


@dataclass(frozen=True)
class RankLoad:
    """One rank's load: seconds, bytes the loader read, the checkpoint files it opened, its blocks."""

    rank: int
    seconds: float
    bytes_read: int
    files: tuple[str, ...]
    blocks: str


def gather_loads(load: RankLoad, world: int) -> tuple[RankLoad, ...]:
    """Every rank's `RankLoad`, on every rank (rank 0 reports them).

    Raises:
        DistributedError: another rank failed while loading (it reports its own error).
    """
    gathered: list[Any] = [None] * world
    try:
        dist.all_gather_object(gathered, asdict(load))
    except RuntimeError as error:
        raise DistributedError(f"rank {load.rank} loaded its blocks but another rank failed while loading "
                               f"({str(error).splitlines()[0][:200]}); see that rank's error.") from None
    return tuple(RankLoad(**{**entry, "files": tuple(entry["files"])}) for entry in gathered)
