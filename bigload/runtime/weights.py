"""Where offloaded tensors are kept between forwards: the disk store (`load.store.DiskStore`) or CPU RAM
(`HostWeights`), behind one protocol the runtime reads."""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import torch

from bigload.errors import OffloadError

__all__ = ["HostWeights", "WeightSource"]


@runtime_checkable
class WeightSource(Protocol):
    """Somewhere offloaded tensors are kept: `DiskStore` (disk) or `HostWeights` (CPU RAM).

    `get` returns a CPU tensor in the stored dtype and shape; a zero-copy view (mmap'd file, host tensor)
    where possible. It may be called from the prefetch thread. `rewrite` replaces the values of some tensors
    (the weights of a layer an adapter was merged into), all or none, between forwards.

    A source may also have `view(name)` (the bytes as stored, before any cast `get` does: the runtime finds
    the mapped files a block uses from it without reading them) and `verify(names)` (refuse files changed
    since the source checked them, for explicit reads): `DiskStore` has both.
    """

    def __contains__(self, name: object) -> bool: ...

    def get(self, name: str) -> torch.Tensor: ...

    def rewrite(self, tensors: Mapping[str, torch.Tensor], *, change: str) -> None: ...


class HostWeights:
    """Offloaded tensors kept in CPU RAM, by full tensor name, as they are (pinned only with `pin=True`).

    A GPU reads them through the runtime's pinned staging buffers; `pin=True` pins each tensor instead
    (a private, unswappable copy, rounded up by the pinned-memory allocator), so copies skip the staging.

    >>> weights = HostWeights({"fc.weight": torch.ones(2, 2)})
    >>> weights.get("fc.weight").sum().item()
    4.0
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None, *, pin: bool = False) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self.pin = pin
        for name, tensor in (tensors or {}).items():
            self.put(name, tensor)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Keep `tensor` (detached, on the CPU; pinned if this store pins)."""
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")
        if self.pin and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        self._tensors[name] = tensor

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def rewrite(self, tensors: Mapping[str, torch.Tensor], *, change: str) -> None:
        """Replace these tensors (e.g. with weights an adapter was merged into), all or none; `change` is for
        the disk store's fingerprint and needs no record in memory."""
        missing = [name for name in tensors if name not in self._tensors]
        if missing:
            raise OffloadError(f"tensor {missing[0]!r} is not among the host-offloaded weights.")
        for name, tensor in tensors.items():
            self.put(name, tensor)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise OffloadError(f"tensor {name!r} is not among the host-offloaded weights.") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)
