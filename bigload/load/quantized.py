"""Quantized Linears' tensors, built from the checkpoint's float weights while streaming.

`quantized_sources` adds, for every `QuantLinear` of the model, its quantized tensors as tensors derived from
the float weight (found by name, or where the given sources say); they are built one weight at a time on the
loader's reader thread. The byte order an int4 weight is packed in is the plan's (`Plan.int4_layout_of`): the
loader sets it on each module (`apply_layouts`) before the first weight is read, and the build reads it then.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import torch
from torch import nn

from bigload.formats.refs import CheckpointIndex
from bigload.plan.value import Plan
from bigload.quant import PackMemo, QuantLinear, Scheme, quantized_linears
from bigload.load.sources import DerivedTensor, Source, TensorSources, parts_of

__all__ = ["apply_layouts", "quantized_sources", "storage_tags"]


def quantized_sources(model: nn.Module, index: CheckpointIndex, sources: TensorSources | None) -> TensorSources | None:
    """`sources` plus the quantized tensors of every `QuantLinear` of `model`, derived from its float weight;
    `sources` unchanged when the model has none."""
    modules = quantized_linears(model)
    if not modules:
        return sources
    base = sources or TensorSources()
    table: dict[str, Source] = {}
    memo = PackMemo()
    for name, module in modules.items():
        weight = base.tensors.get(f"{name}.weight", index.tensors.get(f"{name}.weight"))
        if weight is None:
            continue  # reported as missing
        for part, (shape, dtype) in _shapes_from(module, weight.shape).items():
            table[f"{name}.{part}"] = DerivedTensor(
                f"{name}.{part}", shape, dtype, parts_of(weight),
                functools.partial(_build, memo, weight, part, module),
                how=f"quantize {name}.weight to {module.quantization.tag}",
            )
    return base.with_tensors(table)


def apply_layouts(model: nn.Module, plan: Plan) -> None:
    """Set each int4 `QuantLinear`'s byte order to the plan's for the block that runs it."""
    for name, module in quantized_linears(model).items():
        if module.scheme is Scheme.INT4:
            module.layout = plan.int4_layout_of(f"{name}.weight")


def storage_tags(model: nn.Module) -> str:
    """What the model's quantized bytes are ("int4:128 in cpu-avx2 order, int8"), for the offload store's
    fingerprint: a store packed in another byte order is never reused."""
    return ", ".join(sorted({module.storage_tag for module in quantized_linears(model).values()}))


def _shapes_from(module: QuantLinear, float_shape: tuple[int, ...]) -> Mapping[str, tuple[tuple[int, ...], torch.dtype]]:
    """The module's tensors as the checkpoint's weight would make them: a float weight of another shape gives
    other shapes, which the loader reports as mismatched instead of quantizing it."""
    if float_shape == (module.out_features, module.in_features):
        return module.shapes()
    return {part: (tuple(float_shape), dtype) for part, (_, dtype) in module.shapes().items()}


def _build(memo: PackMemo, weight: Source, part: str, module: QuantLinear, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return memo.tensor(weight.name, part, lambda: weight.build(parts) if isinstance(weight, DerivedTensor) else parts[0],
                       module)

