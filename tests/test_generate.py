"""Offloaded generation gives exactly the tokens (and logits) of the same model fully in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bigload.integrations.dispatch import cpu_offload, disk_offload, dispatch_model
from bigload.integrations.loading import load_checkpoint_and_dispatch
from bigload.runtime import DEFAULT_SKIP_KEYS, detach, runtime_of
from fixtures_models import LAYERS, empty_llama, llama_map, reference_llama, save_sharded

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 3]])
NEW_TOKENS = 6
DTYPES = [torch.float32, torch.bfloat16]


def _cache_kwarg() -> str:
    """The keyword the installed transformers passes a decoder layer its KV cache under."""
    import inspect

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    params = inspect.signature(LlamaDecoderLayer.forward).parameters
    return next(name for name in ("cache", "past_key_values", "past_key_value") if name in params)


CACHE_KWARG = _cache_kwarg()
# `generate` takes the cache under the layers' name (`cache` since transformers 5.24; the old name warns).
GENERATE_CACHE_KWARG = "cache" if CACHE_KWARG == "cache" else "past_key_values"


def test_the_installed_transformers_cache_keyword_is_never_moved():
    # A release that renames the cache argument again must fail here, not as a silent device move.
    assert CACHE_KWARG in DEFAULT_SKIP_KEYS


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path_factory) -> tuple[Path, bool]:
    folder = tmp_path_factory.mktemp("tied" if request.param else "untied")
    save_sharded(reference_llama(tie=request.param), folder)
    assert len(list(folder.glob("*.safetensors"))) > 2  # really sharded
    return folder, request.param


def _reference(folder: Path, dtype: torch.dtype, *, own_memory: bool = True):
    """The model fully in memory with transformers' own loader.

    from_pretrained leaves float32 weights as views into the safetensors files (8-byte-aligned offsets), and
    CPU matrix-vector kernels sum in an order that depends on alignment (1e-7 apart in decode steps). So
    the reference has the alignment of the model it is compared with: weights in their own allocations
    (`own_memory`) against models given weights from memory; as loaded against bigload's streamer, which
    also uses views of the same files.
    """
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if own_memory:
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.clone()
    return model


def _generate(model) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW_TOKENS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def _bigload_model(folder: Path, dtype: torch.dtype, tie: bool):
    """The user's path: an empty model, then the reference's weights assigned (what a loader produces)."""
    model = empty_llama(tie=tie, dtype=dtype)
    state = _reference(folder, dtype).state_dict()
    model.load_state_dict(state, assign=True, strict=False)
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _assert_same_generation(model, reference) -> None:
    tokens, logits = _generate(model)
    ref_tokens, ref_logits = _generate(reference)
    assert torch.equal(tokens, ref_tokens)
    assert tokens.shape[1] == PROMPT.shape[1] + NEW_TOKENS
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)  # same arithmetic on the CPU: bit-equal


PLACEMENTS = {
    "in_memory": [],
    "half_on_disk": list(range(0, LAYERS, 2)),
    "all_on_disk": list(range(LAYERS)),
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_dispatched_generation_equals_in_memory(checkpoint, tmp_path, placement):
    """dispatch_model on real weights writes the disk blocks itself (both dtypes: the streamed test below)."""
    folder, tie = checkpoint
    dtype = torch.float32
    model = _bigload_model(folder, dtype, tie)
    device_map = llama_map(PLACEMENTS[placement])
    dispatch_model(model, device_map, offload_dir=tmp_path / "offload", force_hooks=True)
    assert model.hf_device_map == device_map
    _assert_same_generation(model, _reference(folder, dtype))
    runtime = runtime_of(model)
    offloaded = [name for name, block in runtime.blocks.items() if block.offloaded]
    assert offloaded == [f"model.layers.{i}" for i in PLACEMENTS[placement]]
    if offloaded:
        stats = runtime.stats()
        assert stats.peak_bytes_held <= stats.reserve_bytes
        assert stats.order == tuple(offloaded)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_streamed_and_dispatched_generation_equals_in_memory(checkpoint, tmp_path, placement, dtype):
    """The whole user path: empty model, sharded safetensors streamed to cpu/disk, hooks, generate."""
    folder, tie = checkpoint
    model = empty_llama(tie=tie)
    device_map = llama_map(PLACEMENTS[placement])
    offload = tmp_path / "offload"
    load_checkpoint_and_dispatch(model, folder, device_map=device_map, offload_folder=offload, dtype=dtype)
    assert model.hf_device_map == device_map
    assert offload.exists() is bool(PLACEMENTS[placement])
    _assert_same_generation(model, _reference(folder, dtype, own_memory=False))
    for i in PLACEMENTS[placement]:
        assert model.model.layers[i].mlp.up_proj.weight.device.type == "meta"  # released between forwards


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_offload_generation_equals_in_memory(checkpoint, dtype):
    folder, tie = checkpoint
    model = cpu_offload(_bigload_model(folder, dtype, tie), execution_device="cpu")
    _assert_same_generation(model, _reference(folder, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_disk_offload_generation_equals_in_memory(checkpoint, tmp_path, dtype):
    folder, tie = checkpoint
    model = disk_offload(_bigload_model(folder, dtype, tie), tmp_path / "offload", execution_device="cpu")
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing resident between forwards
    _assert_same_generation(model, _reference(folder, dtype))
    stats = runtime_of(model).stats()
    assert stats.peak_bytes_held <= stats.reserve_bytes
    detach(model)
    _assert_same_generation(model, _reference(folder, dtype))


def test_kv_cache_stays_on_its_device_and_is_never_copied(checkpoint, tmp_path):
    """Decoder layers on disk receive the very cache object, and its tensors are updated in place."""
    from transformers import StaticCache

    folder, tie = checkpoint
    model = _bigload_model(folder, torch.float32, tie)
    dispatch_model(model, llama_map(range(LAYERS)), offload_dir=tmp_path / "offload")
    cache = StaticCache(config=model.config, max_cache_len=PROMPT.shape[1] + NEW_TOKENS + 1)
    received: list[object] = []
    pointers: list[tuple[int, ...]] = []

    def spy(module, args, kwargs):
        # Runs after bigload's pre-hook (registered later): sees what the layer really gets.
        received.append(kwargs[CACHE_KWARG])
        layers = kwargs[CACHE_KWARG].layers
        pointers.append(tuple(layer.keys.data_ptr() for layer in layers if layer.is_initialized))

    handle = model.model.layers[1].register_forward_pre_hook(spy, with_kwargs=True)
    with torch.no_grad():
        model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW_TOKENS,
                       do_sample=False, pad_token_id=0, **{GENERATE_CACHE_KWARG: cache})
    handle.remove()
    assert len(received) == NEW_TOKENS and all(item is cache for item in received)
    assert len(set(pointers[1:])) == 1  # same storage at every decoding step: nothing copied
    assert all(layer.keys.device.type == "cpu" for layer in cache.layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_disk_layers_streamed_to_the_gpu_generate_the_same_tokens(checkpoint, tmp_path, prefetch):
    folder, tie = checkpoint
    device_map = {key: (0 if value == "cpu" else value) for key, value in llama_map(range(1, LAYERS)).items()}
    model = empty_llama(tie=tie)
    load_checkpoint_and_dispatch(model, folder, device_map=device_map, offload_folder=tmp_path / "off",
                                 prefetch=prefetch)
    reference = _reference(folder, torch.float32).to("cuda:0")
    with torch.no_grad():
        ids = PROMPT.to("cuda:0")
        ref = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert torch.equal(out, ref)
    stats = runtime_of(model).stats()
    layer_bytes = runtime_of(model).blocks["model.layers.1"].slot_bytes
    assert stats.reserve_bytes == layer_bytes * min(1 + prefetch, LAYERS - 1)
    assert stats.peak_bytes_held <= stats.reserve_bytes
