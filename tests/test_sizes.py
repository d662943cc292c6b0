import pytest
import torch

from bigload.errors import BudgetError
from bigload.sizes import dtype_width, format_size, parse_dtype, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GiB", 24 * 2**30),
        ("24GB", 24 * 10**9),
        ("24 gib", 24 * 2**30),
        ("1.5TiB", int(1.5 * 2**40)),
        ("512MB", 512 * 10**6),
        ("100", 100),
        ("0", 0),
        (4096, 4096),
        (1.5e9, 1_500_000_000),
        ("10KiB", 10240),
        ("7B", 7),
    ],
)
def test_parse_size_reads_binary_and_decimal_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["24 GiBs", "GiB", "", "24XB", "1e3GB", "abc", None, True, [1], float("nan")])
def test_parse_size_rejects_what_is_not_a_size(bad):
    with pytest.raises(BudgetError, match="size"):
        parse_size(bad)


@pytest.mark.parametrize("bad", [-1, "-24GiB", -0.5])
def test_parse_size_rejects_negative_sizes(bad):
    with pytest.raises(BudgetError, match="negative"):
        parse_size(bad)


def test_parse_size_names_what_the_size_was_for():
    with pytest.raises(BudgetError, match=r"max_memory\['cpu'\]"):
        parse_size("lots", what="max_memory['cpu']")


def test_format_size_uses_binary_units():
    assert format_size(0) == "0 B"
    assert format_size(1536) == "1.50 KiB"
    assert format_size(3 * 2**30) == "3.00 GiB"
    assert format_size(-2**20) == "-1.00 MiB"
    assert format_size(5 * 2**40) == "5.00 TiB"


def test_parse_dtype_accepts_common_names():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("FLOAT32") is torch.float32
    assert parse_dtype(torch.int8) is torch.int8
    with pytest.raises(BudgetError, match="unknown dtype 'float13'"):
        parse_dtype("float13")


def test_dtype_width_matches_element_size():
    assert dtype_width(torch.bfloat16) == 2
    assert dtype_width(torch.float32) == 4
    assert dtype_width(torch.bool) == 1
    assert dtype_width(torch.int64) == 8
