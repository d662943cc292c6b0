"""A model's registered tensors: the one walk over them, and the one rule for which map entry owns one.

`tensor_groups(model)` lists every parameter and buffer once per tensor object, with every name and every
registration (`Site`) it has: tied weights are one group with several names. The validator (`dispatch`),
the loader (`stream`) and the runtime (`hooks`) all read this walk. (`inventory` keeps its own tight,
sizes-only pass: it must stay linear on 200,000-module models and never needs the sites.)

`Registration` is the one rule for registering a new tensor where another was (a Parameter of the same class,
requires_grad and attributes, or a buffer): the loader, the runtime and `dispatch_model` all re-wrap with it.

`owner_of(name, keys)` is the device-map rule: a tensor or module belongs to the longest key that is a
dotted prefix of its name, `""` owning everything. `summarize_names` writes a list of such names short
(`model.layers.0-7`) for plans and messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Container, Sequence

import torch
from torch import nn

__all__ = ["Registration", "Site", "TensorGroup", "owner_of", "summarize_names", "tensor_groups"]

_NUMBERED = re.compile(r"^(?P<prefix>.+)\.(?P<number>\d+)$")


@dataclass(frozen=True)
class Site:
    """One place a tensor is registered: `module._parameters[attr]` or `module._buffers[attr]`."""

    module: nn.Module
    attr: str
    is_parameter: bool

    def get(self) -> torch.Tensor | None:
        """The tensor registered here now."""
        return self._table()[self.attr]

    def set(self, tensor: torch.Tensor) -> None:
        """Register `tensor` here (a Parameter in a parameter site, any tensor in a buffer site)."""
        self._table()[self.attr] = tensor  # type: ignore[assignment]

    def _table(self) -> dict[str, torch.Tensor | None]:
        return self.module._parameters if self.is_parameter else self.module._buffers  # type: ignore[return-value]


@dataclass(frozen=True)
class Registration:
    """How a tensor is registered: as a Parameter of some class (its `requires_grad` and attributes), or as a
    buffer. `wrap` registers another tensor the same way.

    >>> Registration.of(nn.Parameter(torch.zeros(1))).wrap(torch.ones(1)).requires_grad
    True
    """

    parameter: type | None  # the Parameter class; None for a buffer
    requires_grad: bool = False
    attributes: tuple[tuple[str, Any], ...] = ()  # the Parameter's own attributes (e.g. transformers' flags)

    @staticmethod
    def of(tensor: torch.Tensor) -> "Registration":
        """How `tensor` is registered."""
        if not isinstance(tensor, nn.Parameter):
            return Registration(None)
        return Registration(type(tensor), tensor.requires_grad, tuple(tensor.__dict__.items()))

    def wrap(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as this registration holds it (gradients only for floating and complex tensors)."""
        if self.parameter is None:
            return tensor
        grad = self.requires_grad and (tensor.is_floating_point() or tensor.is_complex())
        value = self.parameter(tensor, requires_grad=grad)
        if self.attributes:
            value.__dict__.update(self.attributes)
        return value


@dataclass(frozen=True)
class TensorGroup:
    """One tensor object and every name and site it is registered under (several when tied).

    Attributes:
        names: its names in registration order (first name first).
        sites: where each name is registered, in the same order.
        tensor: the tensor object.
        persistent: a parameter, or a buffer persistent under at least one name (it is in a state dict).
    """

    names: tuple[str, ...]
    sites: tuple[Site, ...]
    tensor: torch.Tensor
    persistent: bool


def tensor_groups(model: nn.Module) -> list[TensorGroup]:
    """Every parameter and buffer of `model`, grouped by identity, in registration order.

    >>> [g.names for g in tensor_groups(nn.Linear(2, 2))]
    [('weight',), ('bias',)]
    """
    found: dict[int, tuple[list[str], list[Site], torch.Tensor, list[bool]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for table, is_parameter in ((module._parameters, True), (module._buffers, False)):
            for attr, tensor in table.items():
                if tensor is None:
                    continue
                names, sites, _, persistent = found.setdefault(id(tensor), ([], [], tensor, [False]))
                names.append(prefix + attr)
                sites.append(Site(module, attr, is_parameter))
                persistent[0] = persistent[0] or is_parameter or attr not in module._non_persistent_buffers_set
    return [TensorGroup(tuple(names), tuple(sites), tensor, persistent[0])
            for names, sites, tensor, persistent in found.values()]


def owner_of(name: str, keys: Container[str]) -> str | None:
    """The key owning tensor or module `name`: the longest of `keys` that is a dotted prefix of it (or it
    itself); `""` owns everything; None when no key does. Linear in the name's depth.

    >>> owner_of("model.layers.1.mlp.weight", {"model.layers.1", "model", ""})
    'model.layers.1'
    >>> owner_of("model.layers.10.weight", {"model.layers.1"}) is None
    True
    """
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in keys:
            return prefix
    return "" if "" in keys else None


def summarize_names(names: Sequence[str], limit: int = 8) -> str:
    """`model.layers.0, model.layers.1, model.layers.2` -> `model.layers.0-2`; long lists are elided.

    >>> summarize_names(["model.embed_tokens", "model.layers.0", "model.layers.1", ""])
    'model.embed_tokens, model.layers.0-1, (whole model)'
    """
    parts: list[str] = []
    run: list[Any] | None = None  # [prefix, first, last]
    for name in names:
        match = _NUMBERED.match(name)
        if match and run is not None and match["prefix"] == run[0] and int(match["number"]) == run[2] + 1:
            run[2] += 1
            continue
        if run is not None:
            parts.append(_run_text(run))
            run = None
        if match:
            run = [match["prefix"], int(match["number"]), int(match["number"])]
        else:
            parts.append(name or "(whole model)")
    if run is not None:
        parts.append(_run_text(run))
    if len(parts) > limit:
        parts = parts[: limit - 1] + [f"... (+{len(parts) - limit + 1} more)"]
    return ", ".join(parts)


def _run_text(run: list[Any]) -> str:
    prefix, first, last = run
    return f"{prefix}.{first}" if first == last else f"{prefix}.{first}-{last}"
