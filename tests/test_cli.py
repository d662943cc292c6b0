"""The `bigload` command line, run as a person runs it: a subprocess, its exit code, its output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigload.cli import main
from bigload.demo import write_demo_model


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a fresh process (slow: torch and transformers import each time)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "bigload", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """`main(argv)` in this process: the same code path as the console script, without the start-up cost."""

    def invoke(*args: str) -> Result:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse exits on --help and on usage errors
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return invoke


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo") / "small", "small")


def test_help_lists_every_subcommand(cli):
    out = cli("--help")
    assert out.returncode == 0
    for command in ("plan", "inspect", "generate", "demo"):
        assert command in out.stdout
    for command in ("plan", "inspect", "generate", "demo"):
        sub = cli(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "usage: bigload " + command in sub.stdout


def test_plan_catalog_model_for_another_machine(cli, tmp_path: Path):
    out_json = tmp_path / "plan.json"
    out = cli("plan", "llama-3.1-405b", "--max-memory", "0=80GiB,1=80GiB,2=80GiB,3=80GiB,4=80GiB,5=80GiB,"
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


def test_plan_from_folder_and_from_headers_alone_agree(cli, model_folder: Path, tmp_path: Path):
    budget = "cpu=8MiB,disk=1GiB"
    from_folder = cli("plan", str(model_folder), "--max-memory", budget, "--json", "-")
    assert from_folder.returncode == 0, from_folder.stderr
    # A checkpoint with no config.json: the plan comes from safetensors headers only.
    headers_only = tmp_path / "weights"
    headers_only.mkdir()
    for shard in model_folder.glob("*.safetensors*"):
        (headers_only / shard.name).symlink_to(shard)
    from_headers = cli("plan", str(headers_only), "--max-memory", budget, "--json", "-")
    assert from_headers.returncode == 0, from_headers.stderr
    folder_map = json.loads(from_folder.stdout)["device_map"]
    headers_map = json.loads(from_headers.stdout)["device_map"]
    # Headers cannot see modules that hold only computed buffers (rotary inv_freq is never saved); every
    # module that holds checkpoint tensors is placed the same way.
    assert {k: v for k, v in folder_map.items() if k in headers_map} == headers_map
    assert set(folder_map) - set(headers_map) == {"model.rotary_emb"}
    assert "disk" in folder_map.values()


def test_bad_max_memory_is_one_line_error(cli):
    out = cli("plan", "llama-3-8b", "--max-memory", "cpu=24GiBs")
    assert out.returncode == 2
    assert "24GiBs" in out.stderr and "GiB" in out.stderr
    assert "Traceback" not in out.stderr
    out = cli("plan", "llama-3-8b", "--max-memory", "cpu")
    assert out.returncode == 2
    assert "DEVICE=SIZE" in out.stderr


def test_unknown_model_names_the_catalog(cli):
    out = cli("plan", "no-such-model-xyz")
    assert out.returncode == 2
    assert "llama-3.1-405b" in out.stderr


def test_inspect_reports_headers(cli, model_folder: Path):
    out = cli("inspect", str(model_folder), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["format"] == "safetensors"
    assert len(report["shards"]) == 3
    assert report["dtypes"][0]["dtype"] == "bfloat16"
    assert report["total_bytes"] == sum(s["bytes"] for s in report["shards"])
    blocks = [b["name"] for b in report["blocks"]]
    assert "model.layers.0" in blocks and "model.layers.7" in blocks and "lm_head" in blocks
    text = cli("inspect", str(model_folder))
    assert text.returncode == 0
    assert "largest tensors" in text.stdout and "mlp.gate_proj.weight" in text.stdout


def test_inspect_malformed_checkpoint_is_one_line_error(cli, tmp_path: Path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 16)
    out = cli("inspect", str(bad))
    assert out.returncode == 2
    assert str(bad) in out.stderr
    assert "Traceback" not in out.stderr
    debug = cli("--debug", "inspect", str(bad))
    assert "Traceback" in debug.stderr


def test_generate_json_with_disk_offload_matches_transformers(cli, model_folder: Path, tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cli("generate", str(model_folder), "--prompt", "Hello world", "--max-new-tokens", "8",
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


def test_generate_text_prints_plan_and_summary(cli, model_folder: Path, tmp_path: Path):
    out = cli("generate", str(model_folder), "--prompt", "Hi", "--max-new-tokens", "4",
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


def test_plan_with_quantize_sizes_quantized_bytes(cli, model_folder: Path):
    budget = "cpu=8MiB,disk=1GiB"
    plain = json.loads(cli("plan", str(model_folder), "--max-memory", budget, "--json", "-").stdout)
    out = cli("plan", str(model_folder), "--max-memory", budget, "--quantize", "int8", "--json", "-")
    assert out.returncode == 0, out.stderr
    quantized = json.loads(out.stdout)

    def total(plan):
        return sum(usage["weights"] for usage in plan["usage"])

    # Every block Linear shrinks from bfloat16 to int8 plus a bfloat16 scale per output; the rest stays.
    config = json.loads((model_folder / "config.json").read_text())
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inner, hidden), (inner, hidden),
              (hidden, inner)]
    saved = layers * sum(2 * n * k - (n * k + 2 * n) for n, k in shapes)
    assert total(quantized) == total(plain) - saved
    on_disk = [name for name, device in quantized["device_map"].items() if device == "disk"]
    assert len(on_disk) < len([name for name, device in plain["device_map"].items() if device == "disk"])


def test_generate_with_quantize_int8_and_disk_offload_equals_in_memory_int8(cli, model_folder: Path,
                                                                            tmp_path: Path):
    import torch

    from bigload.hf import from_pretrained, load_tokenizer

    out = cli("generate", str(model_folder), "--prompt", "Hello world", "--max-new-tokens", "6",
              "--max-memory", "cpu=4MiB,disk=1GiB", "--offload-folder", str(tmp_path / "off"),
              "--quantize", "int8", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["device_bytes"].get("disk", 0) > 0
    assert json.loads((tmp_path / "off" / "bigload.json").read_text())["quantize"] == "int8"
    in_memory = from_pretrained(model_folder, device_map={"": "cpu"}, quantize="int8", progress=False)
    ids = load_tokenizer(model_folder)("Hello world", return_tensors="pt")["input_ids"]
    expected = in_memory.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                                  do_sample=False)[0, ids.shape[1]:]
    assert report["token_ids"] == expected.tolist()


def test_quantize_errors_are_one_line_with_the_fix(cli, model_folder: Path):
    out = cli("plan", str(model_folder), "--quantize", "int3")
    assert out.returncode == 2
    assert out.stderr.startswith("bigload: error: quantize='int3' is not a scheme bigload knows; use 'int8'")
    # The demo's MLP width (688) is no multiple of an int4 group: the message names the layer and the ways out.
    out = cli("plan", str(model_folder), "--quantize", "int4")
    assert out.returncode == 2
    assert "cannot quantize 'model.layers.0.mlp.down_proj' to int4:128: its 688 inputs" in out.stderr
    assert "quantize_skip=['model.layers.0.mlp.down_proj'] or quantize='int8'" in out.stderr
