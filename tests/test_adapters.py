"""Adapters (peft) on an offloaded base: peft's own calls on a model bigload dispatched with layers on disk,
compared with peft on the same base fully in memory."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import pytest
import torch

from bigload import load_checkpoint_and_dispatch
from bigload.errors import AdapterError, OffloadError
from bigload.runtime import runtime_of
from bigload.load.store import DiskStore
from fixtures_models import LAYERS, empty_llama, llama_map, reference_llama, save_sharded
from timeouts import with_timeout

peft = pytest.importorskip("peft")

IDS = torch.tensor([[3, 17, 5, 42, 9, 11, 64, 8]])
DISK_LAYERS = [1, 2]


def save_adapter(base: torch.nn.Module, config: object, folder: Path, *, seed: int, widen: str, std: float) -> Path:
    """`config` on `base`, the tensors whose names contain `widen` drawn with `std` (peft starts LoRA's B at
    zero and prompts small; wide ones make the adapter change greedy tokens), saved with save_pretrained."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if widen in name:
                param.normal_(0.0, std)
    model.save_pretrained(folder)
    return folder


def write_lora(folder: Path, seed: int) -> Path:
    """A LoRA adapter on q_proj/v_proj of the reference Llama, with random A and B."""
    lora = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    return save_adapter(reference_llama(), lora, folder, seed=seed, widen="lora_B", std=0.3)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "base": save_sharded(reference_llama(), root / "base"),
        "lora": write_lora(root / "lora", seed=1),
        "lora2": write_lora(root / "lora2", seed=2),
    }


def dispatched(files: dict[str, Path], offload: Path):
    return load_checkpoint_and_dispatch(empty_llama(), files["base"], device_map=llama_map(DISK_LAYERS),
                                        offload_folder=offload)


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return with_timeout(lambda: model(input_ids=ids).logits)


def greedy(model, tokens: int = 8) -> torch.Tensor:
    return with_timeout(lambda: model.generate(input_ids=IDS, max_new_tokens=tokens, do_sample=False))


def test_peft_calls_on_a_disk_offloaded_base_equal_peft_in_memory(files, tmp_path):
    ours = peft.PeftModel.from_pretrained(dispatched(files, tmp_path / "offload"), files["lora"])
    reference = peft.PeftModel.from_pretrained(reference_llama(), files["lora"])
    base = logits(reference_llama())
    assert not torch.allclose(logits(reference), base, atol=1e-2)  # the adapter really changes the outputs
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)

    ours.load_adapter(files["lora2"], adapter_name="second")
    reference.load_adapter(files["lora2"], adapter_name="second")
    ours.set_adapter("second")
    reference.set_adapter("second")
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)
    assert torch.equal(greedy(ours), greedy(reference))
    with ours.disable_adapter(), reference.disable_adapter():
        torch.testing.assert_close(logits(ours), base, atol=1e-5, rtol=0)
    ours.set_adapter("default")
    reference.set_adapter("default")
    assert torch.equal(greedy(ours), greedy(reference))
    assert not torch.equal(greedy(ours), greedy(reference_llama()))


def test_adapter_weights_of_offloaded_layers_are_real_and_on_the_execution_device(files, tmp_path):
    ours = peft.PeftModel.from_pretrained(dispatched(files, tmp_path / "offload"), files["lora"])
    reference = peft.PeftModel.from_pretrained(reference_llama(), files["lora"])
    expected = dict(reference.named_parameters())
    adapter = {name: tensor for name, tensor in ours.named_parameters() if "lora_" in name}
    assert len(adapter) == 4 * 2 * 2  # 4 layers x (q, v) x (A, B)
    for name, tensor in adapter.items():
        assert tensor.device == torch.device("cpu"), name
        assert torch.equal(tensor, expected[name]), name
    # The base weights of disk layers stay offloaded: placeholders between forwards, bytes in the store.
    q_proj = ours.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight
    assert q_proj.device.type == "meta"
    assert runtime_of(ours.base_model.model).blocks["model.layers.1"].offloaded


