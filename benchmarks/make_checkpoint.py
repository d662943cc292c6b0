"""Write synthetic Llama-architecture Hugging Face model folders for the benchmarks.

A folder holds `config.json`, `generation_config.json`, sharded safetensors files and
`model.safetensors.index.json`, laid out the way `save_pretrained` lays them out. Weights are deterministic
random bf16 values (std 0.02, so greedy generation stays numerically sane); norm weights are 1 + noise, not
all ones, so a loader that silently skips them produces different tokens.

The safetensors files are written by hand, tensor by tensor and chunk by chunk (header first, then raw bytes),
so writing a 7 GB checkpoint holds at most one chunk (~32 MB) in memory, never a shard or the model.
Tensor names and shapes come from `LlamaForCausalLM` built on the meta device, so they match transformers
exactly; a tied checkpoint omits `lm_head.weight`, as `save_pretrained` does.

    python -m benchmarks.make_checkpoint small --out benchmarks/_work/ckpt-small
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

__all__ = ["PRESETS", "Preset", "checkpoint_files", "make_checkpoint"]

# Bump when the bytes a preset produces change, so stale folders under _work/ are rewritten.
FORMAT_VERSION = 1
STAMP = "bench_checkpoint.json"
WEIGHT_STD = 0.02
NORM_NOISE = 0.05
CHUNK_ELEMENTS = 16 * 2**20  # rows are generated in chunks of about this many values (32 MB of bf16)


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_shard_bytes: int
    tie_word_embeddings: bool = False


_SMALL = Preset(2048, 8, 16, 4, 5504, 32000, max_shard_bytes=500 * 10**6)
PRESETS: dict[str, Preset] = {
    # --quick / CI: 8 layers so the offload maps ("layers 4-7 on disk") have the same shape as on `small`.
    "tiny": Preset(64, 8, 4, 2, 176, 1024, max_shard_bytes=600 * 10**3),
    "tiny-tied": Preset(64, 8, 4, 2, 176, 1024, max_shard_bytes=600 * 10**3, tie_word_embeddings=True),
    "small": _SMALL,  # ~0.97 GB
    "tied": replace(_SMALL, tie_word_embeddings=True),  # ~0.84 GB
    "medium": replace(_SMALL, num_hidden_layers=30, max_shard_bytes=10**9),  # ~2.9 GB: the GPU check's model
    "large": Preset(4096, 16, 32, 32, 11008, 32000, max_shard_bytes=2 * 10**9),  # ~7.0 GB
}


def llama_config(preset: Preset):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        intermediate_size=preset.intermediate_size,
        vocab_size=preset.vocab_size,
        tie_word_embeddings=preset.tie_word_embeddings,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype="bfloat16",
    )


def tensor_shapes(preset: Preset) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the checkpoint's tensors, in `state_dict` order, from transformers itself."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(preset))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if preset.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # save_pretrained stores a tied weight once, under the embedding's name
    return shapes


def _generate(name: str, shape: tuple[int, ...], seed: int):
    """Yield the tensor's bf16 values as row chunks; each chunk has its own seeded generator, so the
    bytes depend only on (seed, name, chunk) and never on how much memory the writer has."""
    rows = shape[0]
    row_len = math.prod(shape[1:]) if len(shape) > 1 else 1
    rows_per_chunk = max(1, CHUNK_ELEMENTS // row_len)
    is_norm = name.endswith("norm.weight")
    for chunk, start in enumerate(range(0, rows, rows_per_chunk)):
        n = min(rows_per_chunk, rows - start)
        gen = torch.Generator().manual_seed((zlib.crc32(name.encode()) * 1_000_003 + chunk + seed) % 2**63)
        values = torch.randn((n * row_len,), generator=gen, dtype=torch.float32)
        values = 1.0 + NORM_NOISE * values if is_norm else WEIGHT_STD * values
        yield values.to(torch.bfloat16)


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in shapes.items():
            for chunk in _generate(name, shape, seed):
                f.write(chunk.view(torch.int16).numpy().data)
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be evicted; the cold-cache runs need them clean
    tmp.rename(path)


def _shard(shapes: dict[str, tuple[int, ...]], max_shard_bytes: int) -> list[dict[str, tuple[int, ...]]]:
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    return shards


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder written here, in index order."""
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    return [Path(folder) / name for name in dict.fromkeys(index["weight_map"].values())]


def make_checkpoint(preset_name: str, out: Path, *, seed: int = 0, force: bool = False) -> Path:
    """Write preset `preset_name` into folder `out` (skipped when an identical one is already there).

    Returns the folder. Raises KeyError for an unknown preset.
    """
    preset = PRESETS[preset_name]
    out = Path(out)
    stamp = {"version": FORMAT_VERSION, "preset": preset_name, "seed": seed, **asdict(preset)}
    stamp_path = out / STAMP
    if not force and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()

    shapes = tensor_shapes(preset)
    shards = _shard(shapes, preset.max_shard_bytes)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / name, shard, seed)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(math.prod(s) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = llama_config(preset)
    config.save_pretrained(out)
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite even if an identical folder exists")
    args = parser.parse_args(argv)
    folder = make_checkpoint(args.preset, args.out, seed=args.seed, force=args.force)
    size = sum(f.stat().st_size for f in checkpoint_files(folder))
    print(f"{folder}: {size / 1e9:.2f} GB in {len(checkpoint_files(folder))} shard(s)")


if __name__ == "__main__":
    main()
