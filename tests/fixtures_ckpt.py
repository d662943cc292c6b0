"""Checkpoint fixtures shared by the checkpoint, store and stream tests.

Tiny real transformers Llama models (random weights, a few KB), saved in every format bigload reads,
plus a writer for hand-made (malformed) safetensors files.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Mapping

import torch


def tiny_llama_config(*, tie: bool = False, layers: int = 2, hidden: int = 32, vocab: int = 128):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def tiny_llama(*, tie: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised LlamaForCausalLM, deterministic for a given seed, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tie=tie, **config_kwargs)).to(dtype)
    return model.eval()


def save_bin_shards(state_dict: Mapping[str, torch.Tensor], folder: Path, shards: int) -> Path:
    """Write `pytorch_model-0000i-of-0000n.bin` shards and `pytorch_model.bin.index.json` like transformers 4.

    Returns the index path. `shards == 1` writes a single `pytorch_model.bin` and returns its path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state_dict)
    if shards == 1:
        path = folder / "pytorch_model.bin"
        torch.save(dict(state_dict), path)
        return path
    per_shard = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        shard_name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        chunk = {name: state_dict[name] for name in names[i * per_shard:(i + 1) * per_shard]}
        torch.save(chunk, folder / shard_name)
        weight_map.update({name: shard_name for name in chunk})
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def write_safetensors_raw(path: Path, header: object, data: bytes, *, pad_to: int | None = 8,
                          header_len: int | None = None) -> Path:
    """Write a safetensors file from a header object (or raw header bytes) and a data section.

    `pad_to=None` leaves the header unpadded, so tensor offsets may be unaligned; `header_len` overrides
    the length field (to make it lie).
    """
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad_to:
        raw += b" " * (-len(raw) % pad_to)
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, *, name: str = "") -> None:
    """Same dtype, shape and bytes (NaN-safe, unlike value comparison)."""
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    a = actual.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    b = expected.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(a, b), f"bytes differ for {name}"


def mapped_file_of(address: int) -> str | None:
    """The file backing `address` in this process, from /proc/self/maps (None for anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else None
    return None