def test_merge_and_unload_writes_merged_weights_into_the_offload_store(files, tmp_path):
    checkpoint = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files["base"].iterdir()}
    offload = tmp_path / "offload"
    ours = peft.PeftModel.from_pretrained(dispatched(files, offload), files["lora"])
    origin_before = json.loads((offload / "bigload.json").read_text())["fingerprint"]
    merged = ours.merge_and_unload()
    expected = peft.PeftModel.from_pretrained(reference_llama(), files["lora"]).merge_and_unload()

    assert merged is ours.base_model.model and runtime_of(merged) is not None
    torch.testing.assert_close(logits(merged), logits(expected), atol=1e-5, rtol=0)
    assert torch.equal(greedy(merged), greedy(expected))
    store = DiskStore.open(offload)
    reference = dict(expected.named_parameters())
    for layer in DISK_LAYERS:
        for proj in ("q_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            assert (offload / f"{name}.dat").is_file()  # a copy now, no longer a reference into the checkpoint
            assert torch.equal(store.get(name), reference[name]), name
            assert merged.get_submodule(name.rsplit(".", 1)[0]).weight.device.type == "meta"  # not in RAM
    assert json.loads((offload / "bigload.json").read_text())["fingerprint"] != origin_before
    assert checkpoint == {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                          for path in files["base"].iterdir()}


def test_merge_adapter_and_unmerge_adapter_reach_the_offloaded_weights(files, tmp_path):
    ours = peft.PeftModel.from_pretrained(dispatched(files, tmp_path / "offload"), files["lora"])
    reference = peft.PeftModel.from_pretrained(reference_llama(), files["lora"])
    adapted = logits(reference)
    ours.merge_adapter()
    reference.merge_adapter()
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(ours), adapted, atol=1e-4, rtol=0)
    store = DiskStore.open(tmp_path / "offload")
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(store.get(name), reference.get_parameter(f"base_model.model.{name[:-7]}.base_layer.weight"))
    ours.unmerge_adapter()
    reference.unmerge_adapter()
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours), logits(reference_llama()), atol=1e-5, rtol=0)


def test_unload_gives_back_the_base_model(files, tmp_path):
    ours = peft.PeftModel.from_pretrained(dispatched(files, tmp_path / "offload"), files["lora"])
    base = ours.unload()
    assert not any("lora_" in name for name, _ in base.named_parameters())
    torch.testing.assert_close(logits(base), logits(reference_llama()), atol=1e-5, rtol=0)


def test_peft_re_dispatch_over_disk_is_refused_with_the_fix(files, tmp_path):
    # A model larger than RAM: peft's own map then spans cpu and disk (a small max_memory stands for the RAM
    # here) and accelerate's dispatch_model copies the disk share out of the state dict, offloaded weights
    # included. torch's error would be "Cannot copy out of meta tensor; no data!".
    base = dispatched(files, tmp_path / "offload")
    with pytest.raises(OffloadError, match=r"'model.layers.1.self_attn.q_proj.weight' is offloaded by bigload "
                                           r"\(on disk in .*offload\)") as error:
        peft.PeftModel.from_pretrained(base, files["lora"], max_memory={"cpu": 400_000},
                                       offload_folder=str(tmp_path / "peft"))
    assert "device_map={'': DEVICE}" in str(error.value) and "adapter=PATH" in str(error.value)
    # The same call with the fix the error names works on a fresh base: peft's re-dispatch becomes a
    # model.to("cpu"), which leaves bigload's placement alone.
    base = dispatched(files, tmp_path / "again")
    devices = {name: tensor.device for name, tensor in base.named_parameters()}
    fixed = peft.PeftModel.from_pretrained(base, files["lora"], max_memory={"cpu": 400_000}, device_map={"": "cpu"})
    reference = peft.PeftModel.from_pretrained(reference_llama(), files["lora"])
    torch.testing.assert_close(logits(fixed), logits(reference), atol=1e-5, rtol=0)
    assert torch.equal(greedy(fixed), greedy(reference))
    assert {name.removeprefix("base_model.model.").replace(".base_layer", ""): tensor.device
            for name, tensor in fixed.named_parameters() if "lora_" not in name} == devices


def test_moving_a_dispatched_model_leaves_every_block_where_the_plan_put_it(files, tmp_path, caplog):
    model = dispatched(files, tmp_path / "offload")
    expected = logits(reference_llama())
    devices = {name: tensor.device for name, tensor in model.named_parameters()}
    assert {device.type for device in devices.values()} == {"cpu", "meta"}
    with caplog.at_level("WARNING", logger="bigload.runtime"):
        assert model.to("meta") is model  # what a move to another device does, on a machine with one device
    assert {name: tensor.device for name, tensor in model.named_parameters()} == devices
    assert "stayed on their blocks' devices" in caplog.text
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


def _gpu_map(prefix: str, on_gpu: Iterable[str]) -> dict[str, object]:
    """The map peft computes on a GPU machine for a model larger than the GPU: the first modules on the GPU,
    the rest on "cpu". The CPU stands in for the GPU (as a torch.device, which accelerate tells apart from the
    string "cpu")."""
    names = ["model.embed_tokens", "model.rotary_emb", *(f"model.layers.{i}" for i in range(LAYERS)),
             "model.norm", "lm_head"]
    return {prefix + name: torch.device("cpu") if name in on_gpu else "cpu" for name in names}


