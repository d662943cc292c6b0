"""Tests for the loader (`load_checkpoint_in_model`, `bigload.load.loader`): every format into a meta-built transformers Llama, device maps mixing cpu and
disk, casts, tied weights, strictness, buffers, and peak private memory measured in a subprocess."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from accelerate.utils import OffloadedWeightsLoader
from safetensors.torch import save_file
from torch import nn

from bigload.formats.mapped import CheckpointReader
from bigload.empty import init_empty_weights
from bigload.errors import CheckpointError, DeviceError, OffloadError, PlanError
from bigload.load.store import DiskStore
from bigload.load.store_writer import StoreWriter
from bigload.load.loader import LoadResult, Mismatch
from bigload.integrations.loading import load_checkpoint_in_model
from fixtures_ckpt import assert_bitwise_equal, mapped_file_of, save_bin_shards, tiny_llama, tiny_llama_config

TOKENS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127]])


def meta_llama(*, tie: bool = False, include_buffers: bool = False) -> nn.Module:
    from transformers import LlamaForCausalLM

    with init_empty_weights(include_buffers=include_buffers):
        model = LlamaForCausalLM(tiny_llama_config(tie=tie))
    return model.eval()


def tensors_on_meta(model: nn.Module) -> list[str]:
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return [name for name, tensor in named if tensor.device.type == "meta"]


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def checkpoints(reference: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference model saved as single/sharded safetensors and single/sharded .bin."""
    root = tmp_path_factory.mktemp("ckpts")
    reference.save_pretrained(root / "st_sharded", max_shard_size="20KB")
    (root / "st_single").mkdir()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, root / "st_single" / "model.safetensors", metadata={"format": "pt"})
    save_bin_shards(state, root / "bin_single", 1)
    save_bin_shards(state, root / "bin_sharded", 3)
    return {path.name: path for path in root.iterdir()}


# --- formats -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["st_single", "st_sharded", "bin_single", "bin_sharded"])
def test_every_format_loads_bitwise_and_gives_the_same_logits(fmt: str, checkpoints: dict[str, Path],
                                                               reference: nn.Module) -> None:
    model = meta_llama()
    result = load_checkpoint_in_model(model, checkpoints[fmt])
    assert result == LoadResult(bytes_read=result.bytes_read)
    assert result.bytes_read == sum(t.numel() * t.element_size() for t in reference.state_dict().values())
    assert tensors_on_meta(model) == []
    expected = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert_bitwise_equal(tensor, expected[name], name=name)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, reference(TOKENS).logits)


def test_cpu_tensors_are_file_backed_views_of_the_right_class(checkpoints: dict[str, Path]) -> None:
    model = meta_llama()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    load_checkpoint_in_model(model, checkpoints["st_single"])
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert type(weight) is nn.Parameter and weight.requires_grad
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert mapped_file_of(weight.data_ptr()) == str(checkpoints["st_single"].resolve() / "model.safetensors")

    copied = meta_llama()
    load_checkpoint_in_model(copied, checkpoints["st_single"], materialize=True)
    backing = mapped_file_of(copied.model.layers[0].self_attn.q_proj.weight.data_ptr())
    assert backing is None or not backing.endswith(".safetensors")
    assert_bitwise_equal(copied.model.layers[0].self_attn.q_proj.weight, weight)


def test_plan_objects_and_unmapped_tensors(checkpoints: dict[str, Path]) -> None:
    @dataclass(frozen=True)
    class FakePlan:
        device_map: dict

    model = meta_llama()
    load_checkpoint_in_model(model, checkpoints["st_single"], FakePlan({"": "cpu"}))
    assert tensors_on_meta(model) == []
    with pytest.raises(PlanError, match=r"places no module holding 1 tensor\(s\), e.g. \['lm_head.weight'\]; add"):
        load_checkpoint_in_model(meta_llama(), checkpoints["st_single"], {"model": "cpu"})
    with pytest.raises(DeviceError, match="device_map='auto' must be planned first"):
        load_checkpoint_in_model(meta_llama(), checkpoints["st_single"], "auto")


