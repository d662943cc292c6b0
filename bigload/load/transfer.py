"""How each tensor gets to its place, decided once per tensor (`transfer_kind`) onto a frozen `Task`, and the
`Placer` that executes the kinds: reads (on the reader thread), places, writes the offload store.

The reading, placing, window cost and page release of the loader all look a task's kind up instead of
re-deriving it from devices and dtypes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from bigload.devices import DeviceKind
from bigload.formats.mapped import CheckpointReader
from bigload.formats.refs import TensorRef
from bigload.load.gpu import GpuStager
from bigload.load.matching import Group
from bigload.load.sources import DerivedTensor, Source, read_source
from bigload.load.store_writer import StoreWriter
from bigload.sizes import dtype_width

__all__ = ["Placer", "Task", "Transfer", "transfer_kind"]


class Transfer(enum.Enum):
    """How one tensor gets to its place.

    VIEW: CPU, same dtype: the model tensor is the memory-mapped view itself (no private memory).
    CPU_CAST: CPU, private memory: a cast, a built (derived) tensor, or a copy asked for (`materialize`).
    GPU_STAGE: to a GPU through the pinned staging ring (cast there).
    STORE_WRITE: into the offload store as raw bytes (cast while writing).
    STORE_REFERENCE: an offload-store entry pointing into the safetensors file (nothing written).
    STORE_REUSED: the offload store already holds it (nothing read, nothing written).
    """

    VIEW = "view"
    CPU_CAST = "cpu_cast"
    GPU_STAGE = "gpu_stage"
    STORE_WRITE = "store_write"
    STORE_REFERENCE = "store_reference"
    STORE_REUSED = "store_reused"


# Kinds that copy the tensor's bytes out of the checkpoint file: its pages can be released once placed.
COPIES = frozenset({Transfer.CPU_CAST, Transfer.GPU_STAGE, Transfer.STORE_WRITE})
# Kinds whose bytes are never read while loading: the store has them, or will point into the file.
UNREAD = frozenset({Transfer.STORE_REUSED, Transfer.STORE_REFERENCE})
_STORED = frozenset({Transfer.STORE_WRITE, Transfer.STORE_REFERENCE, Transfer.STORE_REUSED})


def transfer_kind(source: Source, group: Group, reuse_store: bool, materialize: bool) -> Transfer:
    """The one decision of how `source` reaches `group`'s home in `group`'s dtype."""
    derived = isinstance(source, DerivedTensor)
    if group.device.kind is DeviceKind.DISK:
        if reuse_store:
            return Transfer.STORE_REUSED
        referenced = (not derived and source.format == "safetensors" and source.stride is None  # type: ignore[union-attr]
                      and source.dtype == group.dtype)
        return Transfer.STORE_REFERENCE if referenced else Transfer.STORE_WRITE
    if group.device.is_gpu:
        return Transfer.GPU_STAGE
    return Transfer.CPU_CAST if derived or source.dtype != group.dtype or materialize else Transfer.VIEW


@dataclass(frozen=True)
class Task:
    """Read `source` (or build it from its parts) and put it into `group`, as `kind` says."""

    source: Source
    group: Group
    kind: Transfer

    @property
    def reads(self) -> bool:
        """Whether its bytes are read from the checkpoint (a store entry may need none)."""
        return self.kind not in UNREAD

    @property
    def copies(self) -> bool:
        """Whether placing it copies its bytes out of the file, so no tensor views them afterwards."""
        return self.kind in COPIES

    @property
    def cost(self) -> int:
        """Private bytes reading (or, for disk, writing) allocates for it until it is placed."""
        source, group, kind = self.source, self.group, self.kind
        if kind is Transfer.STORE_REUSED:
            return 0
        cast_bytes = group.original.numel() * dtype_width(group.dtype)
        if isinstance(source, DerivedTensor):
            return source.size_bytes + (cast_bytes if kind is Transfer.CPU_CAST and source.dtype != group.dtype else 0)
        if source.stride is not None:
            return source.size_bytes  # strided .bin views are made contiguous first
        # Views cost nothing; disk casts go through the store's small reused buffer; GPU casts run on the GPU.
        return cast_bytes if kind is Transfer.CPU_CAST else 0


@dataclass
class Placer:
    """Executes each task's transfer kind: reads (on the reader thread), places, writes the store."""

    store: StoreWriter | None  # None when nothing is written (no disk tensors, or a reused store)
    stager: GpuStager | None
    offloaded: list[str] = field(default_factory=list)
    placed: set[int] = field(default_factory=set)  # ids of the groups placed so far

    @staticmethod
    def prepare(reader: CheckpointReader, task: Task) -> torch.Tensor | None:
        """Read (and for the CPU, cast) one tensor; runs on the reader thread."""
        kind = task.kind
        if kind in UNREAD:
            return None  # nothing to read: the store already has it, or will point into the file
        tensor = read_source(reader, task.source)
        if kind is Transfer.GPU_STAGE:
            return tensor.contiguous()  # a copy only for the rare strided .bin view
        if kind is not Transfer.CPU_CAST:
            return tensor  # a view (VIEW), or bytes the store casts while writing (STORE_WRITE)
        if tensor.dtype != task.group.dtype:
            return tensor.to(task.group.dtype)
        # A derived tensor is already private memory; a plain read is a view of the file: copy it (materialize).
        return tensor if isinstance(task.source, DerivedTensor) else tensor.clone()

    def place(self, task: Task, tensor: torch.Tensor | None) -> None:
        """Put the prepared tensor where the task's kind says (on the caller's thread, in file order)."""
        group, kind = task.group, task.kind
        if kind in _STORED:
            self._offload(task, tensor)
        elif kind is Transfer.GPU_STAGE:
            assert self.stager is not None and tensor is not None  # set up whenever the plan names a GPU
            group.assign(self.stager.copy(tensor, group.device.torch_device(), group.dtype))
        else:
            assert tensor is not None  # CPU tasks always read
            group.assign(tensor)
        self.placed.add(id(group))

    def _offload(self, task: Task, tensor: torch.Tensor | None) -> None:
        group, name = task.group, task.group.names[0]
        if task.kind is Transfer.STORE_REFERENCE:
            assert self.store is not None and isinstance(task.source, TensorRef)  # created whenever disk is used
            self.store.put_reference(name, task.source)
        elif task.kind is Transfer.STORE_WRITE:
            assert self.store is not None and tensor is not None
            self.store.put(name, tensor, dtype=group.dtype)
        group.assign(torch.empty(group.shape, dtype=group.dtype, device="meta"))
        self.offloaded.extend(group.names)