@pytest.fixture
def gpu_redispatch(monkeypatch):
    """peft's re-dispatch as it runs on a GPU machine, on the CPU: peft's own map spans the "GPU" and the CPU,
    and accelerate's real `dispatch_model` runs with a main device that is not the string "cpu", so it takes
    its multi-device branch (blocks mapped to "cpu" get offloading hooks fed from the state dict)."""
    accelerate = pytest.importorskip("accelerate")
    import peft.peft_model

    calls: list[dict] = []

    def dispatch(model, device_map, **kwargs):
        calls.append(dict(device_map))
        accelerate.dispatch_model(model, device_map=device_map, main_device=torch.device("cpu"), **kwargs)
        assert any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in model.modules())

    on_gpu = {"model.embed_tokens", "model.rotary_emb", "model.layers.0"}
    monkeypatch.setattr(peft.peft_model, "dispatch_model", dispatch)
    monkeypatch.setattr(peft.peft_model, "infer_auto_device_map",
                        lambda model, **kwargs: _gpu_map("base_model.model.", on_gpu))
    return calls


def test_peft_re_dispatch_over_a_gpu_and_the_cpu_gives_placement_back_to_bigload(files, gpu_redispatch, tmp_path,
                                                                                caplog):
    base = dispatched(files, tmp_path / "offload")
    devices = {name: tensor.device for name, tensor in base.named_parameters()}
    runtime = runtime_of(base)
    with caplog.at_level("WARNING", logger="bigload.runtime"):
        ours = peft.PeftModel.from_pretrained(base, files["lora"])  # peft's own call, unchanged
        reference = peft.PeftModel.from_pretrained(reference_llama(), files["lora"])
        assert len(gpu_redispatch) == 1  # accelerate's multi-device branch ran on the model
        torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)
    assert "took accelerate's hooks off" in caplog.text
    assert torch.equal(greedy(ours), greedy(reference))
    # bigload's placement again: no hook that places weights, offloaded sites hold their placeholders,
    # resident tensors where they were, and bigload's prefetcher (not accelerate) brought the disk layers in.
    assert not [name for name, module in base.named_modules()
                if getattr(getattr(module, "_hf_hook", None), "offload", False)
                or getattr(getattr(module, "_hf_hook", None), "execution_device", None) is not None]
    for block in runtime.blocks.values():
        for entry in block.entries:
            assert all(site.get() is entry.placeholder for site in entry.sites), entry.key
    assert {name.removeprefix("base_model.model.").replace(".base_layer", ""): tensor.device
            for name, tensor in ours.named_parameters() if "lora_" not in name} == devices
    assert runtime.stats().bytes_loaded > 0
    # More adapters through peft's own calls keep working.
    ours.load_adapter(files["lora2"], adapter_name="second")
    reference.load_adapter(files["lora2"], adapter_name="second")
    ours.set_adapter("second")
    reference.set_adapter("second")
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)


def test_a_folder_holding_merged_weights_is_not_reused_for_the_base(files, tmp_path):
    offload = tmp_path / "offload"
    peft.PeftModel.from_pretrained(dispatched(files, offload), files["lora"]).merge_and_unload()
    with pytest.raises(OffloadError, match=r"then changed: merged \['default'\] into 4 tensors: "
                                           r"model\.layers\.1\.self_attn\.q_proj\.weight, ") as error:
        dispatched(files, offload)  # the store no longer holds the checkpoint's bytes
    # A summary (the count, the first names), not every merged tensor on one line; bigload.json keeps them all.
    assert str(error.value).count(".weight") == 2 and "(+2 more)" in str(error.value)
    assert json.loads((offload / "bigload.json").read_text())["changed"].count(".weight") == 4


# --------------------------------------------------------------------------------------------------
# DoRA and lora_bias merged into offloaded weights: peft's own arithmetic, on the stored weights

VARIANTS = {"dora": {"use_dora": True}, "lora_bias": {"lora_bias": True}}


def write_variant(folder: Path, kind: str, seed: int) -> Path:
    """A LoRA adapter of `kind` on q_proj/v_proj of the biased reference Llama, saved with save_pretrained:
    random A, B and lora_B's bias, DoRA magnitudes scaled away from the weight norms (at their initial value
    DoRA merges like plain LoRA)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False,
                             **VARIANTS[kind])
    model = peft.get_peft_model(reference_llama(bias=True), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
            elif "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def biased(tmp_path_factory) -> dict[str, Path]:
    """A Llama whose projections have biases (what lora_bias merges into), and one adapter per variant."""
    root = tmp_path_factory.mktemp("biased")
    return {"base": save_sharded(reference_llama(bias=True), root / "base"),
            **{kind: write_variant(root / kind, kind, seed=3) for kind in VARIANTS}}


def variant_pair(biased: dict[str, Path], kind: str, offload: Path):
    """peft's `from_pretrained` of adapter `kind` on the base dispatched with layers on disk, and in memory."""
    base = load_checkpoint_and_dispatch(empty_llama(bias=True), biased["base"], device_map=llama_map(DISK_LAYERS),
                                        offload_folder=offload)
    return (peft.PeftModel.from_pretrained(base, biased[kind]),
            peft.PeftModel.from_pretrained(reference_llama(bias=True), biased[kind]))


