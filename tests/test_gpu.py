"""The GPU path (issue 15): races between the CPU and CUDA streams, inference mode, static caches, the memory
ceiling of `device_map="auto"`. Most need a CUDA device (`gpu` marker, skipped where none exists); the
CPU-checkable parts of each finding are in test_hooks.py, test_plan.py and test_budget.py, and the static
cache also runs here on the CPU.

A race made deterministic: `torch.cuda._sleep` queues a kernel that spins for a while, so work queued after
it on the same stream (the copy of a block's output toward the CPU, a prefetch copy into a slot) lands well
after the CPU has moved on. A copy the CPU reads without waiting then reads garbage, every time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bigload.integrations.loading import load_checkpoint_and_dispatch
from bigload.devices import ExecutionPolicy
from bigload.runtime import detach, runtime_of
from fixtures_models import LAYERS, empty_llama, reference_llama, save_sharded

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 3]])
NEW_TOKENS = 6
SLEEP_CYCLES = 200_000_000  # ~0.1-0.2 s of GPU time: far longer than any CPU block of these tiny models


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_sharded(reference_llama(), tmp_path_factory.mktemp("llama"))


def _reference(folder: Path, device: str = "cpu"):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(device)


def _generate(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=0, **kwargs)


def _mixed_map() -> dict[str, int | str]:
    """GPU -> CPU (run locally) -> disk (streamed to the GPU): every kind of hop in one forward."""
    device_map: dict[str, int | str] = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(1, LAYERS - 1)})
    device_map.update({f"model.layers.{LAYERS - 1}": "disk", "model.norm": "disk", "lm_head": "disk"})
    return device_map


def _sleep_after(module: torch.nn.Module) -> None:
    """Queue a long GPU kernel after `module`'s forward: its output copied toward the CPU lands late."""
    module.register_forward_hook(lambda mod, args, out: torch.cuda._sleep(SLEEP_CYCLES))


def _cache_devices(output) -> list[str]:
    cache = output.cache if hasattr(output, "cache") else output.past_key_values
    return [layer.keys.device.type for layer in cache.layers]


def test_static_cache_with_offloaded_layers_equals_in_memory(checkpoint, tmp_path):
    # transformers 5 initialises each static-cache layer on the device its keys arrive on (lazily, when the
    # map spans devices), so cache layers follow the layers' execution devices: checked on the CPU here, with
    # a GPU (layers on cuda:0 and on the CPU under 'local') in the gpu test below.
    model = empty_llama()
    device_map = {key: ("disk" if key.startswith("model.layers.") and int(key[-1]) % 2 else "cpu")
                  for key in _mixed_map()}
    load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map, offload_folder=tmp_path / "off")
    with torch.no_grad():
        out = _generate(model, PROMPT, cache_implementation="static", return_dict_in_generate=True)
        ref = _generate(_reference(checkpoint), PROMPT, cache_implementation="static")
    assert torch.equal(out.sequences, ref)
    assert _cache_devices(out) == ["cpu"] * LAYERS


# -- finding 1: copies toward the CPU -----------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("input_device", ["cpu", "cuda:0"])
def test_mixed_gpu_cpu_disk_generation_equals_in_memory(checkpoint, tmp_path, input_device):
    model = empty_llama()
    load_checkpoint_and_dispatch(model, checkpoint, device_map=_mixed_map(), offload_folder=tmp_path / "off",
                                 policy=ExecutionPolicy.LOCAL, prefetch=1)
    runtime = runtime_of(model)
    assert runtime.blocks["model.layers.1"].execution_device.type == "cpu"
    assert runtime.blocks[f"model.layers.{LAYERS - 1}"].execution_device.type == "cuda"
    _sleep_after(model.model.layers[0])  # the last GPU block before the CPU ones
    ids = PROMPT.to(input_device)
    reference = _reference(checkpoint)
    with torch.no_grad():
        out = _generate(model, ids)
        ref = _generate(reference, PROMPT)
        logits = model(ids).logits
        torch.testing.assert_close(logits.cpu(), reference(PROMPT).logits, rtol=1e-4, atol=1e-4)
    assert out.device == ids.device and logits.device == ids.device
    assert torch.equal(out.cpu(), ref)


# -- findings 2 and 4: inference mode, slot ordering ---------------------------------------------------


def _disk_on_gpu(checkpoint: Path, folder: Path, prefetch: int):
    model = empty_llama()
    device_map = {key: ("disk" if key.startswith("model.layers.") else 0) for key in _mixed_map()}
    load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map, offload_folder=folder,
                                 prefetch=prefetch)
    assert sum(block.offloaded for block in runtime_of(model).blocks.values()) == LAYERS >= 3
    return model


@gpu
@needs_cuda
@pytest.mark.parametrize("prefetch", [1, 2])
def test_generate_under_inference_mode_twice_then_no_grad(checkpoint, tmp_path, prefetch):
    model = _disk_on_gpu(checkpoint, tmp_path / "off", prefetch)
    ids = PROMPT.to("cuda:0")
    with torch.no_grad():
        ref = _generate(_reference(checkpoint, "cuda:0"), ids)
    for mode in (torch.inference_mode, torch.inference_mode, torch.no_grad):
        with mode():
            assert torch.equal(_generate(model, ids), ref), mode.__name__
    stats = runtime_of(model).stats()
    assert stats.buffers == min(1 + prefetch, LAYERS) and stats.peak_bytes_held <= stats.reserve_bytes
    assert not any(slot.buffer.is_inference() for slot in runtime_of(model).prefetcher.all_slots)


