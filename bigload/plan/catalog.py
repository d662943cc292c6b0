"""Published hyper-parameters of well-known models, so a plan needs nothing downloaded.

`bigload plan llama-3.1-405b` builds the model on the meta device from these values. Each entry is the
`config.json` of the released checkpoint, reduced to the fields that decide tensor shapes, dtypes and the
KV cache. Names are case-insensitive; aliases point at the same entry.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["CATALOG", "catalog_config", "catalog_names"]

_LLAMA3_ROPE_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

_ENTRIES: dict[str, dict[str, Any]] = {
    "llama-3-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "dtype": "bfloat16",
    },
    "llama-3-70b": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "dtype": "bfloat16",
    },
    "llama-3.1-405b": {
        "model_type": "llama", "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
        "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "rope_scaling": _LLAMA3_ROPE_SCALING, "tie_word_embeddings": False, "dtype": "bfloat16",
    },
    "mistral-7b": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "sliding_window": 4096, "tie_word_embeddings": False, "dtype": "bfloat16",
    },
    "mixtral-8x7b": {
        "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
        "num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": False, "dtype": "bfloat16",
    },
    "qwen2.5-72b": {
        "model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "dtype": "bfloat16",
    },
    "gemma-2-27b": {
        "model_type": "gemma2", "hidden_size": 4608, "intermediate_size": 36864, "num_hidden_layers": 46,
        "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128, "vocab_size": 256000,
        "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "sliding_window": 4096, "query_pre_attn_scalar": 144, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "dtype": "bfloat16",
    },
}

_ALIASES = {
    "llama-3.1-8b": "llama-3-8b",
    "llama-3.1-70b": "llama-3-70b",
    "meta-llama-3-8b": "llama-3-8b",
    "meta-llama-3-70b": "llama-3-70b",
    "meta-llama-3.1-405b": "llama-3.1-405b",
    "llama-3-405b": "llama-3.1-405b",
    "mistral-7b-v0.1": "mistral-7b",
    "mixtral-8x7b-v0.1": "mixtral-8x7b",
    "qwen2.5-72b-instruct": "qwen2.5-72b",
    "gemma-2-27b-it": "gemma-2-27b",
}

CATALOG: Mapping[str, Mapping[str, Any]] = MappingProxyType(_ENTRIES)


def catalog_names() -> tuple[str, ...]:
    """The catalog's canonical names, sorted."""
    return tuple(sorted(_ENTRIES))


def catalog_config(name: str) -> dict[str, Any] | None:
    """The config dict for a catalog name or alias (case-insensitive; an `org/` prefix is ignored), or None."""
    key = name.strip().lower().rsplit("/", 1)[-1]
    key = _ALIASES.get(key, key)
    entry = _ENTRIES.get(key)
    if entry is None:
        return None
    # Deep enough a copy that a caller editing the result cannot change the catalog.
    return {k: dict(v) if isinstance(v, dict) else v for k, v in entry.items()}