def merged_names(kind: str, layers: Iterable[int] = range(LAYERS)) -> list[str]:
    """The base tensors a merge of `kind` changes (lora_bias: the projections' biases too)."""
    attrs = ("weight", "bias") if kind == "lora_bias" else ("weight",)
    return [f"model.layers.{i}.self_attn.{proj}.{attr}" for i in layers for proj in ("q_proj", "v_proj")
            for attr in attrs]


def base_layer_value(model, name: str) -> torch.Tensor:
    """Tensor `name` of the base model under a PeftModel whose layers are wrapped (not yet unloaded)."""
    module, attr = name.rsplit(".", 1)
    return model.get_parameter(f"base_model.model.{module}.base_layer.{attr}")


def folder_hashes(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}


@pytest.mark.parametrize("safe_merge", [False, True], ids=["merge", "safe_merge"])
@pytest.mark.parametrize("kind", VARIANTS)
def test_merge_and_unload_of_dora_and_lora_bias_writes_into_the_offload_store(biased, kind, safe_merge, tmp_path):
    checkpoint = folder_hashes(biased["base"])
    offload = tmp_path / "offload"
    ours, reference = variant_pair(biased, kind, offload)
    assert not torch.allclose(logits(reference), logits(reference_llama(bias=True)), atol=1e-2)
    merged = ours.merge_and_unload(safe_merge=safe_merge)
    expected = reference.merge_and_unload(safe_merge=safe_merge)

    store = DiskStore.open(offload)
    for name in merged_names(kind):
        on_disk = int(name.split(".")[2]) in DISK_LAYERS
        value = store.get(name) if on_disk else merged.get_parameter(name)
        torch.testing.assert_close(value, expected.get_parameter(name), atol=1e-5, rtol=0, msg=name)
        assert not torch.allclose(value, reference_llama(bias=True).get_parameter(name), atol=1e-3), name
        if on_disk:
            assert (offload / f"{name}.dat").is_file(), name
            assert merged.get_parameter(name).device.type == "meta", name  # between forwards: not in RAM
    torch.testing.assert_close(logits(merged), logits(expected), atol=1e-5, rtol=0)
    assert torch.equal(greedy(merged), greedy(expected))
    changed = json.loads((offload / "bigload.json").read_text())["changed"]
    for name in merged_names(kind, DISK_LAYERS):
        assert f"merged ['default'] into {name}" in changed, name
    assert folder_hashes(biased["base"]) == checkpoint


