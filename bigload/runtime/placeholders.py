"""What an offloaded tensor's registrations hold between forwards: a meta tensor that names itself.

To torch, peft and transformers a placeholder is a plain meta Parameter (or buffer); an op that needs its data
raises `OffloadError` naming the tensor, where it is stored and the fix (torch's own message is "Cannot copy
out of meta tensor"); `detach()` (state dicts) and views stay placeholders; pickling one
(`torch.save(model.state_dict())`) raises instead of saving no data.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from bigload.errors import OffloadError
from bigload.runtime.weights import WeightSource

__all__ = ["OffloadedBuffer", "OffloadedParameter", "PLACEHOLDERS", "home_of_source", "make_placeholder"]


def _outside_forward(cls: type, func: Callable[..., Any], types: Any, args: Sequence[Any] = (),
                     kwargs: Mapping[str, Any] | None = None) -> Any:
    """`__torch_function__` of placeholders: torch's own behaviour (meta in, meta out), except that reading
    their data, which torch refuses with "Cannot copy out of meta tensor", names the tensor and the fix. A
    meta tensor made from one (`detach()` in `state_dict()`, a view) is a placeholder too, so code reading a
    state dict gets the same error."""
    kwargs = kwargs or {}
    try:
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
    except (NotImplementedError, RuntimeError) as error:
        found = _placeholder_in(args, kwargs)
        if found is None or "meta" not in str(error):
            raise
        raise OffloadError(_placeholder_message(found)) from error
    if _computed_from_no_data(args, kwargs, result):
        raise OffloadError(_placeholder_message(_placeholder_in(args, kwargs)))  # type: ignore[arg-type]
    if func in _SAME_TENSOR and type(result) is torch.Tensor and result.device.type == "meta":  # noqa: E721
        found = _placeholder_in(args, kwargs)
        if found is not None:
            result = result.as_subclass(OffloadedBuffer)
            result._bigload_where = getattr(found, "_bigload_where", None)  # type: ignore[attr-defined]
    return result


def _computed_from_no_data(args: Sequence[Any], kwargs: Mapping[str, Any], result: Any) -> bool:
    """Whether a placeholder met a real tensor in an op that returned real values: torch's CPU `linear` and
    `matmul` take a meta weight beside a CPU input and return uninitialized memory, which would flow on as
    numbers (a block whose hooks never ran: a map entry on a module that is not called)."""
    inputs = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
    if not any(isinstance(value, PLACEHOLDERS) for value in inputs):
        return False
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    with torch._C.DisableTorchFunctionSubclass():  # `.device` of a placeholder would come back here
        return (any(value.device.type != "meta" for value in inputs)
                and any(isinstance(value, torch.Tensor) and value.device.type != "meta" for value in outputs))


def _placeholder_in(args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    return next((value for value in (*args, *kwargs.values()) if isinstance(value, PLACEHOLDERS)), None)


# Ops whose meta result is the placeholder's tensor under another name (state_dict() detaches; views), so it
# stays a placeholder. Computed results (a linear on a placeholder gives meta output) are not the tensor.
_SAME_TENSOR = frozenset({
    torch.Tensor.detach, torch.Tensor.clone, torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.view,
    torch.Tensor.reshape, torch.Tensor.view_as, torch.Tensor.__getitem__, torch.Tensor.data.__get__,
    torch.Tensor.t, torch.Tensor.T.__get__, torch.Tensor.transpose, torch.Tensor.flatten, torch.detach,
    torch.clone, torch.reshape,
})


class _Placeholder:
    """What both placeholder classes add to torch's meta tensor: the error on reading data, a repr naming the
    tensor and where it is stored, and a refusal to be pickled (`torch.save(model.state_dict())` would save
    no data for it, silently)."""

    __torch_function__ = classmethod(_outside_forward)

    def __repr__(self, **_: Any) -> str:
        name, block, home = getattr(self, "_bigload_where", None) or ("?", "?", "offloaded")
        shape = tuple(self.shape)  # type: ignore[attr-defined]
        return (f"{type(self).__name__}({name!r}, size={shape}, dtype={self.dtype}, {home}; "  # type: ignore[attr-defined]
                f"real while block {block!r} runs)")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise OffloadError(_placeholder_message(self))  # type: ignore[arg-type]


class OffloadedParameter(_Placeholder, nn.Parameter):
    """The meta placeholder of an offloaded parameter; the runtime installs the real values during its block's
    forward. A plain meta Parameter to torch, peft and transformers, except for the error on reading its data."""


class OffloadedBuffer(_Placeholder, torch.Tensor):
    """The meta placeholder of an offloaded buffer (`offload_buffers=True`) and the meta result of an op on a
    placeholder (`detach()` in `state_dict()`); see `OffloadedParameter`."""


PLACEHOLDERS = (OffloadedParameter, OffloadedBuffer)


def make_placeholder(meta: torch.Tensor, is_parameter: bool, requires_grad: bool,
                     where: tuple[str, str, str]) -> torch.Tensor:
    """The placeholder of an offloaded tensor; `where` is (its first name, its block, where it is stored)."""
    placeholder = (OffloadedParameter(meta, requires_grad) if is_parameter
                   else torch.Tensor._make_subclass(OffloadedBuffer, meta, False))
    placeholder._bigload_where = where  # type: ignore[attr-defined]
    return placeholder


def home_of_source(source: WeightSource) -> str:
    """Where `source` keeps its tensors, for messages."""
    folder = getattr(source, "folder", None)
    return f"on disk in {folder}" if folder is not None else "in CPU memory"


def _placeholder_message(placeholder: torch.Tensor) -> str:
    name, block, home = getattr(placeholder, "_bigload_where", None) or ("an offloaded tensor", "?", "offloaded")
    return (
        f"{name!r} is offloaded by bigload ({home}): its values are on the execution device only while block "
        f"{block!r} runs, and outside that forward it is a placeholder on the meta device, with no data. Run "
        "the model (or that block) to use it, or bigload.detach(model) for a plain model in memory. From "
        "peft's PeftModel.from_pretrained (its re-dispatch copies weights when peft's own device map reaches "
        "disk): pass it device_map={'': DEVICE}, DEVICE being where your input ids are (0, or "
        "'cpu'), or load the adapter with bigload.from_pretrained(..., adapter=PATH)."
    )
