"""The KV cache of a decoder, from a transformers-style config: which blocks hold attention layers and how
many bytes each layer's cache takes per token, so the planner can keep room for a given context length on the
device that runs each layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from bigload.sizes import dtype_width, parse_dtype

__all__ = ["KVCacheSpec", "decoder_block_names", "kv_cache_spec"]


@dataclass(frozen=True)
class KVCacheSpec:
    """The KV cache of a decoder: which blocks hold attention layers and their cache shape.

    Attributes:
        layers: block names of the attention layers (e.g. "model.layers.0"), in order.
        kv_heads: key/value heads per layer.
        head_dim: size of one head.
        width: default bytes per element (the model's dtype) when the planner is given no dtype.
    """

    layers: tuple[str, ...]
    kv_heads: int
    head_dim: int
    width: int

    def bytes_per_token(self, width: int | None = None) -> int:
        """Bytes one token adds to one layer's cache: 2 (K and V) x kv_heads x head_dim x width.

        >>> KVCacheSpec(("model.layers.0",), kv_heads=8, head_dim=128, width=2).bytes_per_token()
        4096
        """
        return 2 * self.kv_heads * self.head_dim * (self.width if width is None else width)

    def layer_bytes(self, context_length: int, batch_size: int = 1, width: int | None = None) -> int:
        """Bytes of one layer's cache for `batch_size` sequences of `context_length` tokens."""
        return self.bytes_per_token(width) * context_length * batch_size


_NON_ATTENTION_LAYER_TYPES = ("linear", "mamba", "conv", "recurrent", "ssm")


def decoder_block_names(names: Sequence[str], no_split: Sequence[bool]) -> tuple[str, ...]:
    """Numbered children of containers, grouped by container, largest group first (the decoder stack).

    Unsplittable numbered blocks are preferred; numbered children of any container are the fallback.
    """
    for require_no_split in (True, False):
        groups: dict[str, list[str]] = {}
        for name, flag in zip(names, no_split):
            if (require_no_split and not flag) or not name[-1:].isdigit():
                continue
            container, _, number = name.rpartition(".")
            if container and number.isdigit():
                groups.setdefault(container, []).append(name)
        if groups:
            return tuple(max(groups.values(), key=len))
    return ()


def _config_get(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def kv_cache_spec(config: Any, block_names: Sequence[str], *, dtype: torch.dtype | str | None = None,
                  ) -> KVCacheSpec | None:
    """The KV-cache shape of a decoder-only model, from a transformers-style config.

    Args:
        config: a config object or dict with `num_hidden_layers`, `num_key_value_heads` (else
            `num_attention_heads`), `head_dim` (else `hidden_size / num_attention_heads`); a `text_config`
            is used when present. Optional `layer_types` drops non-attention layers (linear attention, mamba).
        block_names: the decoder-layer block names, in order (e.g. "model.layers.0", ...).
        dtype: the cache dtype (default float32 width when unknown).

    Returns:
        A `KVCacheSpec`, or None when the config is missing, is an encoder-decoder, lacks a field, or
        describes a different number of layers than `block_names`.

    >>> kv_cache_spec({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64},
    ...               ["model.layers.0", "model.layers.1"], dtype=torch.bfloat16).bytes_per_token()
    128
    """
    if config is None:
        return None
    text = _config_get(config, "text_config")
    if text is not None and _config_get(config, "num_hidden_layers") is None:
        config = text
    if _config_get(config, "is_encoder_decoder"):
        return None
    layers = _config_get(config, "num_hidden_layers")
    heads = _config_get(config, "num_attention_heads")
    kv_heads = _config_get(config, "num_key_value_heads") or heads
    head_dim = _config_get(config, "head_dim")
    hidden = _config_get(config, "hidden_size")
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)):
        return None
    if len(block_names) != layers:
        return None
    names = tuple(block_names)
    layer_types = _config_get(config, "layer_types")
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == len(names):
        names = tuple(name for name, kind in zip(names, layer_types)
                      if not any(word in str(kind).lower() for word in _NON_ATTENTION_LAYER_TYPES))
    width = dtype_width(parse_dtype(dtype)) if dtype is not None else 4
    return KVCacheSpec(layers=names, kv_heads=int(kv_heads), head_dim=int(head_dim), width=width)