@pytest.mark.parametrize("kind", VARIANTS)
def test_merge_adapter_then_unmerge_adapter_of_dora_and_lora_bias_restore_the_stored_weights(biased, kind, tmp_path):
    offload = tmp_path / "offload"
    ours, reference = variant_pair(biased, kind, offload)
    on_disk = merged_names(kind, DISK_LAYERS)
    originals = {name: DiskStore.open(offload).get(name).clone() for name in on_disk}
    adapted, base = logits(reference), logits(reference_llama(bias=True))

    ours.merge_adapter()
    reference.merge_adapter()
    for name in on_disk:
        stored = DiskStore.open(offload).get(name)
        torch.testing.assert_close(stored, base_layer_value(reference, name), atol=1e-5, rtol=0, msg=name)
        assert not torch.allclose(stored, originals[name], atol=1e-3), name
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)

    ours.unmerge_adapter()
    reference.unmerge_adapter()
    for name in on_disk:
        stored = DiskStore.open(offload).get(name)
        torch.testing.assert_close(stored, originals[name], atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(stored, base_layer_value(reference, name), atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(logits(ours), adapted, atol=1e-5, rtol=0)
    assert "unmerged ['default'] from model.layers.1.self_attn.q_proj.weight" in json.loads(
        (offload / "bigload.json").read_text())["changed"]

    # Adapters disabled on a merged model: peft unmerges in each layer's forward, with the block installed.
    ours.merge_adapter()
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours), base, atol=1e-5, rtol=0)
    for name in on_disk:
        torch.testing.assert_close(DiskStore.open(offload).get(name), originals[name], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(logits(ours), adapted, atol=1e-5, rtol=0)


def test_a_safe_merge_finding_nans_leaves_the_offload_store_as_it_was(biased, tmp_path):
    offload = tmp_path / "offload"
    ours, _ = variant_pair(biased, "dora", offload)
    name = "model.layers.1.self_attn.q_proj.weight"
    record, original = (offload / "bigload.json").read_text(), DiskStore.open(offload).get(name).clone()
    with torch.no_grad():
        ours.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.merge_and_unload(safe_merge=True)
    assert (offload / "bigload.json").read_text() == record
    assert torch.equal(DiskStore.open(offload).get(name), original)


def test_a_merge_that_bypasses_the_runtime_is_refused(files, tmp_path):
    ours = peft.PeftModel.from_pretrained(dispatched(files, tmp_path / "offload"), files["lora"])
    layer = ours.base_model.model.model.layers[1].self_attn.q_proj
    type(layer).merge(layer)  # peft's method called on the class: the add lands on the meta placeholder
    with pytest.raises(OffloadError, match=r"adapters \['default'\] merged into the offloaded weight "
                                           r"'model\.layers\.1\.self_attn\.q_proj\.weight'.*merge_adapter\(\)"):
        logits(ours)


def full_disk_after(monkeypatch: pytest.MonkeyPatch, folder: Path, data_files: int) -> None:
    """Writes into `folder` fail with ENOSPC, as on a full disk, from the `data_files + 1`-th `.dat` file on."""
    real_write, started, full = os.write, [], []

    def write(fd: int, data: object) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.dirname(path) == str(folder):
            if ".dat" in os.path.basename(path) and path not in started:
                (full if len(started) >= data_files else started).append(path)
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("kind, written", [("lora", 0), ("lora_bias", 1)], ids=["first-tensor", "second-tensor"])
def test_a_disk_filling_during_merge_and_unload_leaves_the_layer_unmerged_and_the_folder_as_it_was(
        files, biased, kind, written, tmp_path, monkeypatch):
    """The disk fills while the first disk layer's merged tensors are written (lora_bias: after its weight, while
    its bias is written). peft's layer stays unmerged, the folder keeps its bytes and its record, the base loads
    into it again, and once there is room the same call completes the merge."""
    offload = tmp_path / "offload"
    if kind == "lora":
        ours = peft.PeftModel.from_pretrained(dispatched(files, offload), files["lora"])
        reference = peft.PeftModel.from_pretrained(reference_llama(), files["lora"])
        base, plain = (lambda: dispatched(files, offload)), reference_llama
    else:
        ours, reference = variant_pair(biased, kind, offload)
        base = lambda: load_checkpoint_and_dispatch(empty_llama(bias=True), biased["base"],  # noqa: E731
                                                    device_map=llama_map(DISK_LAYERS), offload_folder=offload)
        plain = lambda: reference_llama(bias=True)  # noqa: E731
    before, adapted = folder_hashes(offload), logits(reference)
    full_disk_after(monkeypatch, offload, written)
    with pytest.raises(OffloadError, match=r"(?i)no space left"):
        ours.merge_and_unload()
    monkeypatch.undo()
    assert folder_hashes(offload) == before  # nothing replaced, no temporary file left
    layer = ours.base_model.model.model.layers[DISK_LAYERS[0]].self_attn.q_proj
    assert layer.merged_adapters == []
    torch.testing.assert_close(logits(ours), adapted, atol=1e-4, rtol=0)  # peft's unmerged model
    torch.testing.assert_close(logits(base()), logits(plain()), atol=1e-5, rtol=0)  # the folder still holds the base
    assert folder_hashes(offload) == before
    merged, expected = ours.merge_and_unload(), reference.merge_and_unload()  # room again: the retry completes
    torch.testing.assert_close(logits(merged), logits(expected), atol=1e-4, rtol=0)
    store = DiskStore.open(offload)
    for name in merged_names(kind, DISK_LAYERS):
        torch.testing.assert_close(store.get(name), expected.get_parameter(name), atol=1e-5, rtol=0, msg=name)


# --------------------------------------------------------------------------------------------------
# bigload's own way: from_pretrained(adapter=...), plan and generate --adapter

MEMORY = {"cpu": "700KB", "disk": "1GiB"}  # embeddings and two layers in RAM, the rest on disk


def test_from_pretrained_with_adapters_equals_peft_in_memory(files, tmp_path):
    import bigload

    ours = bigload.from_pretrained(files["base"], adapter=[files["lora"], files["lora2"]], max_memory=MEMORY,
                                   offload_folder=tmp_path / "offload", progress=False)
    reference = peft.PeftModel.from_pretrained(reference_llama(), files["lora"])
    reference.load_adapter(files["lora2"], adapter_name="lora2")
    assert "disk" in ours.get_base_model().hf_device_map.values()
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)
    assert torch.equal(greedy(ours), greedy(reference))
    ours.set_adapter("lora2")
    reference.set_adapter("lora2")
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)
    # Adapter tensors of disk blocks were streamed into the store with their block.
    store = DiskStore.open(tmp_path / "offload")
    disk_layer = next(k for k, v in ours.get_base_model().hf_device_map.items() if v == "disk" and "layers" in k)
    lora_b = f"{disk_layer}.self_attn.v_proj.lora_B.lora2.weight"
    assert torch.equal(store.get(lora_b), dict(reference.named_parameters())[f"base_model.model.{lora_b}"])
    merged, expected = ours.merge_and_unload(), reference.merge_and_unload()
    torch.testing.assert_close(logits(merged), logits(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", VARIANTS)
def test_from_pretrained_with_a_dora_or_lora_bias_adapter_merges_into_the_store(biased, kind, tmp_path):
    import bigload

    offload = tmp_path / "offload"
    ours = bigload.from_pretrained(biased["base"], adapter=biased[kind], max_memory=MEMORY, offload_folder=offload,
                                   progress=False)  # the adapter's tensors (DoRA magnitudes too) go to the store
    reference = peft.PeftModel.from_pretrained(reference_llama(bias=True), biased[kind])
    disk_layers = [int(key.split(".")[2]) for key, value in ours.get_base_model().hf_device_map.items()
                   if value == "disk" and ".layers." in key]
    assert disk_layers
    merged, expected = ours.merge_and_unload(), reference.merge_and_unload()
    store = DiskStore.open(offload)
    for name in merged_names(kind, disk_layers):
        module, attr = name.rsplit(".", 1)  # stored under the name it had in the wrapped model
        torch.testing.assert_close(store.get(f"{module}.base_layer.{attr}"), expected.get_parameter(name), atol=1e-5,
                                   rtol=0, msg=name)
    torch.testing.assert_close(logits(merged), logits(expected), atol=1e-5, rtol=0)
    assert torch.equal(greedy(merged), greedy(expected))


def test_the_plan_counts_adapter_bytes_on_the_block_that_owns_them(files):
    from bigload.integrations.hf import plan_model

    budget = MEMORY  # layers are blocks of their own
    plain = {p.name: p.weights for p in plan_model(files["base"], max_memory=budget).placements}
    adapted = {p.name: p.weights for p in
               plan_model(files["base"], max_memory=budget, adapter=[files["lora"], files["lora2"]]).placements}
    # q_proj: A (4 x 64) + B (64 x 4); v_proj: A (4 x 64) + B (32 x 4); two adapters; float32.
    per_layer = 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4)) * 4
    assert adapted.keys() == plain.keys() and sum(".layers." in block for block in plain) == 4
    for block, size in plain.items():
        assert adapted[block] - size == (per_layer if ".layers." in block else 0), block


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """The CLI's demo model (bfloat16, with a tokenizer) and a LoRA adapter for it."""
    from transformers import AutoModelForCausalLM

    from bigload.cli.demo import write_demo_model

    root = tmp_path_factory.mktemp("demo")
    folder = write_demo_model(root / "small", "small")
    lora = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=8, init_lora_weights=False)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    return {"model": folder, "lora": save_adapter(base, lora, root / "lora", seed=3, widen="lora_B", std=0.3)}


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    from bigload.cli.commands import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_plan_shows_adapter_bytes_per_block(demo, capsys):
    code, out, err = run_main(capsys, "plan", str(demo["model"]), "--adapter", str(demo["lora"]),
                              "--max-memory", "cpu=8MiB,disk=1GiB")
    assert code == 0, err
    assert f"adapter 'default' (LORA, {demo['lora']}): 208.00 KiB in 8 block(s)" in out
    assert "model.layers.7  disk   26.00 KiB" in out


