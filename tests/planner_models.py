"""Tiny hand-built models for the planner tests, named after what they exercise.

Sizes are float32 and chosen so maps can be worked out by hand: a `Block` is two 16x16 Linears without bias
(2 x 1024 bytes = 2048 bytes), the embedding and the head are 32 x 16 (2048 bytes each), the norm 128 bytes.
"""

from __future__ import annotations

from torch import nn

from bigload.empty import init_empty_weights

BLOCK = 2048
EMBED = 2048
NORM = 128
HEAD = 2048


class Block(nn.Module):
    """A residual block: never split when named in no_split_module_classes."""

    def __init__(self, width: int = 16, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, width, bias=False)


class Toy(nn.Module):
    """embed -> layers.0..n-1 -> norm -> head; `tie=True` shares the head's weight with the embedding."""

    _no_split_modules = ["Block"]

    def __init__(self, layers: int = 4, tie: bool = False, hidden: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.layers = nn.ModuleList(Block(16, h) for h in (hidden or (16,) * layers))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 32, bias=False)
        if tie:
            self.head.weight = self.embed.weight


def toy(layers: int = 4, tie: bool = False, hidden: tuple[int, ...] | None = None) -> Toy:
    with init_empty_weights():
        return Toy(layers, tie, hidden)


def tiny_llama_config(layers: int = 4, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=tie)


def tiny_llama(layers: int = 4, tie: bool = False) -> nn.Module:
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        return LlamaForCausalLM(tiny_llama_config(layers, tie))


def device_of(device_map: dict, name: str):
    """The device of tensor `name` under transformers' longest-dotted-prefix rule."""
    key = name
    while key not in device_map:
        if not key:
            raise KeyError(f"{name} is not covered by {device_map}")
        key = key.rpartition(".")[0]
    return device_map[key]


def tensor_devices(model: nn.Module, device_map: dict) -> dict[str, object]:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    return {name: device_of(device_map, name) for name in names}


__all__ = ["BLOCK", "Block", "EMBED", "HEAD", "NORM", "Toy", "device_of", "tensor_devices", "tiny_llama",
           "tiny_llama_config", "toy"]
