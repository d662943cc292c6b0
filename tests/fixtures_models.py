"""Model fixtures for the hooks, dispatch and generate tests.

Tiny transformers Llama models (hidden 64, 4 layers, random weights) saved as real sharded safetensors,
built again under `init_empty_weights()` the way a user of bigload would; and small plain `nn.Module`s
named after the edge case they cover.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bigload.empty import init_empty_weights

LAYERS = 4
HIDDEN = 64


def llama_config(*, tie: bool = False, dtype: torch.dtype = torch.float32, bias: bool = False):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
        attention_bias=bias,  # biased projections: what peft's `lora_bias` merges into
        mlp_bias=bias,
    )
    config.dtype = dtype
    return config


def reference_llama(*, tie: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0, bias: bool = False):
    """A randomly initialised LlamaForCausalLM fully in memory, in `dtype`, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tie=tie, dtype=torch.float32, bias=bias))
    # Random weights large enough that greedy tokens are not all the same id.
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.to(dtype).eval()


def save_sharded(model: nn.Module, folder: Path, max_shard_size: str = "60KB") -> Path:
    """`save_pretrained` to real sharded safetensors (several shards plus an index)."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


def empty_llama(*, tie: bool = False, dtype: torch.dtype = torch.float32, bias: bool = False):
    """The same architecture built with no memory, as a bigload user does, in `dtype`."""
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(llama_config(tie=tie, dtype=dtype, bias=bias))
    if dtype != torch.float32:
        # Only floating parameters are on meta; buffers (rotary inv_freq) keep the float32 values
        # transformers computes, exactly like the reference model's.
        for param in model.parameters():
            param.data = param.data.to(dtype)
    return model.eval()


def llama_map(disk_layers: range | list[int], *, where: str = "disk") -> dict[str, int | str]:
    """A device map in execution order: everything on cpu except the given decoder layers on `where`."""
    device_map: dict[str, int | str] = {"model.embed_tokens": "cpu"}
    for i in range(LAYERS):
        device_map[f"model.layers.{i}"] = where if i in disk_layers else "cpu"
    device_map.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    return device_map


class ThreeBlocks(nn.Module):
    """Three linear blocks of different sizes and a buffer: the smallest model with an execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.second = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.third = nn.Linear(16, 4)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.third(self.second(self.first(x))) * self.scale


class OutOfOrder(nn.Module):
    """Registers its blocks in an order different from the one forward runs them in."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Linear(8, 8)
        self.middle = nn.Linear(8, 8)
        self.first = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.middle(self.first(x)))


class TiedEnds(nn.Module):
    """Embedding and output projection share one weight, in two different top-level blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(ids))))


class WithBufferBlock(nn.Module):
    """A block owning a buffer, for `offload_buffers`."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = BufferedLinear()
        self.out = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class BufferedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("shift", torch.arange(4, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.shift


class UsesChildWeight(nn.Module):
    """Reads its child's weight directly instead of calling the child (needs `preload_module_classes`)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj.weight.t() + self.proj.bias


class HasPreloaded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = UsesChildWeight()
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inner(x))