def test_cli_generate_with_an_adapter_matches_peft_in_memory(demo, capsys, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err = run_main(capsys, "generate", str(demo["model"]), "--adapter", str(demo["lora"]), "--prompt",
                              "Hello world", "--max-new-tokens", "4", "--max-memory", "cpu=8MiB,disk=1GiB",
                              "--offload-folder", str(tmp_path / "off"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["device_bytes"].get("disk", 0) > 0
    tokenizer = AutoTokenizer.from_pretrained(demo["model"])
    base = AutoModelForCausalLM.from_pretrained(demo["model"], dtype=torch.bfloat16)
    reference = peft.PeftModel.from_pretrained(base, demo["lora"])
    ids = tokenizer("Hello world", return_tensors="pt")["input_ids"]
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, min_new_tokens=4,
                  pad_token_id=tokenizer.eos_token_id)
    expected = reference.generate(input_ids=ids, **kwargs)[0, ids.shape[1]:]
    assert report["token_ids"] == expected.tolist()
    with torch.no_grad(), reference.disable_adapter():
        plain = reference(input_ids=ids).logits[0, -1].argmax().item()
    assert report["token_ids"][0] != plain  # the adapter changes the text


# --------------------------------------------------------------------------------------------------
# Prompt tuning and prefix tuning


def write_prompt_learning(folder: Path, config: object) -> Path:
    """A prompt-learning adapter whose virtual tokens are drawn wide enough to change the outputs."""
    return save_adapter(reference_llama(), config, folder, seed=5, widen="prompt_encoder", std=3.0)


@pytest.fixture(scope="module")
def prompt_tuning(files) -> Path:
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return write_prompt_learning(files["base"].parent / "prompt", config)


def test_prompt_tuning_on_an_offloaded_base_equals_peft_in_memory(files, prompt_tuning, tmp_path):
    import bigload

    reference = peft.PeftModel.from_pretrained(reference_llama(), prompt_tuning)
    expected = greedy(reference, tokens=4)
    assert not torch.equal(expected, greedy(reference_llama(), tokens=4))
    with_peft = peft.PeftModel.from_pretrained(dispatched(files, tmp_path / "a"), prompt_tuning)
    ours = bigload.from_pretrained(files["base"], adapter=prompt_tuning, max_memory=MEMORY,
                                   offload_folder=tmp_path / "b", progress=False)
    assert "disk" in ours.get_base_model().hf_device_map.values()
    for model in (with_peft, ours):
        assert torch.equal(greedy(model, tokens=4), expected)
        torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def prefix_tuning(files) -> Path:
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return write_prompt_learning(files["base"].parent / "prefix", config)


def prefix_reference(prefix: Path):
    """peft's prefix tuning on the base fully in memory, checked to change the base's logits."""
    reference = peft.PeftModel.from_pretrained(reference_llama(), prefix)
    assert not torch.allclose(logits(reference), logits(reference_llama()), atol=1e-2)
    return reference


def test_prefix_tuning_on_a_cpu_executed_offloaded_base_equals_peft_in_memory(files, prefix_tuning, tmp_path):
    import bigload

    reference = prefix_reference(prefix_tuning)
    ours = bigload.from_pretrained(files["base"], adapter=prefix_tuning, max_memory=MEMORY,
                                   offload_folder=tmp_path / "off", progress=False)
    device_map = ours.get_base_model().hf_device_map
    # Blocks kept in RAM run where they live: named by torch.device, which peft reads as their execution device.
    assert {str(value) for value in device_map.values()} == {"cpu", "disk"}
    assert all(value == "disk" or value == torch.device("cpu") for value in device_map.values())
    assert ours.prompt_encoder["default"].embedding.weight.device == torch.device("cpu")
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)
    assert torch.equal(greedy(ours), greedy(reference))


def test_peft_prefix_tuning_on_a_dispatched_base_with_cpu_named_as_a_device(files, prefix_tuning, tmp_path):
    reference = prefix_reference(prefix_tuning)
    device_map = {key: "disk" if value == "disk" else torch.device("cpu")
                  for key, value in llama_map(DISK_LAYERS).items()}
    base = load_checkpoint_and_dispatch(empty_llama(), files["base"], device_map=device_map,
                                        offload_folder=tmp_path / "off")
    assert base.hf_device_map == device_map
    ours = peft.PeftModel.from_pretrained(base, prefix_tuning)  # peft's own call
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)
    assert torch.equal(greedy(ours), greedy(reference))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefix_tuning_with_disk_offload_to_a_gpu_equals_peft_in_memory(files, tmp_path):
    import bigload

    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    prefix = write_prompt_learning(tmp_path / "prefix", config)
    reference = peft.PeftModel.from_pretrained(reference_llama(), prefix).to("cuda")
    ours = bigload.from_pretrained(files["base"], adapter=prefix, max_memory={0: "700KB", "disk": "1GiB"},
                                   offload_folder=tmp_path / "off", progress=False)  # disk layers run on the GPU
    ids = IDS.to("cuda")
    expected = reference.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(with_timeout(lambda: ours.generate(input_ids=ids, max_new_tokens=8, do_sample=False)),
                       expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lora_on_a_gpu_with_disk_offload_equals_peft_in_memory(files, tmp_path):
    import bigload

    reference = peft.PeftModel.from_pretrained(reference_llama(), files["lora"]).to("cuda")
    ours = bigload.from_pretrained(files["base"], adapter=files["lora"],
                                   max_memory={0: "500KB", "cpu": "200KB", "disk": "1GiB"},
                                   offload_folder=tmp_path / "off", progress=False)
    ids = IDS.to("cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0)
    merged, expected = ours.merge_and_unload(), reference.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("peft_kwargs", [{}, {"max_memory": {0: 420_000, "cpu": "8GiB"}}, {"device_map": {"": 0}}],
                         ids=["unchanged", "tight", "main-device"])
def test_peft_own_call_on_a_gpu_map_with_cpu_and_disk_blocks_equals_peft_in_memory(files, peft_kwargs, tmp_path,
                                                                                    caplog):
    # Unchanged: this GPU holds the whole model, so peft's own map is the GPU alone and its re-dispatch a
    # model.to(0), which must leave bigload's cpu and disk blocks where they are. Tight: 420 kB of GPU for
    # peft (the embedding, layer 0 and a layer's room) as on a GPU smaller than the model: peft's map spans
    # the GPU and the CPU, accelerate hooks the model and bigload takes the hooks back off.
    reference = peft.PeftModel.from_pretrained(reference_llama(), files["lora"]).to("cuda")
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.layers.3": 0, "model.norm": 0, "lm_head": 0}
    base = load_checkpoint_and_dispatch(empty_llama(), files["base"], device_map=device_map,
                                        offload_folder=tmp_path / "off")
    devices = {name: tensor.device for name, tensor in base.named_parameters()}
    ours = peft.PeftModel.from_pretrained(base, files["lora"], **peft_kwargs)
    ids = IDS.to("cuda")
    with torch.no_grad(), caplog.at_level("WARNING", logger="bigload.runtime"):
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert ("took accelerate's hooks off" in caplog.text) == ("max_memory" in peft_kwargs)
    assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=8, do_sample=False),
                       reference.generate(input_ids=ids, max_new_tokens=8, do_sample=False))
    assert {name.removeprefix("base_model.model.").replace(".base_layer", ""): tensor.device
            for name, tensor in ours.named_parameters() if "lora_" not in name} == devices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", VARIANTS)
