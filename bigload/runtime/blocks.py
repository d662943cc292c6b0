"""The plan's entries as the runtime runs them: per block, the offloaded tensors it brings in (where each comes
from, where it goes in a slot, where it is registered) and the placeholder each leaves behind.

`build_blocks` reads the plan: an entry's placement, where it runs, and each tensor's home
(`Plan.home_of`): tensors kept where the block runs (the buffers of offloaded blocks, unless
`offload_buffers`) are put there for good; the others become entries of the block, brought in per forward.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from bigload.devices import Device, DeviceKind
from bigload.errors import OffloadError, PlanError
from bigload.plan.reserve import aligned, slot_alignment, slot_bytes
from bigload.plan.value import Placement, Plan
from bigload.runtime.placeholders import home_of_source, make_placeholder
from bigload.runtime.weights import HostWeights, WeightSource
from bigload.sizes import dtype_width
from bigload.tensors import Registration, Site, TensorGroup, owner_of, tensor_groups

__all__ = ["Block", "Entry", "build_blocks"]


@dataclass(frozen=True)
class Entry:
    """One offloaded tensor of a block: where it comes from, where it goes in the slot, where it is used."""

    key: str  # its name in the weight source (tied tensors: whichever alias the source holds)
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # byte offset in the block's slot
    sites: tuple[Site, ...]
    placeholder: torch.Tensor  # the meta tensor put back when the block is released
    source: WeightSource
    registration: Registration  # how the sites held the tensor before it was offloaded

    @functools.cached_property
    def nbytes(self) -> int:
        # Cached: the prefetcher asks for it on every load, and the answer never changes.
        return math.prod(self.shape) * dtype_width(self.dtype)

    def registered(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as this entry's sites hold it (`tensors.Registration`)."""
        return self.registration.wrap(tensor)


@dataclass(frozen=True)
class Block:
    """A device-map entry as the runtime sees it."""

    name: str
    placed: Device
    execution_device: torch.device
    entries: tuple[Entry, ...] = ()

    @property
    def offloaded(self) -> bool:
        return bool(self.entries)

    @property
    def nbytes(self) -> int:
        """Bytes its offloaded tensors take on the execution device (tied tensors once)."""
        return sum(entry.nbytes for entry in self.entries)

    @property
    def slot_bytes(self) -> int:
        """Bytes of a slot holding it: its tensors at aligned offsets (`reserve.slot_bytes`, as the plan sizes it)."""
        return slot_bytes((entry.nbytes for entry in self.entries), slot_alignment(self.execution_device.type == "cuda"))


@dataclass
class _Building:
    """What `build_blocks` collects before it changes the model."""

    entries: dict[str, list[Entry]]
    offsets: dict[str, int]
    rewrites: list[tuple[Sequence[Site], torch.Tensor]]
    resident: int = 0


def build_blocks(model: nn.Module, plan: Plan, store: WeightSource | None, host: HostWeights
                 ) -> tuple[dict[str, Block], int]:
    """The runtime's blocks for `plan`, in its order, and the bytes of offloaded blocks' tensors kept resident
    where they run. Checks everything before the model changes; then offloaded tensors' sites hold placeholders
    and resident ones their execution device's copy.

    Raises:
        PlanError: an entry names no module of `model`.
        OffloadError: an offloaded tensor is in no weight source, or a resident one has no data.
    """
    placements = {p.name: p for p in plan.placements}
    for name in placements:
        _resolve_module(model, name)
    work = _Building({name: [] for name in placements}, {name: 0 for name in placements}, [])
    # Offsets are aligned as `reserve.slot_alignment` says (GPU slots); wider dtypes first keep them aligned to
    # the element size too.
    order = {name: i for i, name in enumerate(placements)}
    for group in sorted(tensor_groups(model), key=lambda g: -g.tensor.element_size()):
        owners = {o for o in (owner_of(n, placements) for n in group.names) if o is not None}
        offloaded = [placements[o] for o in sorted(owners, key=order.__getitem__) if placements[o].offloaded]
        if offloaded:
            _add(work, plan, group, offloaded, store, host)
    for sites, value in work.rewrites:
        for site in sites:
            site.set(value)
    blocks = {name: Block(name, p.device, p.execution_device.torch_device(), tuple(work.entries[name]))
              for name, p in placements.items()}
    return blocks, work.resident


