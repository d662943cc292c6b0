"""Moving a block's inputs to where it runs and outputs back to where the caller's were.

Cache objects (`past_key_values`, any `transformers` `Cache`) are never moved between devices: each layer keeps
its part of the KV cache on its own device (moving it made accelerate's multi-GPU generation 5-8x slower,
accelerate issue 1394).
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["DEFAULT_SKIP_KEYS", "OutputAlignment", "first_tensor_device", "send", "send_to_device"]

# Keyword arguments that carry a KV cache in transformers' models: `cache` since transformers 5.24,
# `past_key_values` / `past_key_value` before. `cache_position` is a plain tensor input and must move like
# any other.
DEFAULT_SKIP_KEYS: tuple[str, ...] = ("cache", "past_key_values", "past_key_value", "layer_past", "cache_params")


def _is_cache(value: object) -> bool:
    """A transformers `Cache` (KV cache): never moved. Only looked up when transformers is already loaded,
    since no object can be one otherwise, so importing bigload does not import transformers."""
    module = sys.modules.get("transformers.cache_utils")
    return module is not None and isinstance(value, module.Cache)


def send_to_device(value: Any, device: torch.device, *, skip_keys: Iterable[str] = ()) -> Any:
    """Move every tensor inside `value` (nested tuples, lists, dicts, ModelOutputs) to `device`.

    Cache objects and the entries of mappings named in `skip_keys` are returned untouched, so a KV cache
    never leaves the device of its layer.
    """
    skip = frozenset(skip_keys)
    return send(value, device, skip)


# Device types a copy may be queued toward without waiting: the copy is ordered on the target's stream before
# any kernel that reads it. A copy toward the CPU must wait: the CPU reads its result as soon as `to` returns,
# and a queued GPU-to-CPU copy has not landed yet (uninitialised memory, no error).
_ASYNC_COPY_TARGETS = frozenset({"cuda"})


def send(value: Any, device: torch.device, skip: frozenset[str]) -> Any:
    """`send_to_device` with the skipped keys already a frozenset (the hooks' hot path)."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        return value.to(device, non_blocking=device.type in _ASYNC_COPY_TARGETS)
    if _is_cache(value):
        return value
    if isinstance(value, Mapping):
        moved = {key: (item if key in skip else send(item, device, skip)) for key, item in value.items()}
        if all(moved[key] is item for key, item in value.items()):
            return value
        # ModelOutput and other Mapping types rebuild from a dict, as accelerate's send_to_device does.
        return moved if type(value) is dict else type(value)(moved)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(send(item, device, skip) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(send(item, device, skip) for item in value)
    return value


def first_tensor_device(args: Sequence[Any], kwargs: Mapping[str, Any], skip: frozenset[str]) -> torch.device | None:
    stack: list[Any] = [*args, *(v for k, v in kwargs.items() if k not in skip)]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            return item.device
        if _is_cache(item):
            continue
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None


class OutputAlignment:
    """Returns a module's outputs on the device its inputs came from, while `io_same_device` is set.

    The root of an attached model always does this. A submodule that callers run on its own, such as the
    encoder of an encoder-decoder (transformers' `generate` calls it directly), can get the same with one of
    these. Its hooks run outside the module's own (the pre-hook first, the post-hook last), so the input
    device recorded is the caller's, before any block hook moves the inputs.

    >>> alignment = OutputAlignment(encoder, io_same_device=True)  # doctest: +SKIP
    >>> alignment.remove()  # doctest: +SKIP
    """

    def __init__(self, module: nn.Module, *, io_same_device: bool = False,
                 skip_keys: Iterable[str] = DEFAULT_SKIP_KEYS) -> None:
        self.io_same_device = io_same_device
        self._skip = frozenset(skip_keys)
        self._devices: list[torch.device | None] = []
        self._handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
            module.register_forward_hook(self._post, always_call=True),
        ]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._devices.append(first_tensor_device(args, kwargs, self._skip))

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        device = self._devices.pop() if self._devices else None
        if not self.io_same_device or device is None:
            return output
        return send(output, device, self._skip)

    def remove(self) -> None:
        """Remove the hooks; the module runs as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
