"""safetensors files: the header parsed and validated by bigload itself (dtype codes, offsets, overlaps),
never trusting the file."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import torch

from bigload.errors import CheckpointError
from bigload.formats.refs import SAFETENSORS, TensorRef, file_size
from bigload.sizes import dtype_width

__all__ = ["MAX_HEADER_BYTES", "SAFETENSORS_DTYPES", "read_safetensors_header"]

# safetensors' dtype codes for every type torch can hold byte-addressably. Packed sub-byte types (F4, F6)
# have a byte length that is not shape x width, so they are refused as unknown rather than mis-read.
SAFETENSORS_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        code: dtype
        for code, dtype in {
            "F64": torch.float64,
            "F32": torch.float32,
            "F16": torch.float16,
            "BF16": torch.bfloat16,
            "I64": torch.int64,
            "I32": torch.int32,
            "I16": torch.int16,
            "I8": torch.int8,
            "U64": getattr(torch, "uint64", None),
            "U32": getattr(torch, "uint32", None),
            "U16": getattr(torch, "uint16", None),
            "U8": torch.uint8,
            "BOOL": torch.bool,
            "C64": torch.complex64,
            "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
            "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
            "F8_E5M2": getattr(torch, "float8_e5m2", None),
            "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
            "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
        }.items()
        if dtype is not None
    }
)

# The safetensors library refuses headers above 100 MB; so do we, before allocating anything for one.
MAX_HEADER_BYTES = 100_000_000



def read_safetensors_header(path: Path) -> tuple[list[TensorRef], dict[str, str]]:
    """Parse and validate one safetensors file's header; read no tensor bytes.

    Args:
        path: a `.safetensors` file.

    Returns:
        (refs sorted by offset, the `__metadata__` dict).

    Raises:
        CheckpointError: naming the file (and the tensor) for a file too small to hold a header, a header
            length past the end of the file, a header that is not a JSON object, an unknown dtype, a bad
            shape, offsets outside the data section, overlapping tensors, or a byte length that is not
            shape x dtype width.

    >>> refs, meta = read_safetensors_header(Path("model.safetensors"))  # doctest: +SKIP
    """
    path = path.resolve()
    size = file_size(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(
                f"{path}: {size} bytes is too small to be a safetensors file (the 8-byte header "
                "length is missing); the file is truncated or empty. Download or save it again."
            )
        (header_len,) = struct.unpack("<Q", prefix)
        # Check the length field against the real file before trusting it with an allocation.
        if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: the header claims {header_len} bytes but the file has {size - 8} after the "
                f"length field (limit {MAX_HEADER_BYTES}); the file is truncated or not a safetensors file."
            )
        raw = handle.read(header_len)
    header = _parse_header_json(path, raw)
    data_start = 8 + header_len
    metadata = _header_metadata(path, header.pop("__metadata__", None))
    refs = [_header_entry(path, name, entry, data_start, size - data_start) for name, entry in header.items()]
    refs.sort(key=lambda ref: ref.offset)
    _check_no_overlap(path, refs)
    return refs, metadata


def _parse_header_json(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    # ValueError covers UnicodeDecodeError, JSONDecodeError and over-long integers; RecursionError deep nesting.
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid UTF-8 JSON ({exc}); the file is corrupt or not a "
            "safetensors file."
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the safetensors header is a JSON {type(header).__name__}, expected an object mapping "
            "tensor names to entries."
        )
    return header


def _header_metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CheckpointError(
            f"{path}: '__metadata__' must map strings to strings, got {json.dumps(value)[:200]}."
        )
    return dict(value)


def _header_entry(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorRef:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry must be an object with dtype, shape, data_offsets.")
    code = entry.get("dtype")
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{where}: unknown dtype {code!r}; bigload reads {', '.join(SAFETENSORS_DTYPES)}."
        )
    dtype = SAFETENSORS_DTYPES[code]
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_index(dim) for dim in shape):
        raise CheckpointError(f"{where}: shape {shape!r} must be a list of non-negative integers.")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} must be two non-negative integers [begin, end].")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] fall outside the data section of {data_len} bytes; "
            "the file is truncated or its header is wrong."
        )
    expected = math.prod(shape) * dtype_width(dtype)
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes but shape {shape} of {code} "
            f"needs {expected}; the header is inconsistent."
        )
    return TensorRef(name, dtype, tuple(shape), path, data_start + begin, end - begin, SAFETENSORS)


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(path: Path, refs: list[TensorRef]) -> None:
    previous: TensorRef | None = None
    for ref in refs:
        if ref.nbytes == 0:
            continue
        if previous is not None and ref.offset < previous.offset + previous.nbytes:
            raise CheckpointError(
                f"{path}: tensors {previous.name!r} and {ref.name!r} overlap in the data section; "
                "the header is corrupt."
            )
        previous = ref
