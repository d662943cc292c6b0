"""The newcomer's first run: a small random-weight Llama folder that bigload plans, offloads and runs.

`write_demo_model` writes a real Hugging Face folder (config.json, sharded safetensors with an index, a
byte-level tokenizer, generation_config.json) with deterministic random weights, so the demo needs no
network. The folder is cached: a second run reuses it when its marker file matches the size preset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from bigload.errors import BigloadError

__all__ = ["DEMO_SIZES", "DemoSize", "write_demo_model"]


@dataclass(frozen=True)
class DemoSize:
    """Hyper-parameters of a demo preset (Llama architecture, byte-level vocabulary)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_shard_size: str


DEMO_SIZES: dict[str, DemoSize] = {
    "small": DemoSize("small", 256, 688, 8, 8, 2, "4MB"),
    "medium": DemoSize("medium", 1024, 2816, 16, 16, 4, "100MB"),
}

_MARKER = "bigload-demo.json"


def _byte_level_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    # Every byte is a token and there are no merges: any text round-trips, with no vocabulary to download.
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for special in ("<s>", "</s>", "<unk>"):
        vocab[special] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_demo_model(folder: str | Path, size: str = "small", *, seed: int = 0) -> Path:
    """Write (once) a random-weight Llama model folder for the demo and return its path.

    Args:
        folder: where to write; reused as is when it already holds this preset.
        size: a key of `DEMO_SIZES`.
        seed: weights are `torch.manual_seed(seed)` deterministic.

    Raises:
        BigloadError: an unknown size.
    """
    if size not in DEMO_SIZES:
        raise BigloadError(f"unknown demo size {size!r}; use one of: {', '.join(DEMO_SIZES)}.")
    preset = DEMO_SIZES[size]
    folder = Path(folder).expanduser()
    marker = folder / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("size") == size:
        return folder

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_level_tokenizer()
    config = LlamaConfig(
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        # Norm weights away from 1 so a loader that skips them produces different tokens.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.8, 1.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=preset.max_shard_size)
    tokenizer.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=False
    ).save_pretrained(folder)
    # The marker is written last: an interrupted write is redone on the next run.
    marker.write_text(json.dumps({"size": size, "seed": seed}))
    return folder
