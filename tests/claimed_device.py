"""A device a test can move tensors to without having it: CPU tensors that say they live on, say, cuda:0.

Inside `ClaimedDevice("cuda:0")`, `tensor.to("cuda:0")` (and `.to(device=...)`, `.cuda()`) gives a `Claimed`
tensor: the same CPU data, whose `.device` reads cuda:0. Moving a Claimed tensor anywhere else gives a plain
tensor, and every other op sees plain CPU tensors, so a model runs as usual. A test then sees where code
moved tensors (and where it did not) on a machine without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map


class Claimed(torch.Tensor):
    """CPU data whose `.device` is the claimed device."""

    claimed: torch.device

    @property  # type: ignore[override]
    def device(self) -> torch.device:
        return self.claimed


def _claim(tensor: torch.Tensor, device: torch.device) -> Claimed:
    plain = tensor.as_subclass(torch.Tensor) if isinstance(tensor, Claimed) else tensor
    claimed = plain.as_subclass(Claimed)
    claimed.claimed = device
    return claimed


def _plain(value: Any) -> Any:
    return value.as_subclass(torch.Tensor) if isinstance(value, Claimed) else value


def _target(args: tuple, kwargs: dict) -> torch.device | None:
    """The device a `Tensor.to(...)` call moves to, if it names one."""
    candidates = [kwargs.get("device"), *args[1:2]]
    for value in candidates:
        if isinstance(value, (str, int, torch.device)) and not isinstance(value, bool):
            try:
                return torch.device(value)
            except (RuntimeError, TypeError):
                continue
    return None


class ClaimedDevice(TorchFunctionMode):
    """While active, moving a tensor to `device` claims it instead of copying it."""

    def __init__(self, device: str | torch.device) -> None:
        super().__init__()
        self.device = torch.device(device)

    def tensor(self, value: torch.Tensor) -> Claimed:
        """`value` (a CPU tensor) as if it lived on the claimed device."""
        return _claim(value, self.device)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return _claim(args[0], self.device)
        if func is torch.Tensor.to and _target(args, kwargs) == self.device:
            return _claim(args[0], self.device)
        return func(*tree_map(_plain, args), **tree_map(_plain, kwargs))