def test_dora_and_lora_bias_merge_on_a_gpu_with_cpu_and_disk_offload_equals_peft_in_memory(biased, kind, tmp_path):
    import bigload

    reference = peft.PeftModel.from_pretrained(reference_llama(bias=True), biased[kind]).to("cuda")
    ours = bigload.from_pretrained(biased["base"], adapter=biased[kind],
                                   max_memory={0: "500KB", "cpu": "200KB", "disk": "1GiB"},
                                   offload_folder=tmp_path / "off", progress=False)  # host weights and disk
    ids = IDS.to("cuda")
    merged, expected = ours.merge_and_unload(), reference.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# Bad input: a bigload error naming the file and the fix, nothing loaded or written


def load_with(files: dict[str, Path], adapter: Path, offload: Path):
    import bigload

    return bigload.from_pretrained(files["base"], adapter=adapter, max_memory=MEMORY, offload_folder=offload,
                                   progress=False)


def test_an_adapter_for_another_base_is_refused(files, tmp_path):
    from fixtures_hf import ARCHS, build_model  # a Llama of another width (hidden 32)

    torch.manual_seed(0)
    lora = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
    peft.get_peft_model(build_model(ARCHS["llama"]), lora).save_pretrained(tmp_path / "narrow")
    with pytest.raises(AdapterError, match=r"narrow/adapter_model\.safetensors holds other shapes: .*q_proj"
                                           r".*pass the base it was made for"):
        load_with(files, tmp_path / "narrow", tmp_path / "off")
    assert not (tmp_path / "off").exists()