# --- dtypes --------------------------------------------------------------------------------------------


class Mixed(nn.Module):
    """Float weights, an integer buffer, a bool mask and a float8 tensor: only the floats may be cast."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.register_buffer("counts", torch.arange(4))
        self.register_buffer("mask", torch.tensor([True, False]))
        self.register_buffer("q8", torch.zeros(4, dtype=torch.float8_e4m3fn))


def test_casts_floats_only_and_keeps_fp32_modules(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Mixed()
    source.q8.copy_(torch.randn(4).to(torch.float8_e4m3fn))
    save_file(dict(source.state_dict()), tmp_path / "model.safetensors")
    with init_empty_weights(include_buffers=True):
        model = Mixed()
    load_checkpoint_in_model(model, tmp_path, dtype="bfloat16", keep_in_fp32_modules=["norm"])
    assert model.proj.weight.dtype == torch.bfloat16
    assert_bitwise_equal(model.proj.weight, source.proj.weight.to(torch.bfloat16))
    assert model.norm.weight.dtype == torch.float32 and model.norm.bias.dtype == torch.float32
    assert_bitwise_equal(model.counts, source.counts)
    assert_bitwise_equal(model.mask, source.mask)
    assert_bitwise_equal(model.q8, source.q8)


def test_default_dtype_is_the_models(tmp_path: Path, reference: nn.Module) -> None:
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in reference.state_dict().items()},
              tmp_path / "model.safetensors")
    model = meta_llama()  # built in float32
    load_checkpoint_in_model(model, tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    half = meta_llama().to(torch.float16)
    load_checkpoint_in_model(half, tmp_path)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert_bitwise_equal(half.lm_head.weight, reference.lm_head.weight.to(torch.bfloat16).to(torch.float16))


# --- tied weights and buffers --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_tied_weights_are_read_once_and_stay_one_parameter(tmp_path: Path, fmt: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    source = tiny_llama(tie=True)
    if fmt == "safetensors":
        source.save_pretrained(tmp_path)  # drops lm_head.weight
    else:
        torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")  # both names, one storage
    reads: list[str] = []
    original_read = CheckpointReader.read
    monkeypatch.setattr(CheckpointReader, "read",
                        lambda self, ref: reads.append(ref.name) or original_read(self, ref))
    model = meta_llama(tie=True)
    result = load_checkpoint_in_model(model, tmp_path)
    assert result.unexpected == () and result.missing == ()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(name in ("lm_head.weight", "model.embed_tokens.weight") for name in reads) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, source(TOKENS).logits)


def test_meta_rotary_buffers_are_recomputed(checkpoints: dict[str, Path], reference: nn.Module) -> None:
    model = meta_llama(include_buffers=True)
    assert model.model.rotary_emb.inv_freq.device.type == "meta"
    load_checkpoint_in_model(model, checkpoints["st_sharded"])
    assert tensors_on_meta(model) == []
    assert_bitwise_equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, reference(TOKENS).logits)


class Scaled(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.register_buffer("table", torch.linspace(0, 1, width), persistent=False)


def test_meta_buffer_that_cannot_be_rebuilt_says_how_to_build(tmp_path: Path) -> None:
    save_file(dict(Scaled(4).state_dict()), tmp_path / "model.safetensors")
    with init_empty_weights(include_buffers=True):
        model = Scaled(4)
    with pytest.raises(CheckpointError, match=r"buffer 'table' is on the meta device .*"
                                              r"init_empty_weights\(include_buffers=False\)"):
        load_checkpoint_in_model(model, tmp_path)
    with init_empty_weights():  # buffers stay real on the CPU
        real_buffers = Scaled(4)
    load_checkpoint_in_model(real_buffers, tmp_path)
    assert real_buffers.table.device.type == "cpu"


# --- strictness ----------------------------------------------------------------------------------------


def test_strict_reports_missing_unexpected_and_mismatched_before_reading(
        tmp_path: Path, reference: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    del state["lm_head.weight"]
    state["model.extra.weight"] = torch.ones(2)
    state["model.norm.weight"] = torch.ones(5)
    save_file(state, tmp_path / "model.safetensors")
    monkeypatch.setattr(CheckpointReader, "read",
                        lambda self, ref: pytest.fail("strict mode read a tensor before reporting"))
    pattern = (r"does not match the model: 1 missing: lm_head.weight; 1 unexpected: model.extra.weight; "
               r"1 with mismatched shapes: model.norm.weight \(checkpoint \[5\], model \[32\]\).*another shape")
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint_in_model(meta_llama(), tmp_path, strict=True)
    # Shapes that differ are refused whatever strict says (accelerate raises for them too).
    with pytest.raises(CheckpointError, match="mismatched shapes"):
        load_checkpoint_in_model(meta_llama(), tmp_path)
    del state["model.norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"2 missing: .*1 unexpected: .*pass strict=False"):
        load_checkpoint_in_model(meta_llama(), tmp_path, strict=True)


def test_non_strict_by_default_returns_and_logs(tmp_path: Path, reference: nn.Module,
                                                caplog: pytest.LogCaptureFixture) -> None:
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if "layers.1." not in k}
    state["model.extra.weight"] = torch.ones(2)
    save_file(state, tmp_path / "model.safetensors")
    model = meta_llama()
    with caplog.at_level(logging.WARNING, logger="bigload"):
        result = load_checkpoint_in_model(model, tmp_path)  # accelerate's default: strict=False
    assert len(result.missing) == 9 and all("layers.1." in name for name in result.missing)
    assert result.unexpected == ("model.extra.weight",) and result.mismatched == ()
    assert (f"Some weights of the model checkpoint at {tmp_path} were not used when initializing LlamaForCausalLM: "
            "{'model.extra.weight'}. This may or may not be an issue") in caplog.text
    assert "9 tensors of LlamaForCausalLM are not in the checkpoint" in caplog.text
    assert sorted(tensors_on_meta(model)) == sorted(result.missing)


def test_many_missing_names_are_cut_at_twenty(tmp_path: Path) -> None:
    save_file({"unrelated": torch.ones(1)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"21 missing: .*\.\.\. \(21 in all\)"):
        load_checkpoint_in_model(meta_llama(), tmp_path, strict=True)


def test_mismatch_value_prints_both_shapes() -> None:
    assert str(Mismatch("w", (2, 3), (3, 2))) == "w (checkpoint [2, 3], model [3, 2])"


def test_only_loads_the_named_modules(checkpoints: dict[str, Path], reference: nn.Module) -> None:
    model = meta_llama()
    # A pipeline rank's map names only its own modules.
    result = load_checkpoint_in_model(model, checkpoints["st_sharded"], {"model.layers.0": "cpu"},
                                      only=["model.layers.0"])
    assert result.missing == () and result.unexpected == ()
    loaded = {name for name, p in model.named_parameters() if p.device.type != "meta"}
    assert loaded and all(name.startswith("model.layers.0.") for name in loaded)
    assert_bitwise_equal(model.model.layers[0].mlp.down_proj.weight, reference.model.layers[0].mlp.down_proj.weight)


# --- devices and disk ----------------------------------------------------------------------------------


def test_gpu_in_map_without_gpu_fails_before_opening_anything(tmp_path: Path) -> None:
    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a GPU 7")
    with pytest.raises(DeviceError, match=r"cuda:7 does not exist on this machine \(\d+ CUDA device\(s\) visible\)"):
        load_checkpoint_in_model(meta_llama(), tmp_path / "does-not-exist", {"": 7})


DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}


def materialize_from_store(model: nn.Module, store: DiskStore) -> None:
    """Bring disk-offloaded tensors in for a plain forward (the hooks' job at runtime)."""
    state = {name: store.get(name) for name in store.names}
    model.load_state_dict(state, strict=False, assign=True)


def test_cpu_and_disk_map_with_references(tmp_path: Path, checkpoints: dict[str, Path],
                                          reference: nn.Module) -> None:
    folder = tmp_path / "offload"
    model = meta_llama()
    result = load_checkpoint_in_model(model, checkpoints["st_sharded"], DISK_MAP, offload_folder=folder)
    assert sorted(tensors_on_meta(model)) == sorted(result.offloaded)
    assert "lm_head.weight" in result.offloaded and len(result.offloaded) == 10
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sorted(p.name for p in folder.iterdir()) == ["bigload.json", "index.json"], "references copy nothing"
    expected = reference.state_dict()
    loader = OffloadedWeightsLoader(save_folder=str(folder))
    for name in result.offloaded:
        assert_bitwise_equal(loader[name], expected[name], name=name)
    assert result.store is not None
    materialize_from_store(model, result.store)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, reference(TOKENS).logits)


