"""What each `bigload` flag accepts: argparse `type=` functions.

A bad value stops the command while its arguments are read, before anything is planned or loaded, with
argparse's exit code 2 and a message naming the flag ("argument --max-new-tokens: ..."). Checks that need two
flags at once are `commands`' (they run first in each command). Values whose meaning the library owns (sizes,
`--quantize` schemes, budgets per device) are read by the library, which also checks them before loading.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from bigload.errors import BudgetError
from bigload.sizes import parse_dtype

__all__ = ["load_dtype", "parse_host_max_memory_arg", "parse_max_memory_arg", "positive_number", "probability",
           "prompt_text", "seed", "whole_number"]

# A bare number in a CLI budget is bytes (accelerate's meaning of an int), but nobody runs a model in less
# than a megabyte: "0=24" is a forgotten unit, refused with the likely meaning instead of planned as 24 B.
_SMALLEST_BARE_BUDGET = 2**20

# torch.manual_seed takes any integer from -2**63 to 2**64 - 1.
_SEEDS = range(-(2**63), 2**64)


def whole_number(minimum: int, meaning: str) -> Callable[[str], int]:
    """A `type=` for an integer flag of at least `minimum`; `meaning` says what it counts (for messages).

    >>> whole_number(1, "tokens to generate")("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: 0 is too few: give at least 1 (tokens to generate)
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {minimum} or more "
                                             f"({meaning})") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too few: give at least {minimum} ({meaning})")
        return value

    return parse


def positive_number(meaning: str) -> Callable[[str], float]:
    """A `type=` for a float flag that must be finite and above zero."""

    def parse(text: str) -> float:
        value = _finite(text, meaning)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not above 0; give a positive number ({meaning})")
        return value

    return parse


def probability(text: str) -> float:
    """`--top-p`: a probability mass from 0 to 1 (what transformers' top-p filter accepts)."""
    value = _finite(text, "a probability mass from 0 to 1, e.g. 0.9")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..1; give a probability mass from 0 to 1, e.g. 0.9")
    return value


def _finite(text: str, meaning: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {meaning}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number; give {meaning}")
    return value


def seed(text: str) -> int:
    """`--seed`: any integer torch's generator takes."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value not in _SEEDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed; give a whole number from {_SEEDS.start} to "
                                         f"{_SEEDS.stop - 1}")
    return value


def prompt_text(text: str) -> str:
    """`--prompt`: any text but the empty string (a model needs at least one token to continue)."""
    if not text:
        raise argparse.ArgumentTypeError("the prompt is empty; give the text to continue, e.g. --prompt 'Once upon "
                                         "a time'")
    return text


def load_dtype(text: str) -> str:
    """`--dtype`: a floating dtype of at least 16 bits (what a model's weights can be loaded and run in), by
    any name `bigload.sizes.parse_dtype` reads ("bfloat16", "bf16", "torch.float16", ...)."""
    try:
        dtype = parse_dtype(text)
    except BudgetError:
        dtype = None
    if dtype is not None and dtype.is_floating_point and dtype.itemsize >= 2:
        return str(dtype).removeprefix("torch.")
    if dtype is None:
        why = ""
    elif dtype.is_floating_point:
        why = " (8-bit floats store weights; a model runs in 16 bits or more)"
    else:
        why = " (an integer type; to store weights as 8-bit integers, use --quantize int8)"
    raise argparse.ArgumentTypeError(f"{text!r} is not a dtype to load a model in{why}; use bfloat16 (bf16), "
                                     "float16 (fp16), float32 (fp32) or float64")


def parse_max_memory_arg(text: str) -> dict[str, str]:
    """'0=24GiB,1=24GiB,cpu=64GiB,disk=500GiB' -> {'0': '24GiB', ...}; sizes are validated by the library."""
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(
                f"cannot read {item!r}; write DEVICE=SIZE pairs separated by commas, e.g. 0=24GiB,cpu=64GiB,disk=500GiB"
            )
        if key.strip() in result:
            raise argparse.ArgumentTypeError(
                f"{key.strip()} is given twice ({key.strip()}={result[key.strip()]} and {item}); give each device once")
        result[key.strip()] = _budget_value(key.strip(), value.strip())
    if not result:
        raise argparse.ArgumentTypeError("--max-memory is empty; e.g. 0=24GiB,cpu=64GiB,disk=500GiB")
    return result


def parse_host_max_memory_arg(text: str) -> tuple[int, dict[str, str]]:
    """'1:0=24GiB,cpu=64GiB' -> (1, {'0': '24GiB', 'cpu': '64GiB'}): one host's budget."""
    host, sep, rest = text.partition(":")
    if not sep or not host.strip().isdigit():
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r}; write HOST:DEVICE=SIZE,..., e.g. 1:0=24GiB,cpu=64GiB (HOST is the rank)")
    return int(host), parse_max_memory_arg(rest)


def _budget_value(key: str, value: str) -> str:
    if value.isdigit() and int(value) < _SMALLEST_BARE_BUDGET:
        raise argparse.ArgumentTypeError(
            f"{key}={value} has no unit, so it would mean {value} bytes; did you mean {key}={value}GiB? "
            "Write sizes with a unit: GiB/MiB (binary) or GB/MB (decimal)."
        )
    return value
