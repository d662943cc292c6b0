"""Rank 0's side of the ring: `RemoteStages` stands in the decoder stack for the blocks ranks 1..N-1 run, and
`Pipeline` (`model.bigload_pipeline`) is the handle that reports the ranks' loads and stops them.

The arguments of the model's forward (mask, positions, cache length) are captured by a pre-hook on the base
model and described in the header; only what the other ranks cannot derive is sent (a mask that is the
previous one plus ones is not, nor positions that follow from the cache length or the mask).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bigload.errors import BigloadError, DistributedError
from bigload.plan.hosts import HostPlan
from bigload.distributed.stage import CACHE_KEYS
from bigload.distributed.startup import RankLoad, end_group
from bigload.distributed.wire import Header, Link, MaskKind, Op, PositionKind, positions_from_mask

__all__ = ["Pipeline", "PipelineStats", "RemoteStages", "stop_pipeline"]


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
    and returns what comes back. Once the ring has failed (or was stopped) every call raises at once."""

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
        cache = next((bound.get(k, extra.get(k)) for k in CACHE_KEYS if bound.get(k, extra.get(k)) is not None),
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

    def stop(self) -> None:
        """Send STOP around the ring and wait for it to come back (nothing to do once the ring failed)."""
        if self.broken is not None:
            return
        try:
            self.link.send(Header(Op.STOP))
            self.link.recv_header()
        except DistributedError as error:
            self.broken = str(error)
            raise

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


def _extends(previous: torch.Tensor, mask: torch.Tensor, seq: int) -> bool:
    """`mask` is `previous` plus `seq` columns of ones (what generate appends each step)."""
    width = previous.shape[1]
    return (mask.shape[0] == previous.shape[0] and mask.shape[1] == width + seq
            and torch.equal(mask[:, :width], previous) and bool((mask[:, width:] == 1).all()))


def _position_message(positions: torch.Tensor | None, mask: torch.Tensor | None, seq: int, past: int
                      ) -> tuple[PositionKind, torch.Tensor | None]:
    """How the other ranks get this call's position ids: derived (from the cache or the mask) or sent."""
    if positions is None:
        return PositionKind.NONE, None
    positions = positions.to(torch.int64).cpu()
    if positions.ndim == 2 and torch.equal(positions, torch.arange(past, past + seq).expand_as(positions)):
        return PositionKind.NONE, None
    if mask is not None and positions.ndim == 2 and positions.shape == (mask.shape[0], seq) and torch.equal(
            positions, positions_from_mask(mask.cpu(), seq)):
        return PositionKind.FROM_MASK, None
    if positions.ndim != 2:
        raise DistributedError(f"position ids of shape {tuple(positions.shape)} cannot cross ranks (2-D only).")
    return PositionKind.SENT, positions


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

    def stop(self) -> None:
        """Stop the other ranks (their `from_pretrained` returns) and, if bigload started the process group,
        destroy it. Called at exit when not called before; safe to call twice."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self.remote.stop()  # returns at once when the ring already failed
        finally:
            self.remote.broken = self.remote.broken or "it was stopped (stop_pipeline); load the model again"
            end_group(self.owns_group)


def stop_pipeline(model: nn.Module) -> None:
    """Stop the ranks serving `model`'s other stages (rank 0's model from `from_pretrained(distributed=True)`).

    Raises:
        BigloadError: `model` was not loaded with `distributed=True`.
        DistributedError: a rank did not acknowledge the stop (it died or hangs).
    """
    pipeline = getattr(model, "bigload_pipeline", None)
    if pipeline is None:
        raise BigloadError("this model was not loaded with from_pretrained(distributed=True); nothing to stop.")
    pipeline.stop()
