"""What crosses between pipeline ranks, and how: a fixed-size header, then the tensors it announces.

Every message around the ring is an int64 header of `HEADER_LEN` numbers, so a receiver always knows how
many bytes come next and in which shapes:

    magic, op, batch, seq, past, dtype, hidden, mask, positions, position_rows, remote_ns, origin

then, in this order and only when the header says so: the 2-D attention mask (batch x (past + seq), int64),
the position ids (position_rows x seq, int64), and the hidden states (batch x seq x hidden, dtype). An ERROR
carries the failing rank in `origin` and a UTF-8 message of `seq` bytes instead.

`Link` sends to the next rank and receives from the previous one with `torch.distributed` point-to-point
calls (`isend`/`irecv` + `wait(timeout)`), so no wait is unbounded: a peer that died surfaces as an error at
once (its connection closes), one that hangs as an error after the timeout, both naming the rank. gloo
raises from `isend`/`irecv` themselves, not only from `wait`, once a connection has closed, so posting and
waiting are one guarded step: every failure of the link is a `DistributedError`.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.distributed as dist

from bigload.errors import DistributedError

__all__ = ["Header", "Link", "MaskKind", "Op", "PositionKind", "HEADER_LEN", "positions_from_mask"]

HEADER_LEN = 12
_MAGIC = 0x6269676C  # "bigl": a header from another program, or a misaligned stream, is refused


class Op(enum.IntEnum):
    """What a message asks the stages to do."""

    PREFILL = 1  # a new sequence: stages drop their KV cache first
    DECODE = 2  # more tokens of the current sequence
    STOP = 4  # stop serving
    ERROR = 5  # a rank failed; the message says why


class MaskKind(enum.IntEnum):
    NONE = 0  # no attention mask: the model's causal default
    FULL = 1  # the whole 2-D mask follows
    EXTEND = 2  # the previous mask plus `seq` columns of ones (what generate appends each step)


class PositionKind(enum.IntEnum):
    NONE = 0  # the model derives positions from its cache length
    FROM_MASK = 1  # generate's rule (`positions_from_mask`)
    SENT = 2  # the position ids follow


def positions_from_mask(mask: torch.Tensor, seq: int) -> torch.Tensor:
    """generate's positions for a padded batch: cumsum(mask) - 1, 0 where masked; the last `seq` columns."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -seq:]


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class Header:
    """The fixed-size part of a message (see the module docstring)."""

    op: Op
    batch: int = 0
    seq: int = 0
    past: int = 0
    dtype: torch.dtype = torch.float32
    hidden: int = 0
    mask: MaskKind = MaskKind.NONE
    positions: PositionKind = PositionKind.NONE
    position_rows: int = 0
    remote_ns: int = 0  # compute time the stages spent on this message so far
    origin: int = 0  # the rank an ERROR comes from

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([_MAGIC, int(self.op), self.batch, self.seq, self.past, _DTYPES.index(self.dtype),
                             self.hidden, int(self.mask), int(self.positions), self.position_rows, self.remote_ns,
                             self.origin], dtype=torch.int64)

    @staticmethod
    def from_tensor(values: torch.Tensor, sender: int) -> "Header":
        v = [int(x) for x in values.tolist()]
        try:
            if v[0] != _MAGIC or not 0 <= v[5] < len(_DTYPES):
                raise ValueError("magic or dtype")
            return Header(Op(v[1]), v[2], v[3], v[4], _DTYPES[v[5]], v[6], MaskKind(v[7]), PositionKind(v[8]),
                          v[9], v[10], v[11])
        except ValueError:  # a wrong magic or dtype, or an op, mask or position kind this version lacks
            raise DistributedError(
                f"rank {sender} sent something that is not a bigload pipeline header; every rank must run the "
                "same bigload version and nothing else may use this process group's point-to-point channel.",
                rank=sender) from None

    def with_remote(self, extra_ns: int) -> "Header":
        return replace(self, remote_ns=self.remote_ns + extra_ns)


