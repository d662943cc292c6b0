"""An offload folder that is, is inside, or holds the model's folder is refused before anything is written,
by every way in: from_pretrained, load_checkpoint_and_dispatch, dispatch_model and disk_offload
(offload_dir), and the CLI (--offload-folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bigload
from bigload.cli.commands import main
from bigload.errors import OffloadError
from bigload.load.folder import check_offload_folder, model_folder
from tests.fixtures_hf import ARCHS, write_model

_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(ARCHS["llama"], tmp_path_factory.mktemp("folder") / "llama")


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(path.relative_to(folder)), path.stat().st_size) for path in folder.rglob("*"))


def test_the_check_compares_resolved_folders(tmp_path: Path) -> None:
    model = tmp_path / "models" / "llama"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (tmp_path / "link").symlink_to(model)
    for offload, relation in [(model, "is"), (model / "offload", "is inside"), (model / "a" / "b", "is inside"),
                              (tmp_path / "models", "holds"), (tmp_path / "link", "is"),
                              (model / ".." / "llama", "is")]:
        with pytest.raises(OffloadError, match=rf"the offload folder {offload.resolve()} {relation} the "
                                               rf"checkpoint's folder {model}: .* Pass a folder apart from it, e.g. "
                                               rf"offload_folder='{model}-offload'\."):
            check_offload_folder(offload, model)
    for apart in (tmp_path / "models" / "llama-offload", tmp_path / "offload", tmp_path / "models" / "llama2"):
        check_offload_folder(apart, model)
    assert not (model / "offload").exists() and not (model / "a").exists()


def test_beside_a_single_checkpoint_file_a_subfolder_is_allowed(tmp_path: Path) -> None:
    work = tmp_path / "work"  # a working folder holding one checkpoint file, not a saved model
    work.mkdir()
    (work / "model.safetensors").write_bytes(b"")
    check_offload_folder(work / "offload", work)
    for offload, relation in [(work, "is"), (tmp_path, "holds")]:
        with pytest.raises(OffloadError, match=rf"the offload folder {offload} {relation} the checkpoint's folder"):
            check_offload_folder(offload, work)
    (work / "model.safetensors.index.json").write_text("{}")  # a sharded checkpoint: a model folder
    with pytest.raises(OffloadError, match=r"is inside the checkpoint's folder"):
        check_offload_folder(work / "offload", work)


@pytest.mark.parametrize("inside", [False, True], ids=["the-model-folder", "inside-it"])
def test_from_pretrained_refuses_before_writing(llama: Path, inside: bool) -> None:
    before = _listing(llama)
    offload = llama / "offload" if inside else llama
    with pytest.raises(OffloadError, match=rf"the offload folder {offload} {'is inside' if inside else 'is'} the "
                                           rf"checkpoint's folder {llama}: .*offload_folder='{llama}-offload'"):
        bigload.from_pretrained(llama, max_memory={"cpu": 110_000, "disk": "1GiB"},  # 4 blocks on disk
                                offload_folder=offload, progress=False)
    assert _listing(llama) == before


def test_load_checkpoint_and_dispatch_refuses_before_writing(llama: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    before = _listing(llama)
    with bigload.init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llama))
    with pytest.raises(OffloadError, match=rf"the offload folder {llama} is the checkpoint's folder"):
        bigload.load_checkpoint_and_dispatch(model, llama, device_map=_MAP, offload_folder=llama)
    with pytest.raises(OffloadError, match=rf"the offload folder {llama / 'off'} is inside the checkpoint's folder"):
        bigload.load_checkpoint_and_dispatch(model, llama / "model.safetensors.index.json", device_map=_MAP,
                                             offload_folder=llama / "off")
    assert _listing(llama) == before


def test_dispatch_model_and_disk_offload_refuse_the_folder_the_model_came_from(llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    before = _listing(llama)
    model = AutoModelForCausalLM.from_pretrained(llama)
    assert model_folder(model) == llama
    with pytest.raises(OffloadError, match=rf"the offload folder {llama} is the checkpoint's folder {llama}: .* "
                                           rf"e.g. offload_dir='{llama}-offload'"):
        bigload.dispatch_model(model, _MAP, offload_dir=llama)
    with pytest.raises(OffloadError, match=r"is inside the checkpoint's folder"):
        bigload.disk_offload(model, offload_dir=llama / "offload", execution_device="cpu")
    assert _listing(llama) == before
    assert all(p.device.type == "cpu" for p in model.parameters())  # nothing was moved or dropped either


def test_cli_refuses_with_the_flag_and_exit_2(llama: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from bigload.cli.demo import write_demo_model

    folder = write_demo_model(tmp_path / "small", "small")  # the CLI needs a tokenizer
    before = _listing(folder)
    code = main(["generate", str(folder), "--prompt", "Hi", "--max-new-tokens", "2",
                 "--max-memory", "cpu=8MiB,disk=1GiB", "--offload-folder", str(folder / "offload")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"the offload folder {folder / 'offload'} is inside the checkpoint's folder {folder}" in err
    assert f"e.g. --offload-folder {folder}-offload." in err and "offload_folder" not in err
    assert _listing(folder) == before


def test_a_folder_apart_from_the_model_still_loads(llama: Path, tmp_path: Path) -> None:
    from tests.fixtures_hf import PROMPT, build_model

    model = bigload.from_pretrained(llama, device_map=_MAP, offload_folder=tmp_path / "llama-offload",
                                    progress=False)
    assert (tmp_path / "llama-offload" / "index.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor(PROMPT)).logits,
                                   build_model(ARCHS["llama"])(torch.tensor(PROMPT)).logits)
