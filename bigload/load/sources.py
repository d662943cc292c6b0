"""Where each model tensor's bytes are in a checkpoint, computed once per load.

The loader stays format-agnostic: whoever knows a conversion (`integrations.hf`, from transformers' conversion
mapping; `integrations.adapters`, for peft's saved names; quantized Linears, built from their float weight)
says, for the model tensors concerned, which checkpoint tensor holds each one (a `TensorRef` under another
name) or how to build it from several (`DerivedTensor`): a `TensorSources`. `SourceTable.of(index, sources)`
turns that into the one table a load reads: model name -> source, in the order the checkpoint's files hold
the bytes. The inventory takes its stored dtypes from it, the loader its tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

import torch

from bigload.formats.refs import CheckpointIndex, TensorRef
from bigload.formats.mapped import CheckpointReader
from bigload.sizes import dtype_width

__all__ = ["DerivedTensor", "Source", "SourceTable", "TensorSources", "parts_of", "read_source"]


@dataclass(frozen=True)
class DerivedTensor:
    """A model tensor the checkpoint holds in pieces (e.g. one tensor per MoE expert), built while loading.

    Attributes:
        name: the model tensor's name.
        shape, dtype: what `build` returns (before any cast to the load dtype).
        parts: the checkpoint tensors it is built from, in the order `build` receives them.
        build: called on the reader thread with the parts (CPU tensors in their stored dtype and shape,
            usually memory-mapped views); returns the tensor. Only one derived tensor's parts and result are
            in memory at a time.
        how: what `build` does, for messages (e.g. "stack 8 experts, then concatenate").
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[TensorRef, ...]
    build: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    how: str = ""

    @property
    def nbytes(self) -> int:
        """Checkpoint bytes read to build it."""
        return sum(part.nbytes for part in self.parts)

    @property
    def size_bytes(self) -> int:
        """Bytes of the built tensor."""
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * dtype_width(self.dtype)


Source = Union[TensorRef, DerivedTensor]


def parts_of(source: Source) -> tuple[TensorRef, ...]:
    """The checkpoint tensors a source reads."""
    return source.parts if isinstance(source, DerivedTensor) else (source,)


def read_source(reader: CheckpointReader, source: Source) -> torch.Tensor:
    """The source's tensor: its bytes mapped (a view) or, for a derived tensor, built from its parts."""
    if isinstance(source, DerivedTensor):
        return source.build([reader.read(part) for part in source.parts])
    return reader.read(source)


@dataclass(frozen=True)
class TensorSources:
    """Where model tensors are in a checkpoint whose names (or layout) differ from the model's.

    Attributes:
        tensors: model tensor name -> the `TensorRef` or `DerivedTensor` to load it from.
        ignored: checkpoint tensors the model does not use by design (a task head when loading the base
            model, stale buffers of old checkpoints); neither loaded nor reported as unexpected.
    """

    tensors: Mapping[str, Source] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset()

    def with_tensors(self, tensors: Mapping[str, Source]) -> "TensorSources":
        """These sources plus `tensors` (which win for a name in both)."""
        return TensorSources({**self.tensors, **tensors}, self.ignored)


@dataclass(frozen=True)
class SourceTable:
    """Every model tensor a checkpoint can fill, with its source, in the order its files hold the bytes (a
    derived tensor at its first part); checkpoint tensors other entries' names shadow (unexpected)."""

    index: CheckpointIndex
    tensors: Mapping[str, Source]
    shadowed: tuple[str, ...] = ()

    @staticmethod
    def of(index: CheckpointIndex, sources: TensorSources | None = None) -> "SourceTable":
        """The table of `index` read through `sources` (None: every tensor under its own name)."""
        if sources is None:
            return SourceTable(index, dict(index.tensors))
        consumers: dict[str, list[str]] = {}  # checkpoint name -> model names built from it (a fused qkv: 3)
        for name, source in sources.tensors.items():
            for part in parts_of(source):
                consumers.setdefault(part.name, []).append(name)
        table: dict[str, Source] = {}
        shadowed: list[str] = []
        for checkpoint_name, ref in index.tensors.items():
            if checkpoint_name in sources.ignored:
                continue
            if checkpoint_name in consumers:
                for name in consumers[checkpoint_name]:
                    table.setdefault(name, sources.tensors[name])
            elif checkpoint_name in sources.tensors:
                shadowed.append(checkpoint_name)
            else:
                table[checkpoint_name] = ref
        return SourceTable(index, table, tuple(shadowed))

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """Model tensor name -> the dtype its bytes have (for the inventory's dtype decisions)."""
        return {name: source.dtype for name, source in self.tensors.items()}
