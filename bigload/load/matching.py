"""The model side of a load: every tensor to place (tied names together), where and in which dtype the plan
and the inventory put it, and which checkpoint source fills it.

`model_groups` reads each group's home (`Plan.home_of`) and dtype (`Inventory.dtype_of`): nothing here decides
either. `match` pairs groups with the load's `SourceTable`; `report` raises for what cannot be loaded before any
byte is read, and warns (in accelerate's words) about the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from bigload.devices import Device
from bigload.errors import CheckpointMismatchError, DeviceError
from bigload.load.sources import Source, SourceTable
from bigload.plan.inventory import Inventory
from bigload.plan.value import Plan
from bigload.tensors import Registration, Site, owner_of, tensor_groups

__all__ = ["Group", "Match", "Mismatch", "match", "model_groups", "report"]

logger = logging.getLogger(__name__)

_LISTED = 20


@dataclass(frozen=True)
class Mismatch:
    """A tensor whose shape in the checkpoint differs from the model's."""

    name: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name} (checkpoint {list(self.checkpoint_shape)}, model {list(self.model_shape)})"


@dataclass(frozen=True)
class Group:
    """One model tensor and every name and site it is registered under (several when tied), with where and
    in which dtype it is placed.

    Attributes:
        original: the tensor registered before the load (meta, usually): its shape, and the computed value of a
            buffer no checkpoint holds.
        registration: how its sites hold it (`tensors.Registration`).
        persistent: it is in a state dict (a parameter, or a persistent buffer).
        device: its home in the plan.
        dtype: the dtype the inventory decided.
    """

    names: tuple[str, ...]
    sites: tuple[Site, ...]
    original: torch.Tensor
    registration: Registration
    persistent: bool
    device: Device
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.original.shape)

    def assign(self, tensor: torch.Tensor) -> None:
        """Register `tensor` at every site as one object (tied weights stay one Parameter)."""
        value = self.registration.wrap(tensor)
        for site in self.sites:
            site.set(value)


def model_groups(model: nn.Module, plan: Plan, inventory: Inventory, scope: Sequence[str]) -> list[Group]:
    """Every tensor of `model` under `scope` (module names; `""` is everything), with its home and dtype.

    Raises:
        DeviceError: a tensor no entry of the plan owns.
    """
    scopes = set(scope)
    groups = []
    for found in tensor_groups(model):
        if not any(owner_of(name, scopes) is not None for name in found.names):
            continue
        name = found.names[0]
        home = plan.home_of(name, buffer=not found.sites[0].is_parameter)
        if home is None:
            raise DeviceError(f"the device map places no module containing {name!r}; add an entry for it or a '' "
                              "entry for everything else.")
        dtype = next((d for n in found.names if (d := inventory.dtype_of(n)) is not None), None)
        if dtype is None:
            raise DeviceError(f"tensor {name!r} is not in the inventory this load was planned with; plan the model "
                              "as it is now (modules added after planning are not placed).")
        groups.append(Group(found.names, found.sites, found.tensor, Registration.of(found.tensor), found.persistent,
                            home, dtype))
    return groups


@dataclass(frozen=True)
class Match:
    """Groups paired with their sources (in file order), and what does not pair."""

    pairs: tuple[tuple[Source, Group], ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[Mismatch, ...]


def match(table: SourceTable, groups: Sequence[Group], scope: Sequence[str]) -> Match:
    """Pair each persistent group with the source of one of its names (non-persistent buffers are computed,
    never loaded: old checkpoints hold stale copies)."""
    scopes = set(scope)
    sources = table.tensors
    by_name = {name: group for group in groups for name in group.names}
    chosen: dict[str, Group] = {}
    missing: list[str] = []
    mismatched: list[Mismatch] = []
    for group in groups:
        wanted = [name for name in group.names if owner_of(name, scopes) is not None]
        if not wanted or not group.persistent:
            continue
        present = next((name for name in wanted if name in sources), None)
        if present is None:
            missing.extend(wanted)
        elif sources[present].shape != group.shape:
            mismatched.append(Mismatch(present, sources[present].shape, group.shape))
        else:
            chosen[present] = group
    unexpected = [name for name in (*sources, *table.shadowed)
                  if name not in by_name and owner_of(name, scopes) is not None]
    pairs = tuple((source, chosen[name]) for name, source in sources.items() if name in chosen)
    return Match(pairs, tuple(missing), tuple(unexpected), tuple(mismatched))


def report(found: Match, table: SourceTable, strict: bool, checkpoint: object, model_name: str) -> None:
    """Raise for what cannot be loaded (before any byte is read); warn, as accelerate does, about the rest.

    Raises:
        CheckpointMismatchError: mis-shaped tensors, or (with `strict`) missing or unexpected ones (a
            `CheckpointError`, and the `RuntimeError` torch's `load_state_dict` raises there).
    """
    problems = [
        (f"{len(found.missing)} missing", list(found.missing)),
        (f"{len(found.unexpected)} unexpected", list(found.unexpected)),
        (f"{len(found.mismatched)} with mismatched shapes", [str(m) for m in found.mismatched]),
    ]
    lines = [f"{label}: {_first(names)}" for label, names in problems if names]
    index = table.index
    where = index.files[0] if len(index.files) == 1 else index.root
    if found.mismatched or (strict and lines):
        fix = ("Check that the checkpoint is for this model and config" + (
            ", or pass strict=False to load the matching tensors and get the rest in the LoadResult."
            if not found.mismatched else "; tensors of another shape cannot be loaded into it."))
        raise CheckpointMismatchError(f"the checkpoint {where} does not match the model: " + "; ".join(lines) + ". "
                                      + fix)
    if found.unexpected:
        # accelerate's words, so logs and tests written against accelerate read the same.
        logger.warning(
            f"Some weights of the model checkpoint at {checkpoint} were not used when initializing {model_name}: "
            f"{set(found.unexpected)}. This may or may not be an issue - make sure that the checkpoint does not "
            "have unnecessary parameters, or that the model definition correctly corresponds to the checkpoint."
        )
    if found.missing:
        # accelerate leaves them on meta silently; bigload says so.
        logger.warning("%d tensors of %s are not in the checkpoint %s and stay on the meta device: %s",
                       len(found.missing), model_name, where, _first(list(found.missing)))


def _first(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _LISTED else "")
