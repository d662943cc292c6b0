"""Adapter folders as peft writes them, and as a careless hand leaves them.

Every folder peft's own `PeftModel.from_pretrained` loads (a LoRA that also saves `lm_head`, a LoRA on the
embedding, weights in peft's older `adapter_model.bin`) loads with `bigload.from_pretrained(adapter=...)` on
a base offloaded to cpu and disk, with the outputs of peft's call on the base fully in memory (the reference).
Every folder peft cannot read is an `AdapterError` naming the file, before anything is loaded or written; the
CLI shows it as one line and exits 2.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from bigload.errors import AdapterError
from bigload.load.store import DiskStore
from fixtures_models import llama_map, reference_llama, save_sharded
from test_adapters import DISK_LAYERS, MEMORY, greedy, logits, run_main, save_adapter, write_lora

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_sharded(reference_llama(), tmp_path_factory.mktemp("adapter_files") / "base")


@pytest.fixture(scope="module")
def lora(base) -> Path:
    return write_lora(base.parent / "lora", seed=1)


def load(base: Path, adapter: Path, offload: Path, **placement):
    import bigload

    return bigload.from_pretrained(base, adapter=adapter, offload_folder=offload, progress=False,
                                   **(placement or {"max_memory": MEMORY}))


def peft_in_memory(adapter: Path):
    """peft's own load of `adapter` on the base fully in memory, checked to change the base's outputs."""
    reference = peft.PeftModel.from_pretrained(reference_llama(), adapter)
    assert not torch.allclose(logits(reference), logits(reference_llama()), atol=1e-2)
    return reference


def assert_same_outputs(ours, reference) -> None:
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)
    assert torch.equal(greedy(ours), greedy(reference))


# --------------------------------------------------------------------------------------------------
# Valid adapters peft loads


def test_a_lora_that_saves_lm_head_on_an_offloaded_base_equals_peft_in_memory(base, tmp_path):
    # peft saves the trained head as `base_model.model.lm_head.weight` and loads it into
    # `lm_head.modules_to_save.default`; drawn anew here, so the base's head in its place would show.
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], r=4,
                             init_lora_weights=False)
    adapter = save_adapter(reference_llama(), config, tmp_path / "head", seed=7, widen="modules_to_save", std=0.2)
    reference = peft_in_memory(adapter)
    ours = load(base, adapter, tmp_path / "off")
    device_map = ours.get_base_model().hf_device_map
    assert {str(value) for value in device_map.values()} == {"cpu", "disk"}
    assert {key: value for key, value in device_map.items() if key.startswith("lm_head")} == {
        "lm_head.original_module": "disk", "lm_head.modules_to_save.default": "disk"}
    assert_same_outputs(ours, reference)
    store = DiskStore.open(tmp_path / "off")
    expected = dict(reference.named_parameters())
    for name in ("lm_head.modules_to_save.default.weight", "lm_head.original_module.weight"):
        assert torch.equal(store.get(name), expected[f"base_model.model.{name}"]), name


def test_a_lora_on_the_embedding_with_the_embedding_on_disk_equals_peft_in_memory(base, tmp_path):
    # peft saves the embedding with an adapter that targets it, and its load puts that copy in place of the
    # base's: drawn anew here, so loading the base checkpoint's embedding instead would show.
    config = peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], r=4, init_lora_weights=False)
    adapter = save_adapter(reference_llama(), config, tmp_path / "embed", seed=8, widen="embed_tokens", std=0.2)
    reference = peft_in_memory(adapter)
    device_map = {**llama_map(DISK_LAYERS), "model.embed_tokens": "disk"}
    ours = load(base, adapter, tmp_path / "off", device_map=device_map)
    assert ours.get_base_model().hf_device_map == device_map
    assert_same_outputs(ours, reference)
    store = DiskStore.open(tmp_path / "off")
    name = "model.embed_tokens.base_layer.weight"
    assert torch.equal(store.get(name), dict(reference.named_parameters())[f"base_model.model.{name}"])


def test_an_adapter_saved_as_bin_equals_peft_in_memory(base, tmp_path):
    torch.manual_seed(9)
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
    peft.get_peft_model(reference_llama(), config).save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert {path.suffix for path in (tmp_path / "bin").iterdir()} >= {".bin", ".json"}
    assert not list((tmp_path / "bin").glob("*.safetensors"))
    ours = load(base, tmp_path / "bin", tmp_path / "off")
    assert "disk" in ours.get_base_model().hf_device_map.values()
    assert_same_outputs(ours, peft_in_memory(tmp_path / "bin"))


def test_an_adapter_bin_that_would_run_code_is_refused_and_never_runs(base, lora, tmp_path):
    from bad_inputs.corpus import malicious_zip

    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(lora / "adapter_config.json", folder)
    marker = tmp_path / "payload-ran"
    malicious_zip(folder, marker, name="adapter_model.bin")
    with pytest.raises(AdapterError, match=r"evil/adapter_model\.bin: refused to unpickle.*could run code"):
        load(base, folder, tmp_path / "off")
    assert not marker.exists(), "the pickle's payload ran"
    assert not (tmp_path / "off").exists()


# --------------------------------------------------------------------------------------------------
# Config files peft cannot read


def _copy_with_config(lora: Path, folder: Path, config: bytes) -> Path:
    folder.mkdir()
    shutil.copy(lora / "adapter_model.safetensors", folder)
    (folder / "adapter_config.json").write_bytes(config)
    return folder


BAD_CONFIGS = {
    "truncated": (lambda text: text[: len(text) // 2].encode(), r" is not valid JSON \(JSONDecodeError: .*truncated"),
    "empty": (lambda text: b"", r" is not valid JSON"),
    "not-utf8": (lambda text: b"\xff\xfe" + text.encode(), r" is not valid JSON \(UnicodeDecodeError"),
    "json-list": (lambda text: b"[]", r" holds a JSON list, not an object of peft settings"),
    "deeply-nested": (lambda text: b"[" * 100_000 + b"]" * 100_000, r" is not valid JSON \(RecursionError"),
    "r-eight": (lambda text: json.dumps({**json.loads(text), "r": "eight"}).encode(), r": r is 'eight', not an int"),
    "alpha-string": (lambda text: json.dumps({**json.loads(text), "lora_alpha": "16"}).encode(),
                     r": lora_alpha is '16', not an int"),
    "targets-a-number": (lambda text: json.dumps({**json.loads(text), "target_modules": 5}).encode(),
                         r": peft cannot apply this config \('int' object is not iterable\)"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_an_unreadable_adapter_config_is_an_adapter_error_naming_the_file(base, lora, tmp_path, case):
    make, match = BAD_CONFIGS[case]
    folder = _copy_with_config(lora, tmp_path / "bad", make((lora / "adapter_config.json").read_text()))
    with pytest.raises(AdapterError, match=r"bad/adapter_config\.json" + match) as error:
        load(base, folder, tmp_path / "off")
    assert "save_pretrained" in str(error.value)
    assert not (tmp_path / "off").exists()


@pytest.mark.parametrize("case", ["truncated", "r-eight"])
def test_the_cli_shows_an_unreadable_adapter_config_as_one_line_and_exits_2(base, lora, tmp_path, capsys, case):
    make, match = BAD_CONFIGS[case]
    folder = _copy_with_config(lora, tmp_path / "bad", make((lora / "adapter_config.json").read_text()))
    code, out, err = run_main(capsys, "plan", str(base), "--adapter", str(folder), "--max-memory",
                              "cpu=700KB,disk=1GiB")
    assert code == 2
    assert err.startswith(f"bigload: error: {folder / 'adapter_config.json'}") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_an_adapter_file_instead_of_its_folder_names_the_folder(base, lora, tmp_path, capsys):
    given = lora / "adapter_config.json"
    with pytest.raises(AdapterError, match=re.escape(f"{given} is a file, not an adapter folder; ") + r".*"
                                           + re.escape(f"(here: adapter='{lora}')")):
        load(base, given, tmp_path / "off")
    code, out, err = run_main(capsys, "plan", str(base), "--adapter", str(given), "--max-memory", "cpu=700KB,disk=1GiB")
    assert code == 2
    assert f"{given} is a file, not an adapter folder" in err and f"(here: --adapter {lora})" in err
    assert "adapter_config.json/adapter_config.json" not in err


def test_a_folder_without_adapter_weights_names_both_file_names(base, lora, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(lora / "adapter_config.json", folder)
    with pytest.raises(AdapterError, match=r"config-only has no adapter_model\.safetensors \(or adapter_model\.bin\)"):
        load(base, folder, tmp_path / "off")