def test_disk_with_cast_writes_dat_files_and_reuses_them(tmp_path: Path, checkpoints: dict[str, Path],
                                                         reference: nn.Module,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "offload"
    model = meta_llama()
    result = load_checkpoint_in_model(model, checkpoints["bin_sharded"], DISK_MAP, offload_folder=folder,
                                      dtype=torch.float16)
    assert model.lm_head.weight.device.type == "meta" and model.lm_head.weight.dtype == torch.float16
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    index = json.loads((folder / "index.json").read_text())
    assert index["lm_head.weight"] == {"dtype": "float16", "shape": [128, 32]}
    assert (folder / "lm_head.weight.dat").stat().st_size == 128 * 32 * 2
    for name in result.offloaded:
        assert_bitwise_equal(result.store.get(name), reference.state_dict()[name].half(), name=name)

    monkeypatch.setattr(StoreWriter, "put", lambda *a, **k: pytest.fail("a matching store must be reused"))
    again = load_checkpoint_in_model(meta_llama(), checkpoints["bin_sharded"], DISK_MAP, offload_folder=folder,
                                     dtype=torch.float16)
    assert set(again.store.names) == set(result.store.names)
    with pytest.raises(OffloadError, match=r"holds weights from .*float16.*not from .*bfloat16.*another offload_folder"):
        load_checkpoint_in_model(meta_llama(), checkpoints["bin_sharded"], DISK_MAP, offload_folder=folder,
                                 dtype=torch.bfloat16)


def test_disk_without_offload_folder(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(OffloadError, match=r"sends 10 tensors .* to 'disk' but no offload_folder was given"):
        load_checkpoint_in_model(meta_llama(), checkpoints["st_single"], DISK_MAP)


def test_failure_mid_load_leaves_no_index(tmp_path: Path, checkpoints: dict[str, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "offload"
    calls = []
    real_put = StoreWriter.put

    def failing_put(self: StoreWriter, name: str, tensor: torch.Tensor, **kwargs: object) -> None:
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk unplugged")
        real_put(self, name, tensor, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(StoreWriter, "put", failing_put)
    with pytest.raises(OSError, match="disk unplugged"):
        load_checkpoint_in_model(meta_llama(), checkpoints["st_single"], DISK_MAP, offload_folder=folder,
                                 dtype=torch.float16)
    assert list(folder.iterdir()) == []


def test_progress_bar_on_demand(checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    load_checkpoint_in_model(meta_llama(), checkpoints["st_single"], progress=True)
    assert "loading" in capsys.readouterr().err
    load_checkpoint_in_model(meta_llama(), checkpoints["st_single"])  # small load, not a terminal: silent
    assert capsys.readouterr().err == ""


def test_window_smaller_than_a_tensor_still_loads(checkpoints: dict[str, Path], reference: nn.Module) -> None:
    model = meta_llama()
    load_checkpoint_in_model(model, checkpoints["st_sharded"], dtype=torch.float16, window_bytes=1)
    assert_bitwise_equal(model.lm_head.weight, reference.lm_head.weight.half())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_placement_through_pinned_staging(tmp_path: Path, checkpoints: dict[str, Path],
                                              reference: nn.Module) -> None:
    model = meta_llama()
    # A 1 MiB window makes a 4 MiB tensor cross the staging ring several times.
    big = {"proj.weight": torch.randn(1024, 1024)}
    save_file(big, tmp_path / "model.safetensors")
    with init_empty_weights():
        linear = nn.Sequential()
        linear.add_module("proj", nn.Linear(1024, 1024, bias=False))
    load_checkpoint_in_model(linear, tmp_path, {"": 0}, dtype=torch.float16, window_bytes=1 << 20)
    assert linear.proj.weight.device.type == "cuda"
    assert_bitwise_equal(linear.proj.weight.cpu(), big["proj.weight"].half())

    gpu_map = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    load_checkpoint_in_model(model, checkpoints["st_sharded"], gpu_map)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert model.model.rotary_emb.inv_freq.device.type == "cuda"
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS.cuda()).logits.cpu(), reference(TOKENS).logits, rtol=1e-4, atol=1e-4)


# --- peak private memory, in a fresh process -----------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, threading, time
    import torch
    from torch import nn
    from bigload.empty import init_empty_weights
    from bigload.integrations.loading import load_checkpoint_in_model

    def rss():
        kinds = {}
        for line in open("/proc/self/status"):
            if line.startswith(("RssAnon:", "RssFile:")):
                kinds[line.split(":")[0]] = int(line.split()[1]) * 1024
        return kinds["RssAnon"], kinds["RssFile"]

    def measure(mode):
        with init_empty_weights():
            model = nn.Sequential(*[nn.Linear(int(width), int(width), bias=False) for _ in range(int(layers))])
        kwargs = {"window_bytes": int(window), "progress": False}
        if mode == "cpu-cast":
            kwargs["dtype"] = torch.float16
        if mode == "disk-cast":
            kwargs.update(dtype=torch.float16, offload_folder=folder)
        device_map = {"": "disk"} if mode.startswith("disk") else None
        gc.collect()
        base = rss()
        peak = list(base)
        done = threading.Event()
        def sample():
            while not done.is_set():
                peak[:] = map(max, peak, rss())
                time.sleep(0.0005)
        sampler = threading.Thread(target=sample)
        sampler.start()
        load_checkpoint_in_model(model, ckpt, device_map, **kwargs)
        done.set()
        sampler.join()
        peak[:] = map(max, peak, rss())
        return {"private": peak[0] - base[0], "file": peak[1] - base[1]}

    ckpt, folder, window, layers, width = sys.argv[1:6]
    # Modes that keep least run first, so memory a mode frees cannot hide the next one's growth.
    print(json.dumps({mode: measure(mode) for mode in ("cpu", "disk-cast", "cpu-cast")}))
    """
)

LAYERS, WIDTH = 12, 2048  # 12 x 16 MiB float32 = 192 MiB in one file
WINDOW = 32 * 2**20
SLACK = 24 * 2**20  # thread stacks, allocator and interpreter noise


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "model.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_file({f"{i}.weight": torch.randn(WIDTH, WIDTH, generator=generator) for i in range(LAYERS)}, path)
    return path


def test_peak_private_memory_is_cast_results_plus_the_window(big_checkpoint: Path, tmp_path: Path) -> None:
    """Anonymous (private) and file-backed memory measured in a fresh process while loading a 192 MiB checkpoint."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(big_checkpoint), str(tmp_path / "off"), str(WINDOW),
         str(LAYERS), str(WIDTH)],
        capture_output=True, text=True, check=True, env=env,
    )
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    shard = LAYERS * WIDTH * WIDTH * 4
    kept = {"cpu": 0, "disk-cast": 0, "cpu-cast": shard // 2}  # only float16 results stay in memory
    for mode, growth in peak.items():
        private = growth["private"]
        assert private <= kept[mode] + WINDOW + SLACK, (mode, peak)
        assert private - kept[mode] < shard / 4, ("never a whole shard", mode, peak)
    for mode in ("disk-cast", "cpu-cast"):
        # Pages of tensors already cast are unmapped as they are placed: the file's pages mapped into this
        # process stay within the window, not the whole shard.
        assert peak[mode]["file"] <= WINDOW + SLACK, (mode, peak)