def _add(work: _Building, plan: Plan, group: TensorGroup, owners: Sequence[Placement], store: WeightSource | None,
         host: HostWeights) -> None:
    """Record one tensor of offloaded blocks: resident where they run, or an entry of each block using it."""
    names, sites, tensor = group.names, group.sites, group.tensor
    first = owners[0]
    home = plan.home_of(names[0], buffer=not sites[0].is_parameter)
    if home == first.execution_device:
        value = _resident(names, tensor, home.torch_device(), store, host)
        work.resident += value.numel() * value.element_size()
        work.rewrites.append((sites, value))
        return
    source, key = _source_for(group, first, store, host)
    # One placeholder object for every registration keeps tied parameters tied while released.
    meta = tensor.detach().to("meta")
    placeholder = make_placeholder(meta, sites[0].is_parameter, tensor.requires_grad,
                                   (names[0], first.name, home_of_source(source)))
    work.rewrites.append((sites, placeholder))
    for owner in owners:
        entry = Entry(key, meta.dtype, tuple(meta.shape), work.offsets[owner.name], tuple(sites), placeholder, source,
                      Registration.of(tensor))
        work.entries[owner.name].append(entry)
        work.offsets[owner.name] += aligned(entry.nbytes, slot_alignment(owner.execution_device.is_gpu))


def _resident(names: Sequence[str], tensor: torch.Tensor, device: torch.device, store: WeightSource | None,
              host: HostWeights) -> torch.Tensor:
    """A tensor of an offloaded block kept where the block runs (its buffers), on that device for good."""
    if tensor.device.type == "meta":
        source = next((s for s in (store, host) if s is not None and any(n in s for n in names)), None)
        if source is None:
            raise OffloadError(
                f"buffer {names[0]!r} is on the meta device and not in the offload store; load the checkpoint "
                "(or pass the folder it was offloaded to) before dispatching."
            )
        tensor = source.get(next(n for n in names if n in source))
    return tensor.to(device)


def _source_for(group: TensorGroup, placement: Placement, store: WeightSource | None,
                host: HostWeights) -> tuple[WeightSource, str]:
    """Where an offloaded tensor is read from each forward: the store for a disk block's tensors (a computed
    buffer excepted: no store holds one), else host memory (a real tensor stays where it is; a meta one must be
    among the host weights)."""
    names, tensor = group.names, group.tensor
    if placement.device.kind is DeviceKind.DISK and group.persistent:
        found = next((name for name in names if store is not None and name in store), None)
        if found is None:
            raise OffloadError(
                f"tensor {names[0]!r} of block {placement.name!r} is placed on disk but is not in the offload store; "
                "write it there first (dispatch_model does, given offload_dir) or pass the store it was offloaded to.")
        return store, found  # type: ignore[return-value]  # found implies a store
    if tensor.device.type != "meta":
        # A real tensor of a block that runs elsewhere (or a computed buffer): keep it in host memory where it is.
        if names[0] not in host:
            host.put(names[0], tensor)
        return host, names[0]
    found = next((name for name in names if name in host), None)
    if found is not None:
        return host, found
    raise OffloadError(
        f"tensor {names[0]!r} of block {placement.name!r} is placed on the {placement.device} but is still on the meta "
        "device and not among the host weights; load the checkpoint (or pass state_dict) before dispatching.")


def _resolve_module(model: nn.Module, key: str) -> nn.Module:
    try:
        return model.get_submodule(key)
    except AttributeError:
        raise PlanError(
            f"device-map key {key!r} names no submodule of {type(model).__name__}; device maps name modules "
            "(e.g. 'model.layers.0'). Use the module that owns that tensor."
        ) from None
