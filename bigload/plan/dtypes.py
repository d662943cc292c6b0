"""The one rule for the dtype a tensor has once loaded (`DtypeRule`), and which modules transformers keeps in
float32. The entry point of a load builds the rule once; the inventory answers it for every tensor and carries
the answers (`TensorEntry.dtype`), which the planner sizes with and the loader places in."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from bigload.errors import BudgetError
from bigload.messages import Setting, Text, setting
from bigload.sizes import parse_dtype

__all__ = ["DtypeRule", "castable", "default_keep_in_fp32_modules", "load_dtype"]

# Only these are cast. Integer and bool tensors (ids, masks, quantized weights), complex tensors (a cast to
# a real dtype drops the imaginary part) and float8 tensors (quantized weights with their own scales) keep
# their stored dtype, since casting them would change what they mean.
_CASTABLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def castable(dtype: torch.dtype) -> bool:
    """Whether a tensor stored in `dtype` is cast to the load dtype (float16/bfloat16/float32/float64)."""
    return dtype in _CASTABLE


@dataclass(frozen=True)
class DtypeRule:
    """The one rule for the dtype a tensor has once loaded; `dtype_of` answers it for one tensor.

    In order: a `special` entry for the tensor's name; a stored dtype that is not castable (integer, bool,
    complex, float8) is kept; a tensor under a `keep_in_fp32` module is float32; else `dtype`; else (no
    `dtype`) the dtype the model was built with, when that is castable; else the stored dtype. A
    non-persistent buffer (computed, such as rotary `inv_freq`; never loaded) keeps the dtype it was built
    with: `inventory_from_module` does not ask the rule for it.

    Attributes:
        dtype: the dtype floating tensors are loaded in; None: the model's own dtype.
        special: tensor name -> dtype, overriding everything else for that tensor.
        keep_in_fp32: module names (a dotted component such as "wo", or a dotted prefix) kept in float32.
    """

    dtype: torch.dtype | None = None
    special: tuple[tuple[str, torch.dtype], ...] = ()
    keep_in_fp32: tuple[str, ...] = ()

    @staticmethod
    def of(dtype: torch.dtype | str | None = None, special_dtypes: Mapping[str, torch.dtype | str] | None = None,
           keep_in_fp32_modules: Iterable[str] = ()) -> "DtypeRule":
        """A rule from user-facing arguments (dtype names are parsed).

        Raises:
            BudgetError: an unknown dtype name, or a `dtype` floating weights cannot be cast to and run in (an
                integer, bool, complex or float8 type: the cast would destroy the weights).
        """
        target = load_dtype(dtype) if dtype is not None else None
        special = tuple(sorted((name, parse_dtype(value)) for name, value in (special_dtypes or {}).items()))
        return DtypeRule(target, special, tuple(dict.fromkeys(keep_in_fp32_modules)))

    @staticmethod
    def for_model(model: nn.Module, dtype: torch.dtype | str | None = None,
                  special_dtypes: Mapping[str, torch.dtype | str] | None = None,
                  keep_in_fp32_modules: Sequence[str] | None = None) -> "DtypeRule":
        """The rule for loading `model`: `keep_in_fp32_modules=None` means transformers' default for the
        model (`default_keep_in_fp32_modules`), so a transformers model loads as `from_pretrained` loads it.
        (accelerate's `load_checkpoint_in_model` keeps nothing in float32 unless given the list; pass
        `keep_in_fp32_modules=[]` for that.)"""
        target = load_dtype(dtype) if dtype is not None else None
        kept = default_keep_in_fp32_modules(model, target) if keep_in_fp32_modules is None else keep_in_fp32_modules
        return DtypeRule.of(target, special_dtypes, kept)

    def dtype_of(self, name: str, stored: torch.dtype, model_dtype: torch.dtype | None = None) -> torch.dtype:
        """The dtype tensor `name` is loaded in, stored as `stored`, built in the model as `model_dtype`."""
        special = self._special.get(name)
        if special is not None:
            return special
        if stored not in _CASTABLE:
            return stored
        if self._fp32.matches(name):
            return torch.float32
        if self.dtype is not None:
            return self.dtype
        return model_dtype if model_dtype in _CASTABLE else stored

    def keeps_fp32(self, name: str) -> bool:
        """Whether tensor `name` lies in a module kept in float32."""
        return self._fp32.matches(name)

    @functools.cached_property
    def _special(self) -> dict[str, torch.dtype]:
        return dict(self.special)

    @functools.cached_property
    def _fp32(self) -> "_Fp32Matcher":
        return _Fp32Matcher(self.keep_in_fp32)

    @property
    def per_name(self) -> bool:
        """Whether the answer depends on the tensor's name (not only on its dtypes)."""
        return bool(self.special or self.keep_in_fp32)



def load_dtype(value: torch.dtype | str) -> torch.dtype:
    """`dtype=` of a load: a dtype floating weights are cast to and run in (float16/bfloat16/float32/float64).

    Raises:
        BudgetError: an unknown name, or an integer, bool, complex or float8 type (the cast would destroy the
            weights: 0.2 becomes 0 in int8), naming `quantize=` for 8-bit weights.
    """
    dtype = parse_dtype(value)
    if dtype not in _CASTABLE:
        raise BudgetError(_not_a_load_dtype(dtype))
    return dtype


def _not_a_load_dtype(dtype: torch.dtype) -> Text:
    name = str(dtype).removeprefix("torch.")
    if dtype.is_floating_point:
        why: tuple[str | Setting, ...] = ("8-bit floats store weights; a model runs in 16 bits or more",)
    elif dtype in (torch.int8, torch.uint8):
        why = ("to store weights as 8-bit integers, use ", setting("quantize", "'int8'"), " or ",
               setting("quantize", "'int4'"))
    else:
        why = ("floating weights cast to it would lose their values",)
    return Text(setting("dtype", str(dtype), name), " is not a dtype to load a model in (", *why, "); use ",
                setting("dtype", "torch.bfloat16", "bfloat16"), ", float16, float32 or float64, or leave ",
                setting("dtype"), " out to keep the model's own.")


class _Fp32Matcher:
    """Whether a tensor name lies in a keep-in-fp32 module: a dotted component or a dotted prefix."""

    def __init__(self, modules: Iterable[str]) -> None:
        self.components = frozenset(m for m in modules if "." not in m)
        self.prefixes = tuple(f"{m}." for m in modules if "." in m)

    def matches(self, name: str) -> bool:
        if not self.components and not self.prefixes:
            return False
        if self.prefixes and name.startswith(self.prefixes):
            return True
        return any(part in self.components for part in name.split(".")[:-1])


def default_keep_in_fp32_modules(model: nn.Module, dtype: torch.dtype | None) -> list[str]:
    """The modules transformers' from_pretrained keeps in float32 at `dtype`: `_keep_in_fp32_modules` at
    float16 only, `_keep_in_fp32_modules_strict` at float16 and bfloat16."""
    kept: list[str] = []
    if dtype == torch.float16:
        kept.extend(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        kept.extend(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return list(dict.fromkeys(kept))
