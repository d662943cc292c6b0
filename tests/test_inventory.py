"""Inventories: sizes at a target dtype, ties, no-split sets, KV-cache specs, header-only inventories."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from bigload.plan.headers import block_of, inventory_from_checkpoint
from bigload.plan.inventory import inventory_from_module
from bigload.plan.kv import kv_cache_spec
from planner_models import BLOCK, EMBED, HEAD, NORM, tiny_llama, toy


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)  # 16 floats
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))  # never cast
        self.register_buffer("mask", torch.ones(8, dtype=torch.bool))  # never cast
        self.register_buffer("freqs", torch.ones(2), persistent=False)  # non-persistent: counted, never cast


class KeepsFp32(nn.Module):
    _keep_in_fp32_modules = ["wo"]

    def __init__(self) -> None:
        super().__init__()
        self.wi = nn.Linear(4, 4, bias=False)
        self.wo = nn.Linear(4, 4, bias=False)


def test_sizes_in_execution_order_with_subtree_ranges():
    inv = inventory_from_module(toy())
    assert inv.names[:6] == ("", "embed", "layers", "layers.0", "layers.0.fc1", "layers.0.fc2")
    assert inv.total_bytes == EMBED + 4 * BLOCK + NORM + HEAD
    assert inv.size("layers") == 4 * BLOCK
    assert inv.size("layers.2") == BLOCK
    assert [inv.names[c] for c in inv.children(0)] == ["embed", "layers", "norm", "head"]
    assert inv.no_split_names() == ("layers.0", "layers.1", "layers.2", "layers.3")  # Toy._no_split_modules


def test_target_dtype_casts_floats_only_and_counts_every_buffer():
    inv = inventory_from_module(WithBuffers(), dtype=torch.bfloat16)
    sizes = {t.name: (t.nbytes, t.dtype, t.buffer) for t in inv.tensors}
    assert sizes["proj.weight"] == (32, torch.bfloat16, False)
    assert sizes["steps"] == (24, torch.int64, True)
    assert sizes["mask"] == (8, torch.bool, True)
    # Computed (non-persistent) buffers are never loaded, so never cast: the loader leaves them as built.
    assert sizes["freqs"] == (8, torch.float32, True)
    assert inv.total_bytes == 32 + 24 + 8 + 8
    assert inv.subtree_buffer_bytes(0) == 40


def test_special_dtypes_override_the_target():
    inv = inventory_from_module(WithBuffers(), dtype=torch.bfloat16, special_dtypes={"proj.weight": "float32"})
    assert {t.name: t.nbytes for t in inv.tensors}["proj.weight"] == 64


def test_keep_in_fp32_modules_default_from_the_model_at_half_precision():
    half = inventory_from_module(KeepsFp32(), dtype=torch.float16)
    assert {t.name: t.dtype for t in half.tensors} == {"wi.weight": torch.float16, "wo.weight": torch.float32}
    explicit = inventory_from_module(KeepsFp32(), dtype=torch.float16, keep_in_fp32_modules=["wi"])
    assert {t.name: t.dtype for t in explicit.tensors}["wi.weight"] == torch.float32
    full = inventory_from_module(KeepsFp32(), dtype=torch.float32)
    assert full.total_bytes == 128


def test_tied_weights_are_one_group_and_counted_once():
    inv = inventory_from_module(toy(tie=True))
    assert inv.tied_groups == (("embed.weight", "head.weight"),)
    assert inv.total_bytes == EMBED + 4 * BLOCK + NORM
    assert inv.size("head") == 0


def test_no_split_default_and_override():
    model = tiny_llama()
    assert inventory_from_module(model).no_split_names()[:2] == ("model.layers.0", "model.layers.1")
    assert inventory_from_module(model, no_split_module_classes=[]).no_split_names() == ()
    assert inventory_from_module(model, no_split_module_classes="LlamaMLP").no_split_names()[0] == \
        "model.layers.0.mlp"


def test_kv_spec_from_a_transformers_model():
    inv = inventory_from_module(tiny_llama(), dtype=torch.bfloat16)
    assert inv.kv.layers == tuple(f"model.layers.{i}" for i in range(4))
    assert (inv.kv.kv_heads, inv.kv.head_dim) == (2, 16)
    assert inv.kv.bytes_per_token() == 2 * 2 * 16 * 2
    assert inv.kv.layer_bytes(100, 3) == 2 * 2 * 16 * 2 * 100 * 3


LAYERS = ["model.layers.0", "model.layers.1"]


@pytest.mark.parametrize("config, expected", [
    ({"num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64}, 2 * 2 * 64 * 2),
    ({"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 256}, 2 * 8 * 32 * 2),  # no head_dim: MHA
    ({"text_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}}, 2 * 4 * 16 * 2),
    ({"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 256, "is_encoder_decoder": True}, None),
    ({"num_hidden_layers": 2, "hidden_size": 256}, None),  # no heads
    ({"num_hidden_layers": 3, "num_attention_heads": 8, "hidden_size": 256}, None),  # blocks do not match
    (None, None),
])
def test_kv_spec_from_configs(config, expected):
    spec = kv_cache_spec(config, LAYERS, dtype=torch.bfloat16)
    assert (spec.bytes_per_token() if spec else None) == expected


def test_kv_spec_skips_linear_attention_layers():
    config = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
              "layer_types": ["linear_attention", "full_attention"]}
    assert kv_cache_spec(config, LAYERS).layers == ("model.layers.1",)


def test_inventory_of_200k_modules_is_fast():
    # Built by hand (nn.Linear.__init__ 200,000 times takes a minute); the inventory only reads the tree.
    template = nn.Linear(1, 1, device="meta")
    shared = {k: v for k, v in template.__dict__.items() if k not in ("_parameters", "_modules", "_buffers")}
    weight, bias = torch.empty(16, 16, device="meta"), torch.empty(16, device="meta")

    def linear() -> nn.Linear:
        module = nn.Linear.__new__(nn.Linear)
        module.__dict__.update(shared, _parameters={"weight": nn.Parameter(weight), "bias": nn.Parameter(bias)},
                               _buffers={}, _modules={})
        return module

    root = nn.Module()
    gc.disable()
    try:
        for b in range(100):
            experts = nn.ModuleList()
            experts._modules.update((str(e), linear()) for e in range(2000))
            block = nn.Module()
            block._modules["experts"] = experts
            root._modules[str(b)] = block
    finally:
        gc.enable()
    start = time.perf_counter()
    inv = inventory_from_module(root, dtype=torch.bfloat16)
    elapsed = time.perf_counter() - start
    assert len(inv) == 200_201
    assert inv.total_bytes == 100 * 2000 * (256 + 16) * 2
    assert elapsed < 10, f"inventory of 200k modules took {elapsed:.1f} s (target 2 s)"


# ----------------------------------------------------------------------------------------------
# From checkpoint headers


@dataclass(frozen=True)
class Ref:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path = Path("/ckpt/model.safetensors")

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class StandInIndex:
    tensors: dict
    files: tuple = (Path("/ckpt/model.safetensors"),)


def stand_in(*refs: Ref) -> StandInIndex:
    return StandInIndex({ref.name: ref for ref in refs})


def test_blocks_from_tensor_names():
    assert block_of("model.layers.17.mlp.up_proj.weight") == "model.layers.17"
    assert block_of("model.layers.17.mlp.experts.3.w1.weight") == "model.layers.17"
    assert block_of("lm_head.weight") == "lm_head"
    assert block_of("model.norm.weight") == "model.norm"


def test_header_inventory_groups_numbered_blocks_in_number_order():
    # safetensors sorts names inside a file: layers.10 before layers.2, lm_head before model.
    index = stand_in(
        Ref("lm_head.weight", torch.float32, (8, 4)),
        Ref("model.embed_tokens.weight", torch.float32, (8, 4)),
        Ref("model.layers.10.w.weight", torch.float32, (4, 4)),
        Ref("model.layers.2.w.weight", torch.float32, (4, 4)),
        Ref("model.layers.2.w.bias", torch.float32, (4,)),
        Ref("model.norm.weight", torch.float32, (4,)),
        Ref("model.layers.2.step", torch.int64, (1,)),
    )
    inv = inventory_from_checkpoint(index, dtype=torch.bfloat16)
    assert inv.names == ("", "model", "model.embed_tokens", "model.layers", "model.layers.2", "model.layers.2.w",
                         "model.layers.10", "model.layers.10.w", "model.norm", "lm_head")
    assert inv.no_split_names() == ("model.layers.2", "model.layers.10")
    assert inv.size("model.layers.2") == (16 + 4) * 2 + 8  # bf16 floats, the int64 kept
    assert inv.total_bytes == (32 + 32 + 16 + 16 + 4 + 4) * 2 + 8
    assert inv.tied_groups == ()


def test_header_inventory_with_explicit_containers_and_errors():
    index = stand_in(Ref("blocks.a.w", torch.float16, (2,)), Ref("blocks.b.w", torch.float16, (2,)))
    inv = inventory_from_checkpoint(index, no_split_prefixes=["blocks"])
    assert inv.no_split_names() == ("blocks.a", "blocks.b")
    from bigload.errors import BigloadError

    with pytest.raises(BigloadError, match="no tensor"):
        inventory_from_checkpoint(stand_in())
    with pytest.raises(BigloadError, match="'a.b' is a tensor and also the module of 'a.b.c'"):
        inventory_from_checkpoint(stand_in(Ref("a.b", torch.float16, (1,)), Ref("a.b.c", torch.float16, (1,))))


def test_header_inventory_of_a_real_sharded_checkpoint(tmp_path):
    from transformers import LlamaForCausalLM

    from bigload.formats.discover import open_checkpoint
    from planner_models import tiny_llama_config

    config = tiny_llama_config()
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path, max_shard_size="200KB")
    index = open_checkpoint(tmp_path)
    assert len(index.files) > 1
    inv = inventory_from_checkpoint(index, config=config)
    model_inv = inventory_from_module(tiny_llama())
    persistent = model_inv.total_bytes - model_inv.subtree_buffer_bytes(0)  # rotary inv_freq is not saved
    assert inv.total_bytes == persistent
    assert inv.kv == model_inv.kv
    assert inv.size("model.layers.3") == model_inv.size("model.layers.3")
