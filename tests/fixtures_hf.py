"""Tiny random transformers models, one per architecture family, saved as real sharded checkpoints.

Each `Arch` builds a model small enough that saving and loading it takes milliseconds, with weights drawn
wide enough (normal, std 0.2) that greedy generation does not repeat one token. `write_model` saves it the
way the Hub holds such models: `save_pretrained(..., max_shard_size="20KB")`, so every checkpoint has
several shards and an index, and transformers 5 writes Mixtral's experts per expert (`experts.N.w1`)
while the model holds them fused (`experts.gate_up_proj`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

SHARD = "20KB"
VOCAB = 128
PROMPT = [[3, 17, 5, 42, 9, 11, 64]]


def _llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=None)


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=None)


def _mixtral() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=None)


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=None)


def _gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1,
                      eos_token_id=None, pad_token_id=0)


def _t5() -> Any:
    from transformers import T5Config

    return T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                    eos_token_id=None)


def _bart() -> Any:
    from transformers import BartConfig

    return BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                      decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                      eos_token_id=None, decoder_start_token_id=2, forced_bos_token_id=None,
                      forced_eos_token_id=None)


def _bert() -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)


@dataclass(frozen=True)
class Arch:
    """One architecture family.

    kind: "causal" (decoder-only LM), "seq2seq" (encoder-decoder LM) or "encoder" (BERT).
    saved_as: the transformers class whose weights the checkpoint holds.
    architectures: what config.json names (the Hub's BERT checkpoints hold BertForPreTraining weights but
        name BertForMaskedLM), when it differs from `saved_as`.
    std, matrices_only: how weights are drawn. Post-LayerNorm BART repeats one token unless only its matrices
        are drawn, and wider.
    """

    name: str
    config: Callable[[], Any]
    saved_as: str
    kind: str
    architectures: str | None = None
    std: float = 0.2
    matrices_only: bool = False

    @property
    def generative(self) -> bool:
        return self.kind in ("causal", "seq2seq")


ARCHS = {
    arch.name: arch
    for arch in (
        Arch("llama", _llama, "LlamaForCausalLM", "causal"),
        Arch("mistral", _mistral, "MistralForCausalLM", "causal"),
        Arch("mixtral", _mixtral, "MixtralForCausalLM", "causal"),
        Arch("qwen2", _qwen2, "Qwen2ForCausalLM", "causal"),
        Arch("gpt2", _gpt2, "GPT2LMHeadModel", "causal"),
        Arch("t5", _t5, "T5ForConditionalGeneration", "seq2seq"),
        Arch("bart", _bart, "BartForConditionalGeneration", "seq2seq", std=0.5, matrices_only=True),
        Arch("bert", _bert, "BertForPreTraining", "encoder", architectures="BertForMaskedLM"),
    )
}


def build_model(arch: Arch, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A randomly initialised `arch.saved_as` model in `dtype`, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, arch.saved_as)(arch.config())
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 or not arch.matrices_only:
                param.normal_(0.0, arch.std)
    return model.to(dtype).eval()


def write_model(arch: Arch, folder: Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny random `arch` model to `folder` as sharded safetensors (config.json, index, shards)."""
    build_model(arch, dtype=dtype).save_pretrained(folder, max_shard_size=SHARD)
    if arch.architectures is not None:
        edit_config(folder, architectures=[arch.architectures])
    return folder


def edit_config(folder: Path, **changes: Any) -> None:
    """Change (or, with None, remove) fields of `folder`/config.json."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the safetensors shards in `folder`."""
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))
