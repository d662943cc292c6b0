"""Byte arithmetic: dtype widths, memory-size parsing and human formatting.

Sizes in strings follow the usual convention: binary units ("GiB", 2**30) and decimal units ("GB", 10**9)
are different things. accelerate treats both as decimal-ish in places; bigload does not guess.
"""

from __future__ import annotations

import math
import re

import torch

from bigload.errors import BudgetError
from bigload.messages import Text

__all__ = ["dtype_width", "format_size", "parse_dtype", "parse_size"]

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}

_SIZE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "f32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "f16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "f64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
    if hasattr(torch, _name):
        _DTYPE_NAMES[_name] = getattr(torch, _name)


def parse_size(value: int | float | str, *, what: str = "size") -> int:
    """Parse a memory size into bytes.

    Args:
        value: an int (bytes), or a string such as "24GiB" (binary), "24GB" (decimal), "1.5TiB", "512MB".
        what: what the size is for, used in the error message (e.g. "max_memory['cpu']"; a
            `bigload.messages.Text` keeps its CLI spelling).

    Returns:
        The size in bytes, rounded down.

    Raises:
        BudgetError: negative values, unknown units ("24 GiBs"), or anything that is not a size.

    >>> parse_size("1.5GiB")
    1610612736
    """
    if isinstance(value, bool):
        raise BudgetError(f"{what}: {value!r} is not a size; give bytes as an int or a string like '24GiB'.")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise BudgetError(f"{what}: {value!r} is not a finite size.")
        if value < 0:
            raise BudgetError(f"{what}: {value!r} is negative; sizes must be >= 0 bytes.")
        return int(value)
    if not isinstance(value, str):
        raise BudgetError(f"{what}: {value!r} is not a size; give bytes as an int or a string like '24GiB'.")
    text = value.strip()
    if text.startswith("-"):
        raise BudgetError(Text(what, f": {value!r} is negative; sizes must be >= 0 bytes."))
    match = _SIZE_RE.match(text)
    unit = match.group("unit").lower() if match else None
    if match is None or unit not in _UNITS:
        raise BudgetError(Text(
            what, f": cannot read {value!r} as a size. Use a number with one of the units "
            "B, KB, MB, GB, TB (decimal) or KiB, MiB, GiB, TiB (binary), e.g. '24GiB' or '80GB'."
        ))
    return int(float(match.group("num")) * _UNITS[unit])


def format_size(nbytes: int | float, *, precision: int = 2) -> str:
    """Format bytes with binary units: 1536 -> '1.50 KiB'. Negative values keep their sign."""
    sign = "-" if nbytes < 0 else ""
    size = float(abs(nbytes))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            if unit == "B":
                return f"{sign}{int(size)} B"
            return f"{sign}{size:.{precision}f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """Turn "bfloat16", "bf16", "torch.float16" or a torch.dtype into a torch.dtype.

    Raises:
        BudgetError: an unknown dtype name, listing the accepted ones.
    """
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    raise BudgetError(
        f"unknown dtype {value!r}; use one of: {', '.join(sorted(set(_DTYPE_NAMES)))}."
    )


def dtype_width(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype` (packed sub-byte types count their storage byte)."""
    return torch.empty((), dtype=dtype, device="meta").element_size()
