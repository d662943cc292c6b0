"""The `bigload` command line, run as a person runs it: a subprocess, its exit code, its output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigload.demo import write_demo_model


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "bigload.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo") / "small", "small")


def test_help_lists_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("plan", "inspect", "generate", "demo"):
        assert command in out.stdout
    for command in ("plan", "inspect", "generate", "demo"):
        sub = run_cli(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "usage: bigload " + command in sub.stdout


def test_plan_catalog_model_for_another_machine(tmp_path: Path):
    out_json = tmp_path / "plan.json"
    out = run_cli("plan", "llama-3.1-405b", "--max-memory", "0=80GiB,1=80GiB,2=80GiB,3=80GiB,4=80GiB,5=80GiB,"
                  "6=80GiB,7=80GiB,cpu=512GiB", "--strategy", "balanced", "--json", str(out_json))
    assert out.returncode == 0, out.stderr
    assert "cuda:7" in out.stdout
    assert "model.layers." in out.stdout
    plan = json.loads(out_json.read_text())
    device_map = plan["device_map"]
    # 405B parameters in bf16 are 811 GB: more than 8 x 80 GiB, so part must go to the CPU.
    assert set(device_map.values()) == {0, 1, 2, 3, 4, 5, 6, 7, "cpu"}


def test_plan_that_does_not_fit_exits_2_with_the_shortfall():
    out = run_cli("plan", "llama-3-70b", "--max-memory", "0=24GiB,cpu=16GiB")
    assert out.returncode == 2
    assert out.stderr.startswith("bigload: error:")
    assert "disk" in out.stderr  # the fix: add a disk budget and an offload folder
    assert "Traceback" not in out.stderr


def test_plan_from_folder_and_from_headers_alone_agree(model_folder: Path, tmp_path: Path):
    budget = "cpu=8MiB,disk=1GiB"
    from_folder = run_cli("plan", str(model_folder), "--max-memory", budget, "--json", "-")
    assert from_folder.returncode == 0, from_folder.stderr
    # A checkpoint with no config.json: the plan comes from safetensors headers only.
    headers_only = tmp_path / "weights"
    headers_only.mkdir()
    for shard in model_folder.glob("*.safetensors*"):
        (headers_only / shard.name).symlink_to(shard)
    from_headers = run_cli("plan", str(headers_only), "--max-memory", budget, "--json", "-")
    assert from_headers.returncode == 0, from_headers.stderr
    assert json.loads(from_folder.stdout)["device_map"] == json.loads(from_headers.stdout)["device_map"]
    assert "disk" in json.loads(from_folder.stdout)["device_map"].values()


def test_bad_max_memory_is_one_line_error():
    out = run_cli("plan", "llama-3-8b", "--max-memory", "cpu=24GiBs")
    assert out.returncode == 2
    assert "24GiBs" in out.stderr and "GiB" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli("plan", "llama-3-8b", "--max-memory", "cpu")
    assert out.returncode == 2
    assert "DEVICE=SIZE" in out.stderr


def test_unknown_model_names_the_catalog():
    out = run_cli("plan", "no-such-model-xyz")
    assert out.returncode == 2
    assert "llama-3.1-405b" in out.stderr


def test_inspect_reports_headers(model_folder: Path):
    out = run_cli("inspect", str(model_folder), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["format"] == "safetensors"
    assert len(report["shards"]) == 3
    assert report["dtypes"][0]["dtype"] == "bfloat16"
    assert report["total_bytes"] == sum(s["bytes"] for s in report["shards"])
    blocks = [b["name"] for b in report["blocks"]]
    assert "model.layers.0" in blocks and "model.layers.7" in blocks and "lm_head" in blocks
    text = run_cli("inspect", str(model_folder))
    assert text.returncode == 0
    assert "largest tensors" in text.stdout and "model.embed_tokens.weight" in text.stdout


def test_inspect_malformed_checkpoint_is_one_line_error(tmp_path: Path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 16)
    out = run_cli("inspect", str(bad))
    assert out.returncode == 2
    assert str(bad) in out.stderr
    assert "Traceback" not in out.stderr
    debug = run_cli("--debug", "inspect", str(bad))
    assert "Traceback" in debug.stderr


def test_generate_json_with_disk_offload_matches_transformers(model_folder: Path, tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_cli("generate", str(model_folder), "--prompt", "Hello world", "--max-new-tokens", "8",
                  "--max-memory", "cpu=8MiB,disk=1GiB", "--offload-folder", str(tmp_path / "off"), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["new_tokens"] == 8
    assert report["device_bytes"].get("disk", 0) > 0
    assert report["disk_bytes_per_token"] >= 0
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    reference = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.bfloat16)
    ids = tokenizer("Hello world", return_tensors="pt")["input_ids"]
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                  min_new_tokens=8, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    assert report["token_ids"] == expected.tolist()


def test_generate_text_prints_plan_and_summary(model_folder: Path, tmp_path: Path):
    out = run_cli("generate", str(model_folder), "--prompt", "Hi", "--max-new-tokens", "4",
                  "--max-memory", "cpu=8MiB,disk=1GiB", "--offload-folder", str(tmp_path / "off"))
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stdout and "first token" in out.stdout
    assert "disk" in out.stdout


def test_demo_runs_and_tokens_are_identical(tmp_path: Path):
    out = run_cli("demo", "--dir", str(tmp_path / "demo"), "--max-new-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert figures["tokens_identical"] is True
    assert figures["device_bytes"].get("disk", 0) > 0
    assert figures["ratio_to_in_memory"] > 0