class Link:
    """This rank's two ends of the ring: receive from `prev`, send to `next`.

    Args:
        rank, world: this rank and the number of ranks.
        timeout: seconds any wait inside an operation may take.
        device: where tensors cross (the CPU for gloo; this rank's GPU for NCCL).
        group: the process group carrying the tensors (None: the default one).
    """

    def __init__(self, rank: int, world: int, *, timeout: float, device: torch.device = torch.device("cpu"),
                 group: object = None) -> None:
        self.rank = rank
        self.prev = (rank - 1) % world
        self.next = (rank + 1) % world
        self.timeout = timeout
        self.device = device
        self.group = group

    # -- sending ---------------------------------------------------------------------------------

    def send(self, header: Header, *tensors: torch.Tensor) -> None:
        """Send a header and the tensors it announces to the next rank."""
        for tensor in (header.to_tensor(), *tensors):
            payload = tensor.to(self.device).contiguous()
            self._complete(lambda: dist.isend(payload, dst=self.next, group=self.group), self.next, "send to",
                           self.timeout)

    def send_error(self, origin: int, message: str) -> None:
        """Tell the next rank that `origin` failed; best effort (the next rank may be the one that died, and
        then this fails at once or within the timeout, silently: the caller raises its own error)."""
        data = torch.tensor(list(message.encode()[:4000]), dtype=torch.uint8)
        try:
            self.send(Header(Op.ERROR, seq=data.numel(), origin=origin), data)
        except DistributedError:
            pass

    # -- receiving -------------------------------------------------------------------------------

    def recv_header(self, timeout: float | None = None) -> Header:
        """The next header from the previous rank; an ERROR header raises `DistributedError` naming its origin.

        Args:
            timeout: seconds to wait (default: the link's); serving ranks wait longer between requests.
        """
        values = self._recv(torch.empty(HEADER_LEN, dtype=torch.int64), self.timeout if timeout is None else timeout)
        header = Header.from_tensor(values, self.prev)
        if header.op is Op.ERROR:
            message = bytes(self._recv(torch.empty(header.seq, dtype=torch.uint8), self.timeout).tolist()).decode(
                errors="replace")
            raise DistributedError(f"rank {header.origin} failed: {message}", rank=header.origin) from None
        return header

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """One tensor announced by the last header."""
        return self._recv(torch.empty(shape, dtype=dtype, device=self.device), self.timeout)

    def _recv(self, buffer: torch.Tensor, timeout: float) -> torch.Tensor:
        self._complete(lambda: dist.irecv(buffer, src=self.prev, group=self.group), self.prev, "receive from",
                       timeout)
        return buffer

    def _complete(self, post: Callable[[], Any], peer: int, what: str, timeout: float) -> None:
        """Post one point-to-point operation and wait for it, at most `timeout` seconds.

        Raises:
            DistributedError: naming `peer`, whether the post or the wait failed.
        """
        try:
            post().wait(timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as error:  # torch.distributed's DistError types are RuntimeErrors too
            raise _failure(self.rank, peer, what, timeout, error) from None


def _failure(rank: int, peer: int, what: str, timeout: float, error: BaseException) -> DistributedError:
    """The `DistributedError` for a failed exchange between `rank` and `peer`, saying why in plain words."""
    text = str(error)
    if "pair closure" in text:  # gloo closed the pair after an earlier timeout on it
        why = "the connection was closed after an earlier wait timed out"
    elif "imed out" in text or "timeout" in text.lower():
        why = f"no answer within {timeout:g} s (the process hangs or was stopped)"
    else:
        why = "its connection closed (the process died)"
    first = text.splitlines()[0][:200] if text else type(error).__name__
    return DistributedError(f"rank {rank} could not {what} rank {peer}: {why}. Check rank {peer}'s log; the "
                            f"pipeline stops here. ({first})", rank=peer)
