"""PyTorch `.bin`/`.pt` zip archives, listed without unpickling anything but tensors:
`torch.load(mmap=True, weights_only=True, map_location="meta")` refuses pickles that would run code and reads no
tensor bytes, while torch reports where each storage record starts in the zip file."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Mapping

import torch

from bigload.errors import CheckpointError
from bigload.formats.refs import TORCH, TensorRef, file_size
from bigload.sizes import dtype_width

__all__ = ["read_torch_archive", "strided_extent"]



def read_torch_archive(path: Path) -> list[TensorRef]:
    """List the tensors of a `torch.save` zip archive without reading their bytes.

    `torch.load(..., weights_only=True)` is torch's restricted unpickler: a pickle that would import or call
    anything but tensor-rebuilding functions raises instead of running. With `map_location="meta"` torch
    creates no data and records each storage's byte offset in the zip file (`_checkpoint_offset`);
    storages are stored uncompressed, so that offset plus the view's storage offset is the tensor's bytes.

    Raises:
        CheckpointError: for an unsafe pickle, a legacy (non-zip) file, a non-dict top level, or a tensor
            whose bytes would lie past the end of the file.
    """
    path = path.resolve()
    size = file_size(path)
    try:
        loaded = torch.load(path, mmap=True, weights_only=True, map_location="meta")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: it holds objects other than tensors, which could run code "
            f"({str(exc).splitlines()[0]}). Convert the checkpoint to safetensors with a trusted tool, "
            "or load it yourself if you trust its source."
        ) from None
    except (RuntimeError, ValueError, OSError, EOFError) as exc:
        raise CheckpointError(
            f"{path}: cannot list this PyTorch checkpoint ({str(exc).splitlines()[0]}); bigload reads the "
            "zip format torch.save writes since torch 1.6. Re-save it with torch.save or as safetensors."
        ) from None
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(loaded).__name__}, expected a state dict mapping names to tensors."
        )
    refs = [_torch_ref(path, name, tensor, size) for name, tensor in loaded.items()
            if isinstance(name, str) and isinstance(tensor, torch.Tensor)]
    refs.sort(key=lambda ref: (ref.offset, ref.name))
    return refs


def _torch_ref(path: Path, name: str, tensor: torch.Tensor, file_size: int) -> TensorRef:
    width = dtype_width(tensor.dtype)
    storage = tensor.untyped_storage()
    base = getattr(storage, "_checkpoint_offset", None)
    if base is None:
        raise CheckpointError(
            f"{path}: torch {torch.__version__} did not report where tensor {name!r} is stored; "
            "convert the checkpoint to safetensors."
        )
    shape = tuple(tensor.shape)
    contiguous = tensor.is_contiguous()
    extent = strided_extent(shape, tensor.stride()) * width
    offset = base + tensor.storage_offset() * width
    if offset + extent > min(file_size, base + storage.nbytes()) and extent > 0:
        raise CheckpointError(
            f"{path}: tensor {name!r} would span bytes [{offset}, {offset + extent}) past its storage or the "
            f"end of the {file_size}-byte file; the archive is truncated or corrupt."
        )
    return TensorRef(name, tensor.dtype, shape, path, offset, extent, TORCH,
                     None if contiguous else tuple(tensor.stride()))


def strided_extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements from the first to one past the last element a strided view touches."""
    if math.prod(shape) == 0:
        return 0
    return 1 + sum((dim - 1) * step for dim, step in zip(shape, stride))
