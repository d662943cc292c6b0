"""Ranks 1..N-1: `StageServer` runs the rank's blocks for every message that comes around the ring, with the
rank's own KV cache, until rank 0 sends STOP.

The hidden state from the wire replaces the first owned block's input (a forward pre-hook placed before
bigload's own hooks, which then move it to the block's device); the base model's forward runs with the
rebuilt mask and positions and this rank's KV cache, so the model's own code builds the causal mask and the
rotary embeddings exactly as on rank 0.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch
from torch import nn

from bigload.devices import Device
from bigload.errors import DistributedError
from bigload.plan.hosts import HostSplit, Stage
from bigload.distributed.stage import CACHE_KEYS, base_model
from bigload.distributed.wire import Header, Link, MaskKind, Op, PositionKind, positions_from_mask

__all__ = ["StageServer"]


def _stage_cache(config: Any, first: int) -> Any:
    """A DynamicCache whose length questions about layers this rank does not own are answered by its first
    owned layer (transformers asks layer 0 for the sequence length and the mask sizes)."""
    from transformers import DynamicCache  # optional dependency: importing bigload does not import transformers

    class StageCache(DynamicCache):
        def get_seq_length(self, layer_idx: int = 0) -> int:
            return super().get_seq_length(first)

        def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
            return super().get_mask_sizes(query_length, first)

        def get_query_offset(self, layer_idx: int = 0) -> int:
            return super().get_query_offset(first)

    return StageCache(config=config)


class StageServer:
    """Runs one rank's blocks for every message that comes around the ring, until STOP (see the module
    docstring). Any failure is sent on as an ERROR naming the failing rank, then raised."""

    def __init__(self, model: nn.Module, split: HostSplit, stage: Stage, link: Link, *, idle_timeout: float,
                 device: Device) -> None:
        self.device = device.torch_device()
        self.base = base_model(model, split)
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
        self.cache_key = next(k for k in CACHE_KEYS if k in params)

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
                if header.op is Op.STOP:
                    self.cache, self.mask = None, None
                    self.link.send(header)
                    return
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
            self.cache = _stage_cache(self.config, int(self.stage.first_layer))
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
            return positions_from_mask(mask, header.seq)
        return None