def test_an_adapter_whose_target_modules_are_missing_is_refused(files, tmp_path):
    from fixtures_hf import ARCHS, build_model

    lora = peft.LoraConfig(target_modules=["c_attn"], r=4)  # GPT-2's attention, not in a Llama
    peft.get_peft_model(build_model(ARCHS["gpt2"]), lora).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(AdapterError, match=r"gpt2/adapter_config\.json does not fit LlamaForCausalLM: .*c_attn"):
        load_with(files, tmp_path / "gpt2", tmp_path / "off")
    assert not (tmp_path / "off").exists()


def test_a_corrupt_adapter_file_is_refused(files, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((files["lora"] / "adapter_config.json").read_bytes())
    data = (files["lora"] / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(AdapterError, match=r"broken/adapter_model\.safetensors: .*truncated.*This adapter's "
                                           r"weights are unreadable: save the adapter again"):
        load_with(files, broken, tmp_path / "off")
    assert not (tmp_path / "off").exists()


def test_an_adapter_config_naming_an_unknown_method_is_refused(files, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    config = json.loads((files["lora"] / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "SUPERLORA"}))
    (odd / "adapter_model.safetensors").write_bytes((files["lora"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match=r"odd/adapter_config\.json: peft cannot read this config .*'SUPERLORA'"
                                           r".* knows .*LORA.*upgrade peft"):
        load_with(files, odd, tmp_path / "off")


def test_a_failed_wrap_leaves_the_model_as_it_was(files, tmp_path):
    from bigload.integrations.adapters import read_adapters, wrap
    from bigload.integrations.hf import load_config, meta_model_from_config

    from fixtures_hf import ARCHS, build_model

    peft.get_peft_model(build_model(ARCHS["gpt2"]), peft.LoraConfig(target_modules=["c_attn"], r=4)
                        ).save_pretrained(tmp_path / "gpt2")
    model = meta_model_from_config(load_config(files["base"] / "config.json"))
    before = [name for name, _ in model.named_parameters()]
    with pytest.raises(AdapterError, match=r"gpt2/adapter_config\.json does not fit LlamaForCausalLM: Target modules \{'c_attn'\}"):
        wrap(model, read_adapters([files["lora"], tmp_path / "gpt2"]))  # the first fits, the second does not
    assert [name for name, _ in model.named_parameters()] == before