@gpu
@needs_cuda
def test_ordering_stress_slow_compute_long_prompt_then_detach_and_reuse_memory(checkpoint, tmp_path):
    model = _disk_on_gpu(checkpoint, tmp_path / "off", prefetch=2)
    for layer in model.model.layers:
        _sleep_after(layer)  # compute far slower than the prefetch copies into the next slots
    torch.manual_seed(0)
    ids = torch.randint(2, 256, (1, 100), device="cuda:0")
    with torch.no_grad():
        ref = _generate(_reference(checkpoint, "cuda:0"), ids)
        out = _generate(model, ids)
    plain = detach(model)  # right away: prefetch copies may still be in flight into the slots
    fills = [torch.full((1 << 20,), float(i), device="cuda:0") for i in range(64)]  # reuse the freed memory
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    assert all(bool((fill == float(i)).all()) for i, fill in enumerate(fills))
    with torch.no_grad():
        plain.to("cuda:0")
        assert torch.equal(_generate(plain, ids), ref)


@gpu
@needs_cuda
def test_static_cache_on_gpu_and_local_cpu_layers(checkpoint, tmp_path):
    model = empty_llama()
    load_checkpoint_and_dispatch(model, checkpoint, device_map=_mixed_map(), offload_folder=tmp_path / "off",
                                 policy=ExecutionPolicy.LOCAL)
    with torch.no_grad():
        out = _generate(model, PROMPT, cache_implementation="static", return_dict_in_generate=True)
        ref = _generate(_reference(checkpoint), PROMPT, cache_implementation="static")
    assert torch.equal(out.sequences.cpu(), ref)
    # Each cache layer where its layer runs: cuda:0, the CPU ('local'), cuda:0 again (disk, streamed).
    assert _cache_devices(out) == ["cuda"] + ["cpu"] * (LAYERS - 2) + ["cuda"]


# -- finding 3: the memory ceiling of device_map="auto" ------------------------------------------------


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory) -> Path:
    """A float32 Llama of ~0.7 GB (~0.35 GB as bfloat16): big enough for budgets to matter on a GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    folder = tmp_path_factory.mktemp("wide")
    model.save_pretrained(folder, max_shard_size="200MB")
    return folder


@gpu
@needs_cuda
@pytest.mark.parametrize("max_memory", [None, {0: "1300MiB", "cpu": "16GiB"}], ids=["probed", "given"])
def test_auto_map_of_a_float32_checkpoint_loaded_as_bf16_prefills_2k_tokens_within_budget(
        wide_checkpoint, tmp_path, max_memory):
    from bigload.plan.budget import detect_budget
    from bigload.integrations.hf import from_pretrained

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(0)
    budget = detect_budget(max_memory).get(0)
    model = from_pretrained(wide_checkpoint, dtype=torch.bfloat16, max_memory=max_memory, context_length=2048,
                            offload_folder=tmp_path / "off", progress=False)
    plan = model.bigload_plan
    assert plan.usage_of(0).headroom >= 2**30  # the default GPU headroom
    if max_memory is not None:
        assert "cpu" in plan.device_map.values()  # the budget really constrains the plan
    ids = torch.randint(2, 32000, (1, 2048), device="cuda:0")
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (1, 2050)
    assert torch.cuda.max_memory_reserved(0) <= budget


# -- finding 5: pinned host memory within what the plan charged the cpu ----------------------------------


def _pinned_now() -> int:
    """Bytes torch's pinned host allocator holds (in use or cached), as it took them from the system."""
    stats = getattr(torch.cuda, "host_memory_stats", lambda: {})()
    return int(stats.get("allocated_bytes.current", 0))


@gpu
@needs_cuda
def test_pinned_staging_stays_within_the_cpu_reserve_the_plan_charged(checkpoint):
    from bigload.integrations.loading import plan_for_model
    from bigload.plan.inventory import inventory_from_module
    from bigload.load.gpu import empty_pinned_cache as _empty_pinned_cache

    total = inventory_from_module(empty_llama()).total_bytes
    plan = plan_for_model(empty_llama(), "sequential", max_memory={0: total // 2, "cpu": "1GiB"},
                          policy="stream", headroom=0)
    charged = plan.usage_of("cpu").reserve
    assert plan.offloaded and plan.slots.staged and charged == plan.slots.staging_bytes > 0
    torch.cuda.synchronize()
    _empty_pinned_cache()
    before = _pinned_now()
    model = empty_llama()
    load_checkpoint_and_dispatch(model, checkpoint, device_map=plan)  # streams through the loader's ring
    ids = PROMPT.to("cuda:0")
    with torch.no_grad():
        out = _generate(model, ids)
        ref = _generate(_reference(checkpoint), PROMPT)
    assert torch.equal(out.cpu(), ref)
    stats = runtime_of(model).stats()
    assert stats.staging_bytes == plan.slots.staging_bytes <= charged
    # What torch really pins now: the slots' staging; the loader's ring went back to the system after loading.
    assert _pinned_now() - before <= charged
