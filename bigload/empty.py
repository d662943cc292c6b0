"""Build models without allocating their weights.

`init_empty_weights()` puts every parameter (and optionally every buffer) on the meta device. Unlike
accelerate's, which rebuilds each registered parameter with `param_cls(param.to(device))`, a parameter that
is already on the target device is registered as the very same object, so weights tied in `__init__`
(`self.lm_head.weight = self.embed.weight`) stay one shared Parameter.

We use torch's own global registration hooks (`register_module_parameter_registration_hook`) and the
`torch.device` context manager rather than patching `nn.Module.register_parameter`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

from torch.overrides import TorchFunctionMode

from bigload.devices import Device, DeviceLike

__all__ = ["init_empty_weights", "init_on_device"]


def _as_torch_device(device: DeviceLike | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str) and (device in ("meta", "cpu") or device.startswith("cuda")):
        return torch.device(device)
    return Device.parse(device).torch_device()


@contextlib.contextmanager
def init_on_device(device: DeviceLike | torch.device, include_buffers: bool | None = None) -> Iterator[None]:
    """Create every parameter built inside the block on `device` (e.g. "meta", "cuda:0").

    Args:
        device: where parameters are created; "meta" allocates nothing.
        include_buffers: also create buffers there. Off by default (None, accelerate's default, means off:
            bigload reads no `ACCELERATE_INIT_INCLUDE_BUFFERS`) so buffers computed in `__init__` (rotary
            `inv_freq`, position ids) keep their real values on the CPU.

    Parameters keep their class and `requires_grad`; a parameter that is already on `device` (a tied
    weight being registered a second time) is kept as the same object.

    >>> with init_on_device("meta"):
    ...     layer = torch.nn.Linear(4096, 4096)
    >>> layer.weight.device.type
    'meta'
    """
    target = _as_torch_device(device)

    def move_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.device == target:
            return None  # keep the very object: this is what keeps tied weights tied
        kwargs = dict(param.__dict__)
        kwargs.pop("_is_hf_initialized", None)
        moved = type(param)(param.to(target), requires_grad=param.requires_grad)
        moved.__dict__.update(kwargs)
        return moved

    def move_buffer(module: nn.Module, name: str, buffer: torch.Tensor | None) -> torch.Tensor | None:
        if buffer is None or buffer.device == target:
            return None
        return buffer.to(target)

    handles = [register_module_parameter_registration_hook(move_parameter)]
    with contextlib.ExitStack() as stack:
        if include_buffers:
            handles.append(register_module_buffer_registration_hook(move_buffer))
            # Factories called inside the block (torch.empty in nn.Linear) allocate on the device directly.
            stack.enter_context(torch.device(target))
            stack.enter_context(_EmptyOn(target, route_empty=False))
        else:
            # Buffers must keep their computed values, so only `torch.empty` goes to the device: it is
            # what torch.nn layers allocate weights with, and a buffer made by it holds garbage anyway.
            # Without this a 100k x 100k Linear would ask the CPU for 40 GB before moving to meta.
            stack.enter_context(_EmptyOn(target))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


# In-place initializers: torch.Tensor's and torch.nn.init's (what transformers' `_init_weights` calls; by name,
# since transformers swaps torch.nn.init's functions for wrappers while it builds a model). On a meta tensor
# they change nothing but still run torch's Python reference implementations, about 1 ms each: a third of a
# from-config build of a 7B Llama under init_empty_weights. Skipped on meta tensors.
_INITIALIZERS = frozenset({
    "normal_", "uniform_", "zero_", "fill_", "constant_", "ones_", "zeros_", "trunc_normal_",
    "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
})


class _EmptyOn(TorchFunctionMode):
    """Sends `torch.empty` calls that name no device to `device` (when `route_empty`), and makes in-place
    initializers of meta tensors no-ops."""

    def __init__(self, device: torch.device, *, route_empty: bool = True) -> None:
        super().__init__()
        self.device = device
        self.route_empty = route_empty

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _INITIALIZERS:
            target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        if self.route_empty and func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = self.device
        return func(*args, **kwargs)


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool | None = None) -> Iterator[None]:
    """Build a model with no memory for its weights: parameters on the meta device.

    Args:
        include_buffers: put buffers on meta too (bigload's loader recomputes non-persistent buffers
            that no checkpoint holds, so this is safe for loading, and saves memory on huge models). None
            (accelerate's default) means False.

    >>> with init_empty_weights():
    ...     model = torch.nn.Sequential(torch.nn.Linear(100_000, 100_000))  # 40 GB, allocated: 0
    """
    with init_on_device(torch.device("meta"), include_buffers=include_buffers):
        yield
