"""A model split across `torch.distributed` ranks (launched by `torchrun`), each rank streaming only its part.

The pipeline, on every rank from the same inputs:

1. build the whole model on meta (no memory) and inventory it;
2. agree: every rank sends a fingerprint of its plan inputs (config, checkpoint listing, options) and its
   memory budget; different inputs stop every rank with an error naming the rank;
3. plan: `hosts.plan_hosts` (pure) splits the decoder blocks into one contiguous range per rank (rank 0 also
   holds the embeddings, final norm and head) and plans each rank's part on that rank's budget;
4. cut: the rank's model keeps only its blocks (other ranks' decoder blocks are removed from the stack, other
   modules become `Elsewhere` placeholders holding no tensor), and on rank 0 a `RemoteStages` module takes the
   place of the blocks other ranks run;
5. load: only the shards holding the rank's tensors are opened (`open_checkpoint(select=...)`) and streamed
   (`load_checkpoint_and_dispatch(..., only=...)`) to the places the rank's plan says, with bigload's hooks.

At run time rank 0 runs `generate` as usual; when the hidden state reaches `RemoteStages` it goes around the
ring (`wire.Link`: a fixed header, then the tensors) through ranks 1..N-1, each of which runs its blocks with
its own KV cache (caches never move) and rebuilds mask, positions and rotary embeddings with the model's own
code from what the header carries. Ranks other than 0 serve inside `from_pretrained` until rank 0 stops the
pipeline. Control and hidden states travel over gloo on the CPU; every wait has a timeout.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import inspect
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bigload.devices import Budget, Device
from bigload.errors import BigloadError, DistributedError, PlanError
from bigload.plan.hosts import HostPlan, HostSplit, Stage, plan_hosts
from bigload.distributed.wire import Header, Link, MaskKind, Op, PositionKind

__all__ = [
    "Elsewhere",
    "Pipeline",
    "RankLoad",
    "StageServer",
    "choose_backend",
    "cut_to_stage",
    "entry_device",
    "RemoteStages",
    "from_pretrained_distributed",
    "plan_model_hosts",
    "rank_budget",
    "stop_pipeline",
]

logger = logging.getLogger("bigload")

_CACHE_KEYS = ("cache", "past_key_values")  # the KV cache's keyword: transformers 5.24 renamed it


# ---------------------------------------------------------------------------------------------------------
# budgets and the dry run


def rank_budget(max_memory: Mapping[Any, Any] | None, max_memory_hosts: Mapping[int, Mapping[Any, Any]] | None,
                rank: int) -> Budget | None:
    """The budget a rank plans with: its `max_memory_hosts` entry, else `max_memory` (None: detect)."""
    from bigload.plan.budget import parse_max_memory

    chosen = (max_memory_hosts or {}).get(rank, max_memory)
    return None if chosen is None else parse_max_memory(chosen)


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
    from bigload.plan.budget import detect_budget
    from bigload.integrations.hf import inventory_for

    inventory = inventory_for(spec, dtype=dtype, no_split_module_classes=no_split_module_classes)
    budgets = [rank_budget(max_memory, max_memory_hosts, rank) or detect_budget(None) for rank in range(hosts)]
    return plan_hosts(inventory, budgets, strategy=strategy, dtype=inventory.dtype, context_length=context_length,
                      batch_size=batch_size, prefetch=prefetch, policy=policy)


# ---------------------------------------------------------------------------------------------------------
# model surgery: what a rank keeps


class Elsewhere(nn.Module):
    """Stands for a module whose weights live on another rank; holds no tensor.

    When the model's own forward still calls it on this rank (GPT-2 adds position embeddings before the
    first block; every model applies its final norm after the last), it returns its input when the real
    module's output would have the input's shape and dtype (a norm), else zeros of the real output's shape
    (an embedding). Either way the stage's first block then receives the hidden state from the wire, so the
    value never reaches a computation. Shapes come from running the real module on meta tensors.
    """

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.__dict__["_meta"] = module.to("meta")  # not a submodule: no tensors, no state-dict entries
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        to_meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v  # noqa: E731
        out = self._meta(*map(to_meta, args), **{k: to_meta(v) for k, v in kwargs.items()})
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        if not isinstance(out, torch.Tensor) or first is None:
            raise DistributedError(f"{self.name} runs on another rank and its output here cannot be stood for.")
        if first.shape == out.shape and first.dtype == out.dtype:
            return first
        return torch.zeros(out.shape, dtype=out.dtype, device=first.device)

    def extra_repr(self) -> str:
        return f"{self.name} (on another rank)"


def _container(model: nn.Module, split: HostSplit) -> tuple[str, nn.Module]:
    name = split.layers[0].rpartition(".")[0]
    return name, model.get_submodule(name)


def _base_model(model: nn.Module, split: HostSplit) -> nn.Module:
    """The module whose forward runs the decoder stack (the stack's container's parent)."""
    return model.get_submodule(_container(model, split)[0].rpartition(".")[0])


def cut_to_stage(model: nn.Module, split: HostSplit, stage: Stage) -> None:
    """Keep only `stage`'s blocks in `model` (meta): other decoder blocks leave the stack (the rest keep
    their names, so device-map keys and checkpoint names still match), other ends become `Elsewhere`."""
    container_name, container = _container(model, split)
    owned = set(split.layers[stage.first_layer:stage.end_layer])
    container._modules = OrderedDict(
        (key, module) for key, module in container._modules.items() if f"{container_name}.{key}" in owned)
    for name in split.ends:
        if name not in stage.blocks:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, Elsewhere(model.get_submodule(name), name))


def _check_layer_types(model: nn.Module) -> None:
    kinds = getattr(getattr(model, "config", None), "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(set(kinds)) > 1:
        raise PlanError(
            f"{type(model).__name__} mixes layer kinds ({', '.join(sorted(set(map(str, kinds))))}); its masks are "
            "chosen by position in the stack, which a split stack no longer keeps. Run it on one host."
        )


# ---------------------------------------------------------------------------------------------------------
# rank 0: the blocks other ranks run


@dataclass
class PipelineStats:
    """What rank 0 saw of the ring: calls, tokens, and time on the wire (total minus the stages' compute)."""

    prefill_calls: int = 0
    decode_calls: int = 0
    decode_comm_seconds: float = 0.0
    prefill_comm_seconds: float = 0.0
    remote_compute_seconds: float = 0.0

    @property
    def comm_seconds_per_token(self) -> float:
        """Communication time per decoded token (the wire, both ways, all hops)."""
        return self.decode_comm_seconds / self.decode_calls if self.decode_calls else float("nan")


class RemoteStages(nn.Module):
    """On rank 0, in place of the decoder blocks ranks 1..N-1 run: sends the hidden state around the ring
    and returns what comes back. The arguments of the model's forward (mask, positions, cache length) are
    captured by a pre-hook on the base model, and described in the header."""

    def __init__(self, link: Link, hidden: int) -> None:
        super().__init__()
        self.link = link
        self.hidden = hidden
        self.stats = PipelineStats()
        self._call: dict[str, Any] = {}
        self._mask: torch.Tensor | None = None
        self.broken: str | None = None

    def capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook on the base model: remember this call's mask, positions and cache length."""
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        cache = next((bound.get(k, extra.get(k)) for k in _CACHE_KEYS if bound.get(k, extra.get(k)) is not None),
                     None)
        self._call = {"mask": bound.get("attention_mask"), "positions": bound.get("position_ids"),
                      "past": cache.get_seq_length() if cache is not None else 0}

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.broken is not None:
            raise DistributedError(f"the pipeline is stopped: {self.broken}")
        start = time.perf_counter()
        batch, seq, _ = hidden_states.shape
        past = int(self._call.get("past", 0))
        mask_kind, mask = self._mask_message(self._call.get("mask"), seq, past)
        pos_kind, positions = _position_message(self._call.get("positions"), self._mask, seq, past)
        header = Header(Op.PREFILL if past == 0 else Op.DECODE, batch, seq, past, hidden_states.dtype, self.hidden,
                        mask_kind, pos_kind, 0 if positions is None else positions.shape[0])
        try:
            self.link.send(header, *(t for t in (mask, positions, hidden_states.detach()) if t is not None))
            back = self.link.recv_header()
            out = self.link.recv((batch, seq, self.hidden), hidden_states.dtype)
        except DistributedError as error:
            self.broken = str(error)
            raise
        self._account(header.op, time.perf_counter() - start, back.remote_ns)
        return out.to(hidden_states.device)

    def _mask_message(self, mask: torch.Tensor | None, seq: int, past: int
                      ) -> tuple[MaskKind, torch.Tensor | None]:
        previous, self._mask = self._mask, None if mask is None else mask.to(torch.int64)
        if self._mask is None:
            return MaskKind.NONE, None
        if self._mask.ndim != 2 or self._mask.shape[1] != past + seq:
            self._mask = None
            raise DistributedError(
                f"an attention mask of shape {tuple(mask.shape)} cannot cross ranks: it must be 2-D, one column per "
                f"token so far ({past} cached + {seq} new).")
        if past > 0 and previous is not None and _extends(previous, self._mask, seq):
            return MaskKind.EXTEND, None
        return MaskKind.FULL, self._mask

    def _account(self, op: Op, seconds: float, remote_ns: int) -> None:
        comm = max(seconds - remote_ns / 1e9, 0.0)
        self.stats.remote_compute_seconds += remote_ns / 1e9
        if op is Op.DECODE:
            self.stats.decode_calls += 1
            self.stats.decode_comm_seconds += comm
        else:
            self.stats.prefill_calls += 1
            self.stats.prefill_comm_seconds += comm

    def control(self, op: Op) -> None:
        """Send RESET or STOP around the ring and wait for it to come back."""
        if self.broken is not None:
            return
        try:
            self.link.send(Header(op))
            self.link.recv_header()
        except DistributedError as error:
            self.broken = str(error)
            raise


def _extends(previous: torch.Tensor, mask: torch.Tensor, seq: int) -> bool:
    """`mask` is `previous` plus `seq` columns of ones (what generate appends each step)."""
    width = previous.shape[1]
    return (mask.shape[0] == previous.shape[0] and mask.shape[1] == width + seq
            and torch.equal(mask[:, :width], previous) and bool((mask[:, width:] == 1).all()))


def _positions_from_mask(mask: torch.Tensor, seq: int) -> torch.Tensor:
    """generate's positions for a padded batch: cumsum(mask) - 1, 0 where masked; the last `seq` columns."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -seq:]


def _position_message(positions: torch.Tensor | None, mask: torch.Tensor | None, seq: int, past: int
                      ) -> tuple[PositionKind, torch.Tensor | None]:
    """How the other ranks get this call's position ids: derived (from the cache or the mask) or sent."""
    if positions is None:
        return PositionKind.NONE, None
    positions = positions.to(torch.int64).cpu()
    if positions.ndim == 2 and torch.equal(positions, torch.arange(past, past + seq).expand_as(positions)):
        return PositionKind.NONE, None
    if mask is not None and positions.ndim == 2 and positions.shape == (mask.shape[0], seq) and torch.equal(
            positions, _positions_from_mask(mask.cpu(), seq)):
        return PositionKind.FROM_MASK, None
    if positions.ndim != 2:
        raise DistributedError(f"position ids of shape {tuple(positions.shape)} cannot cross ranks (2-D only).")
    return PositionKind.SENT, positions


# ---------------------------------------------------------------------------------------------------------
# where hidden states cross


def entry_device(host_plan: HostPlan, rank: int) -> Device:
    """Where rank `rank`'s first block runs: the hidden state it receives goes there."""
    split, plan = host_plan.split, host_plan.plans[rank]
    layer = split.layers[split.stages[rank].first_layer]
    owners = [p for p in plan.placements if p.name == "" or layer == p.name or layer.startswith(p.name + ".")]
    return max(owners, key=lambda p: len(p.name)).execution_device


def choose_backend(host_plan: HostPlan, hostnames: Sequence[str]) -> str:
    """"nccl" when every rank's blocks run on a GPU and no two ranks of one machine share a GPU (NCCL refuses
    that), else "gloo" (hidden states cross through CPU memory)."""
    import torch.distributed as dist

    seen: set[tuple[str, int]] = set()
    for rank, host in enumerate(hostnames):
        device = entry_device(host_plan, rank)
        if not device.is_gpu or (host, device.index) in seen or not dist.is_nccl_available():
            return "gloo"
        seen.add((host, device.index))
    return "nccl"


def _link(host_plan: HostPlan, hostnames: Sequence[str], rank: int, timeout: float) -> Link:
    """This rank's link over the chosen backend (a NCCL group is made on every rank, as it must be)."""
    import torch.distributed as dist

    world = len(hostnames)
    if choose_backend(host_plan, hostnames) == "nccl":
        device = entry_device(host_plan, rank).torch_device()
        torch.cuda.set_device(device)
        group = dist.new_group(backend="nccl", timeout=datetime.timedelta(seconds=timeout))
        return Link(rank, world, timeout=timeout, device=device, group=group)
    return Link(rank, world, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------
# ranks 1..N-1: serving a stage


class _StageCache:
    """A DynamicCache whose length questions about layers this rank does not own are answered by its first
    owned layer (transformers asks layer 0 for the sequence length and the mask sizes)."""

    @staticmethod
    def build(config: Any, first: int) -> Any:
        from transformers import DynamicCache

        class StageCache(DynamicCache):
            def get_seq_length(self, layer_idx: int = 0) -> int:
                return super().get_seq_length(first)

            def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
                return super().get_mask_sizes(query_length, first)

            def get_query_offset(self, layer_idx: int = 0) -> int:
                return super().get_query_offset(first)

        return StageCache(config=config)


class StageServer:
    """Runs one rank's blocks for every message that comes around the ring, until STOP.

    The hidden state from the wire replaces the first owned block's input (a forward pre-hook placed before
    bigload's own hooks, which then move it to the block's device); the base model's forward runs with the
    rebuilt mask and positions and this rank's KV cache, so the model's own code builds the causal mask and
    the rotary embeddings exactly as on rank 0.
    """

    def __init__(self, model: nn.Module, split: HostSplit, stage: Stage, link: Link, *, idle_timeout: float,
                 device: Device) -> None:
        self.device = device.torch_device()
        self.base = _base_model(model, split)
        self.config = model.config
        self.stage = stage
        self.link = link
        self.idle_timeout = idle_timeout
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.incoming: torch.Tensor | None = None
        first = model.get_submodule(split.layers[stage.first_layer])
        first.register_forward_pre_hook(self._inject, with_kwargs=True, prepend=True)
        params = inspect.signature(self.base.forward).parameters
        self.cache_key = next(k for k in _CACHE_KEYS if k in params)
        self.compute_seconds = 0.0

    def _inject(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (self.incoming, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.incoming}

    def serve(self) -> None:
        """Answer messages until STOP; a failure here is sent on as an ERROR naming this rank, then raised."""
        while True:
            try:
                header = self.link.recv_header(timeout=self.idle_timeout)
            except DistributedError as error:
                self.link.send_error(self.link.rank if error.rank is None else error.rank, str(error))
                raise
            try:
                if header.op is Op.STOP or header.op is Op.RESET:
                    self.cache, self.mask = None, None
                    self.link.send(header)
                    if header.op is Op.STOP:
                        return
                    continue
                self._step(header)
            except DistributedError as error:
                self.link.send_error(self.link.rank if error.rank is None else error.rank, str(error))
                raise
            except Exception as error:  # anything a stage's forward raises must reach rank 0, not hang it
                message = f"{type(error).__name__}: {error}"
                self.link.send_error(self.link.rank, message)
                raise DistributedError(f"rank {self.link.rank} failed: {message}", rank=self.link.rank) from error

    def _step(self, header: Header) -> None:
        mask = self._mask(header)
        positions = self._positions(header, mask)
        self.incoming = self.link.recv((header.batch, header.seq, header.hidden), header.dtype)
        if header.op is Op.PREFILL or self.cache is None:
            self.cache = _StageCache.build(self.config, int(self.stage.first_layer))
        if self.cache.get_seq_length() != header.past:
            raise DistributedError(
                f"rank {self.link.rank} holds {self.cache.get_seq_length()} cached tokens but rank 0 is at "
                f"{header.past}; beam search and edited caches are not supported across ranks.")
        start = time.perf_counter_ns()
        self.incoming = self.incoming.to(self.device)
        to_device = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        with torch.inference_mode():
            out = self.base(inputs_embeds=self.incoming, attention_mask=to_device(mask),
                            position_ids=to_device(positions), use_cache=True,
                            **{self.cache_key: self.cache}).last_hidden_state
        spent = time.perf_counter_ns() - start
        self.compute_seconds += spent / 1e9
        self.incoming = None
        self._forward(header.with_remote(spent), mask, positions, out)

    def _forward(self, header: Header, mask: torch.Tensor | None, positions: torch.Tensor | None,
                 out: torch.Tensor) -> None:
        if self.link.next == 0:  # back to rank 0: it needs only the hidden state
            self.link.send(Header(header.op, header.batch, header.seq, header.past, header.dtype, header.hidden,
                                  remote_ns=header.remote_ns), out)
            return
        sent_mask = mask if header.mask is MaskKind.FULL else None
        sent_positions = positions if header.positions is PositionKind.SENT else None
        self.link.send(header, *(t for t in (sent_mask, sent_positions, out) if t is not None))

    def _mask(self, header: Header) -> torch.Tensor | None:
        if header.mask is MaskKind.NONE:
            self.mask = None
        elif header.mask is MaskKind.FULL:
            self.mask = self.link.recv((header.batch, header.past + header.seq), torch.int64)
        elif self.mask is None:
            raise DistributedError(f"rank {self.link.rank} was told to extend an attention mask it never got.")
        else:
            ones = torch.ones((header.batch, header.seq), dtype=torch.int64, device=self.mask.device)
            self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask

    def _positions(self, header: Header, mask: torch.Tensor | None) -> torch.Tensor | None:
        if header.positions is PositionKind.SENT:
            return self.link.recv((header.position_rows, header.seq), torch.int64)
        if header.positions is PositionKind.FROM_MASK and mask is not None:
            return _positions_from_mask(mask, header.seq)
        return None


# ---------------------------------------------------------------------------------------------------------
# startup: process group, agreement, per-rank load figures


@dataclass(frozen=True)
class RankLoad:
    """One rank's load: seconds, bytes the loader read, the checkpoint files it opened, its blocks."""

    rank: int
    seconds: float
    bytes_read: int
    files: tuple[str, ...]
    blocks: str


@dataclass
class Pipeline:
    """Rank 0's handle on the ring (`model.bigload_pipeline`): per-rank loads, wire statistics, stop()."""

    plan: HostPlan
    loads: tuple[RankLoad, ...]
    remote: RemoteStages
    owns_group: bool
    ready_seconds: float = 0.0  # from the ranks agreeing on their inputs to every rank loaded
    stopped: bool = False

    @property
    def stats(self) -> PipelineStats:
        return self.remote.stats

    def reset(self) -> None:
        """Drop the KV caches on every rank (they are rebuilt by the next prefill anyway)."""
        self.remote.control(Op.RESET)

    def stop(self) -> None:
        """Stop the other ranks (their `from_pretrained` returns) and, if bigload started the process group,
        destroy it. Called at exit when not called before; safe to call twice."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self.remote.control(Op.STOP)  # returns at once when the ring already failed
        finally:
            self.remote.broken = self.remote.broken or "it was stopped (stop_pipeline); load the model again"
            _end_group(self.owns_group)


def stop_pipeline(model: nn.Module) -> None:
    """Stop the ranks serving `model`'s other stages (rank 0's model from `from_pretrained(distributed=True)`)."""
    pipeline = getattr(model, "bigload_pipeline", None)
    if pipeline is None:
        raise BigloadError("this model was not loaded with from_pretrained(distributed=True); nothing to stop.")
    pipeline.stop()


def _start_group(timeout: float) -> tuple[int, int, bool]:
    """(rank, world size, whether bigload started the process group). torchrun's environment tells where."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise DistributedError(
            "distributed=True needs torchrun (or RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set): e.g. "
            "`torchrun --nnodes 2 --nproc-per-node 1 --rdzv-endpoint HOST:29500 script.py`.")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size(), True


def _end_group(owns_group: bool) -> None:
    import torch.distributed as dist

    if owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _fingerprint(folder: Path, checkpoint: Path, options: Mapping[str, Any]) -> dict[str, str]:
    """Short digests of what every rank must share: config.json, the checkpoint's listing (file names and
    sizes; no mtimes, which differ between copies) and the planning options."""
    shards = checkpoint if checkpoint.is_dir() else checkpoint.parent
    listing = sorted((p.name, p.stat().st_size) for p in shards.iterdir()
                     if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    digest = lambda value: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]  # noqa: E731
    config = (folder / "config.json").read_text() if (folder / "config.json").is_file() else ""
    return {"config.json": digest(config), "checkpoint files": digest(listing), "options": digest(dict(options))}


def _agree(rank: int, world: int, fingerprint: Mapping[str, str], budget: Budget
           ) -> tuple[list[Budget], list[str]]:
    """Exchange fingerprints, budgets and host names; raise on every rank when a rank's inputs differ from
    rank 0's."""
    import torch.distributed as dist

    mine = {"fingerprint": dict(fingerprint), "budget": [(d.key, n) for d, n in budget],
            "host": socket.gethostname()}
    gathered: list[Any] = [None] * world
    try:
        dist.all_gather_object(gathered, mine)
    except RuntimeError as error:
        raise DistributedError(f"rank {rank}: the ranks could not exchange their plan inputs at start "
                               f"({str(error).splitlines()[0][:200]}); a rank did not start or died.") from None
    for other, entry in enumerate(gathered):
        differing = [key for key, value in entry["fingerprint"].items() if gathered[0]["fingerprint"].get(key) != value]
        if differing:
            raise DistributedError(
                f"rank {other}'s {' and '.join(differing)} differ from rank 0's; every rank must get the same model "
                "folder and the same options (only a host's budget may differ, through --max-memory-host / "
                "max_memory_hosts).", rank=other)
    return [Budget.of(dict(entry["budget"])) for entry in gathered], [entry["host"] for entry in gathered]


def _local_budget(max_memory: Mapping[Any, Any] | None, max_memory_hosts: Mapping[int, Mapping[Any, Any]] | None,
                  rank: int) -> Budget:
    """This rank's budget: given, else this machine's free memory shared between the ranks on it."""
    from bigload.plan.budget import detect_budget

    given = rank_budget(max_memory, max_memory_hosts, rank)
    if given is not None:
        return given
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    detected = detect_budget(None)
    gpus = [d for d in detected.gpus]
    limits: dict[Any, int] = {}
    for device, nbytes in detected:
        if device.is_gpu and len(gpus) >= local_world and gpus.index(device) % local_world != local_rank:
            continue
        limits[device.key] = nbytes // local_world if device.key == "cpu" else nbytes
    return Budget.of(limits)


def _gather_loads(load: RankLoad, world: int) -> tuple[RankLoad, ...]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    try:
        dist.all_gather_object(gathered, asdict(load))
    except RuntimeError as error:
        raise DistributedError(f"rank {load.rank} loaded its blocks but another rank failed while loading "
                               f"({str(error).splitlines()[0][:200]}); see that rank's error.") from None
    return tuple(RankLoad(**{**entry, "files": tuple(entry["files"])}) for entry in gathered)


# ---------------------------------------------------------------------------------------------------------
# the entry point


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
    rank, world, owns_group = _start_group(timeout)
    try:
        model, host_plan, load, hostnames, agreed = _load_stage(
            path, rank, world, model_class=model_class, max_memory=max_memory, max_memory_hosts=max_memory_hosts,
            strategy=strategy, dtype=dtype, offload_folder=offload_folder, context_length=context_length,
            batch_size=batch_size, strict=strict, progress=progress, prefetch=prefetch,
            no_split_module_classes=no_split_module_classes, policy=policy)
        loads = _gather_loads(load, world)
        link = _link(host_plan, hostnames, rank, timeout)
    except BaseException:
        _end_group(owns_group)
        raise
    split = host_plan.split
    if rank != 0:
        try:
            StageServer(model, split, split.stages[rank], link, idle_timeout=idle_timeout,
                        device=entry_device(host_plan, rank)).serve()
        finally:
            _end_group(owns_group)
        return None
    pipeline = Pipeline(host_plan, loads, _attach_remote(model, split, link), owns_group,
                        ready_seconds=time.perf_counter() - agreed)
    model.bigload_pipeline = pipeline  # type: ignore[assignment]
    atexit.register(_stop_quietly, pipeline)
    return model


def _attach_remote(model: nn.Module, split: HostSplit, link: Link) -> RemoteStages:
    """Rank 0: a `RemoteStages` after its own blocks in the stack, fed by a pre-hook on the base model."""
    remote = RemoteStages(link, int(model.config.hidden_size))
    _, container = _container(model, split)
    container._modules["remote"] = remote
    _base_model(model, split).register_forward_pre_hook(remote.capture, with_kwargs=True)
    return remote


def _stop_quietly(pipeline: Pipeline) -> None:
    try:
        pipeline.stop()
    except DistributedError as error:
        logger.warning("stopping the pipeline at exit: %s", error)


def _load_stage(path: str | Path, rank: int, world: int, *, model_class: Any, max_memory: Any,
                max_memory_hosts: Any, strategy: str, dtype: Any, offload_folder: Any, context_length: int | None,
                batch_size: int, strict: bool, progress: bool, prefetch: int,
                no_split_module_classes: list[str] | None, policy: Any
                ) -> tuple[nn.Module, HostPlan, RankLoad, list[str], float]:
    """Steps 1-5 of the module docstring on this rank: meta model, agreement, plans, cut, load."""
    from bigload.formats.discover import open_checkpoint
    from bigload.integrations.loading import load_checkpoint_and_dispatch
    from bigload.integrations.hf import checkpoint_sources, load_generation_config, meta_model_for_folder
    from bigload.plan.dtypes import default_keep_in_fp32_modules
    from bigload.plan.inventory import inventory_from_module

    model, target, checkpoint = meta_model_for_folder(path, model_class=model_class, dtype=dtype)
    _check_layer_types(model)
    keep_fp32 = default_keep_in_fp32_modules(model, target)
    inventory = inventory_from_module(model, dtype=target, no_split_module_classes=no_split_module_classes,
                                      keep_in_fp32_modules=keep_fp32)
    options = {"dtype": str(target), "strategy": strategy, "context_length": context_length, "world": world,
               "batch_size": batch_size, "prefetch": prefetch, "no_split": no_split_module_classes,
               "max_memory": max_memory, "max_memory_hosts": max_memory_hosts, "strict": strict,
               "model_class": getattr(model_class, "__name__", model_class), "policy": str(policy)}
    budgets, hostnames = _agree(rank, world, _fingerprint(Path(path), checkpoint, options),
                                _local_budget(max_memory, max_memory_hosts, rank))
    agreed = time.perf_counter()
    host_plan = plan_hosts(inventory, budgets, strategy=strategy, dtype=target, context_length=context_length,
                           batch_size=batch_size, prefetch=prefetch, policy=policy)
    stage = host_plan.split.stages[rank]
    index = open_checkpoint(checkpoint, select=_stage_selector(model, checkpoint, stage))
    cut_to_stage(model, host_plan.split, stage)
    start = time.perf_counter()
    load_checkpoint_and_dispatch(
        model, index, device_map=host_plan.plans[rank], dtype=target, strict=strict, prefetch=prefetch,
        offload_folder=offload_folder, progress=progress, keep_in_fp32_modules=keep_fp32,
        sources=checkpoint_sources(model, index), only=stage.modules)
    seconds = time.perf_counter() - start
    load_generation_config(model, path)
    span = host_plan.split.layers[stage.first_layer:stage.end_layer]
    load = RankLoad(rank, seconds, model.bigload_load.bytes_read, tuple(p.name for p in index.files),
                    f"{span[0]}..{span[-1].rpartition('.')[2]}" if len(span) > 1 else span[0])
    return model.eval(), host_plan, load, hostnames, agreed


def _stage_selector(model: nn.Module, checkpoint: Path, stage: Stage) -> Any:
    """Which checkpoint tensors this stage loads (by the model names they load into): decided from the
    shard index's names alone, so shards holding none are never opened."""
    from bigload.formats.discover import checkpoint_tensor_names
    from bigload.integrations.hf import model_tensor_names

    prefixes = tuple(name + "." for name in stage.modules)
    mapping = model_tensor_names(model, checkpoint_tensor_names(checkpoint))
    wanted = frozenset(key for key, name in mapping.items() if name.startswith(prefixes))
    return wanted.__contains__
