"""What a checkpoint holds, from headers only: the data behind `bigload inspect`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigload.formats.refs import CheckpointIndex
from bigload.plan.headers import block_of, inventory_from_checkpoint
from bigload.sizes import format_size

__all__ = ["CheckpointSummary", "format_count", "summarize"]


@dataclass(frozen=True)
class CheckpointSummary:
    """Totals of a checkpoint index. Every byte figure is the tensors' own byte length."""

    root: Path
    format: str
    shards: tuple[tuple[str, int], ...]  # (file name, bytes of tensor data in it)
    tensor_count: int
    parameter_count: int
    total_bytes: int
    dtypes: tuple[tuple[str, int, int], ...]  # (dtype, tensor count, bytes), largest first
    largest: tuple[tuple[str, str, tuple[int, ...], int], ...]  # (name, dtype, shape, bytes)
    blocks: tuple[tuple[str, int, int], ...]  # (planned unit, tensor count, bytes), in planning order

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "format": self.format,
            "shards": [{"file": name, "bytes": size} for name, size in self.shards],
            "tensor_count": self.tensor_count,
            "parameter_count": self.parameter_count,
            "total_bytes": self.total_bytes,
            "dtypes": [{"dtype": d, "tensors": n, "bytes": b} for d, n, b in self.dtypes],
            "largest": [{"name": n, "dtype": d, "shape": list(s), "bytes": b} for n, d, s, b in self.largest],
            "blocks": [{"name": n, "tensors": c, "bytes": b} for n, c, b in self.blocks],
        }

    def render(self) -> str:
        """A human report, as `bigload inspect` prints it."""
        lines = [
            f"checkpoint  {self.root}",
            f"format      {self.format}, {len(self.shards)} file(s), {self.tensor_count} tensors, "
            f"{format_count(self.parameter_count)} parameters, {format_size(self.total_bytes)}",
            "",
            "shards:",
        ]
        lines += [f"  {name:<48} {format_size(size):>12}" for name, size in self.shards]
        lines += ["", "dtypes:"]
        lines += [f"  {d:<16} {n:>8} tensors {format_size(b):>12}" for d, n, b in self.dtypes]
        lines += ["", "largest tensors:"]
        lines += [f"  {n:<56} {d:<10} {str(list(s)):<20} {format_size(b):>12}" for n, d, s, b in self.largest]
        lines += ["", f"blocks (planned units): {len(self.blocks)}"]
        lines += [f"  {n:<48} {c:>6} tensors {format_size(b):>12}" for n, c, b in _elide(self.blocks)]
        return "\n".join(lines)


def format_count(count: int) -> str:
    """A parameter count as people write it: 6.3M, 8.03B, 405B (thousand, million, billion); small ones exact.

    >>> format_count(6_291_456), format_count(8_030_261_248), format_count(950)
    ('6.29M', '8.03B', '950')
    """
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(count)


def _elide(rows: tuple[tuple[str, int, int], ...], keep: int = 6) -> list[tuple[str, int, int]]:
    """First and last rows of a long list, with one '...' row standing for the middle."""
    if len(rows) <= 2 * keep + 1:
        return list(rows)
    middle = rows[keep:-keep]
    return [*rows[:keep], (f"... {len(middle)} more", sum(r[1] for r in middle), sum(r[2] for r in middle)),
            *rows[-keep:]]


def summarize(index: CheckpointIndex, *, top: int = 10) -> CheckpointSummary:
    """Summarize a checkpoint index (no tensor data is read).

    Args:
        index: from `open_checkpoint`.
        top: how many of the largest tensors to list.
    """
    per_file: Counter[Path] = Counter()
    dtype_count: Counter[str] = Counter()
    dtype_bytes: Counter[str] = Counter()
    block_count: Counter[str] = Counter()
    block_bytes: Counter[str] = Counter()
    params = 0
    for ref in index.tensors.values():
        per_file[ref.file] += ref.nbytes
        dtype = str(ref.dtype).removeprefix("torch.")
        dtype_count[dtype] += 1
        dtype_bytes[dtype] += ref.nbytes
        params += ref.numel
        block = block_of(ref.name)
        block_count[block] += 1
        block_bytes[block] += ref.nbytes
    largest = sorted(index.tensors.values(), key=lambda r: (-r.nbytes, r.name))[:top]
    # Blocks in the order the planner walks them (embeddings first, head last), not shard order.
    position = {name: i for i, name in enumerate(inventory_from_checkpoint(index).names)} if index.tensors else {}
    blocks = sorted(block_count, key=lambda name: position.get(name, len(position)))
    return CheckpointSummary(
        root=index.root,
        format=index.format,
        shards=tuple((_name(path, index.root), per_file[path]) for path in index.files),
        tensor_count=len(index.tensors),
        parameter_count=params,
        total_bytes=sum(per_file.values()),
        dtypes=tuple(sorted(((d, dtype_count[d], dtype_bytes[d]) for d in dtype_count), key=lambda r: -r[2])),
        largest=tuple((r.name, str(r.dtype).removeprefix("torch."), r.shape, r.nbytes) for r in largest),
        blocks=tuple((name, block_count[name], block_bytes[name]) for name in blocks),
    )


def _name(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
