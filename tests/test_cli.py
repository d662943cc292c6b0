"""The `bigload` command line, run as a person runs it: a subprocess, its exit code, its output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigload.cli.commands import main
from bigload.cli.demo import write_demo_model


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
    assert "Traceback" not in out.stderr
    # The fix is spelled as the flags a person types, not as Python keywords.
    assert "--max-memory ...,disk=200GiB --offload-folder DIR" in out.stderr
    assert "offload_folder" not in out.stderr and "max_memory" not in out.stderr
    assert "give the devices more memory (--max-memory)" in out.stderr


def test_does_not_fit_error_keeps_python_keywords_in_python():
    from bigload.errors import PlanError
    from bigload.integrations.hf import plan_model
    from bigload.messages import Audience

    # "lower headroom" is a fix too: the default GPU headroom (max(1 GiB, 5 %)) is kept on cuda:0.
    with pytest.raises(PlanError, match=r"offload_folder=\.\.\.\); or lower headroom; or give the devices more "
                                        r"memory \(max_memory\)") as info:
        plan_model("llama-3-70b", max_memory={0: "24GiB", "cpu": "16GiB"})
    assert "max_memory={..., 'disk': '200GiB'}" in str(info.value)
    assert "--offload-folder DIR" in info.value.render(Audience.CLI)


def test_plan_policy_sentence_names_the_flag_in_the_cli_and_the_keyword_in_python(cli):
    from bigload.integrations.hf import plan_model

    budget = "0=24GiB,1=24GiB,cpu=64GiB,disk=500GiB"
    out = cli("plan", "llama-3-70b", "--max-memory", budget)
    assert out.returncode == 0, out.stderr
    assert "pass --policy local|stream to override." in out.stdout
    assert "policy=" not in out.stdout
    python = plan_model("llama-3-70b", max_memory={0: "24GiB", 1: "24GiB", "cpu": "64GiB", "disk": "500GiB"})
    assert "pass policy= to override." in python.explain()
    assert any("pass policy= to override." in reason for reason in python.reasons)


def test_unitless_small_cli_budget_is_refused_with_the_likely_meaning():
    out = run_cli("plan", "llama-3-8b", "--max-memory", "0=24,cpu=64GiB")
    assert out.returncode == 2
    assert "0=24GiB" in out.stderr and "24 bytes" in out.stderr
    assert "Traceback" not in out.stderr


def test_python_int_budgets_stay_bytes():
    from bigload.plan.budget import parse_max_memory

    assert parse_max_memory({0: 24, "cpu": "64GiB"}).as_max_memory() == {0: 24, "cpu": 64 * 2**30}


def test_generate_missing_folder_says_the_folder_does_not_exist(tmp_path: Path):
    missing = tmp_path / "no-such-folder"
    out = run_cli("generate", str(missing), "--prompt", "hi")
    assert out.returncode == 2
    assert f"{missing}: no such folder" in out.stderr
    assert "tokenizer" not in out.stderr.split("no such folder")[0]
    assert "huggingface" not in out.stderr.lower() and "hub" not in out.stderr.lower()


def test_every_entry_point_checks_the_model_path_first(tmp_path: Path):
    from bigload.errors import BigloadError
    from bigload.integrations.hf import from_pretrained, load_tokenizer, plan_model

    missing = tmp_path / "nope"
    for call in (load_tokenizer, from_pretrained, plan_model):
        with pytest.raises(BigloadError, match="no such"):
            call(missing)
    with pytest.raises(BigloadError, match="is a file, not a model folder"):
        load_tokenizer(__file__)


def test_generate_without_offload_folder_names_the_flag(cli, model_folder: Path):
    out = cli("generate", str(model_folder), "--prompt", "Hi", "--max-new-tokens", "2",
              "--max-memory", "cpu=8MiB,disk=1GiB")
    assert out.returncode == 2
    assert "but no --offload-folder was given; pass --offload-folder DIR, a folder on a disk" in out.stderr
    assert "offload_folder" not in out.stderr


def test_help_shows_defaults(cli):
    def help_text(command: str) -> str:
        return " ".join(cli(command, "--help").stdout.split())  # argparse wraps lines anywhere

    assert "(default: small)" in help_text("demo") and "(default: 32)" in help_text("demo")
    assert "(default: 64)" in help_text("generate")
    assert "(default: 10)" in help_text("inspect")


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
    assert f"{report['total_bytes'] // 2 / 1e6:.3g}M parameters" in text.stdout  # bf16: 2 bytes each
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
    assert len(figures["ratios"]) == 5
    assert figures["ratio_conclusive"] == (figures["ratio_spread"] <= 0.25)
    assert 0.5 < figures["disk_fraction"] < 1  # "half the weights" on the CPU budget leaves most on disk


def test_demo_text_output_one_progress_line_and_honest_figures(tmp_path: Path):
    out = run_cli("demo", "--dir", str(tmp_path / "demo"), "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    # Not a terminal: bigload's bar is one final line; transformers' bars are off.
    assert "\r" not in out.stderr and "Loading weights" not in out.stderr and "Writing model" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line] == [
        next(line for line in out.stderr.splitlines() if line.startswith("loading: "))]
    assert "gibberish" in out.stdout
    assert "median of 5 interleaved runs" in out.stdout and "runs ranged" in out.stdout
    assert "% of the weights) go to disk" in out.stdout
    assert "tokens identical to the in-memory model: yes" in out.stdout


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

    from bigload.integrations.hf import from_pretrained, load_tokenizer

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
    assert out.stderr.startswith("bigload: error: --quantize int3 is not a scheme bigload knows; use --quantize int8")
    # The demo's MLP width (688) is no multiple of an int4 group: the message names the layer and the ways out.
    out = cli("plan", str(model_folder), "--quantize", "int4")
    assert out.returncode == 2
    assert "cannot quantize 'model.layers.0.mlp.down_proj' to int4:128: its 688 inputs" in out.stderr
    assert "use --quantize-skip model.layers.0.mlp.down_proj or --quantize int8." in out.stderr
# -- plan and inspect read headers only -----------------------------------------------------------------


def _page_cache_fraction(path: Path, start: int) -> float:
    """Fraction of `path`'s pages from byte `start` on that are in the page cache (mincore)."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    first = start // page * page
    length = path.stat().st_size - first
    pages = (length + page - 1) // page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), length, access=mmap.ACCESS_COPY, offset=first)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        status = ctypes.create_string_buffer(pages)
        assert libc.mincore(ctypes.c_void_p(address), length, status) == 0, ctypes.get_errno()
        resident = sum(byte & 1 for byte in status.raw)
        del address
    finally:
        mapped.close()
    return resident / pages


def _evict(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@pytest.fixture(scope="module")
def big_embedding_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama whose two 32 MiB embedding matrices dwarf any readahead of its safetensors header."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("big_embedding")
    config = LlamaConfig(vocab_size=131072, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise and mincore (Linux)")
def test_plan_and_inspect_read_no_weight(cli, big_embedding_folder: Path):
    from bigload.formats.discover import open_checkpoint

    (shard,) = big_embedding_folder.glob("*.safetensors")
    data_start = min(ref.offset for ref in open_checkpoint(big_embedding_folder).tensors.values())
    assert shard.stat().st_size - data_start > 64 * 2**20
    _evict(shard)
    assert _page_cache_fraction(shard, data_start) < 0.01  # the check below starts from a cold file
    for args in (("plan", str(big_embedding_folder), "--max-memory", "0=1074MiB,cpu=200MiB", "--json", "-"),
                 ("plan", str(shard), "--max-memory", "0=1074MiB,cpu=200MiB"),
                 ("inspect", str(big_embedding_folder), "--json"),
                 ("inspect", str(shard))):
        out = cli(*args)
        assert out.returncode == 0, (args, out.stderr)
    # Readahead of the header may bring in the first few MiB of data; reading the weights brings in all.
    assert _page_cache_fraction(shard, data_start) < 0.25
    # The measure sees reads: reading the file brings its data into the page cache.
    assert len(shard.read_bytes()) == shard.stat().st_size
    assert _page_cache_fraction(shard, data_start) > 0.9


def _plans_in_a_fresh_process(seed: str, folder: Path) -> str:
    script = (
        "import sys\n"
        "from bigload.cli.commands import main\n"
        "from bigload.devices import Budget\n"
        "from bigload.plan.inventory import inventory_from_module\n"
        "from bigload.plan.planner import plan\n"
        "from planner_models import tiny_llama, toy\n"
        "for model in (tiny_llama(tie=True), toy(tie=True)):\n"
        "    inventory = inventory_from_module(model)\n"
        "    budget = Budget.of({0: inventory.total_bytes // 2, 1: inventory.total_bytes // 4, "
        "'cpu': inventory.total_bytes // 8 + 2**19, 'disk': 10**9})\n"  # + the pinned staging of 2 slots
        "    for strategy in ('balanced', 'sequential'):\n"
        "        print(plan(inventory, budget, strategy=strategy, policy='stream', headroom=0).to_json())\n"
        # GPUs of 3 and 2 MiB beyond the default headroom (1 GiB each); 3 MiB of cpu beyond 4 MiB of pinned staging.
        f"sys.exit(main(['plan', {str(folder)!r}, '--max-memory', '0=1027MiB,1=1026MiB,cpu=7MiB,disk=1GiB', "
        "'--context-length', '64', '--json', '-']))\n"
    )
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONHASHSEED": seed,
           "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_plans_are_identical_across_hash_seeds(model_folder: Path):
    first = _plans_in_a_fresh_process("0", model_folder)
    second = _plans_in_a_fresh_process("4242", model_folder)
    assert first.count('"device_map"') == 5 and '"disk"' in first
    assert first == second


# -- flag values are refused before anything is planned or loaded ------------------------------------------


@pytest.fixture
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step that reads a model, a tokenizer or a checkpoint fails the test: a refusal must come first."""
    import bigload.cli.commands as commands
    import bigload.cli.session as session

    def reached(*args: object, **kwargs: object) -> None:
        pytest.fail("a bad flag value reached planning or loading")

    # Every name through which the CLI reaches a model, a tokenizer or a checkpoint, where the CLI looks it up.
    for module, name in ((session, "load_tokenizer"), (session, "plan_model"), (session, "from_pretrained"),
                         (session, "open_checkpoint"), (commands, "plan_model"), (commands, "plan_model_hosts"),
                         (commands, "open_checkpoint"), (commands, "run_demo"), (commands, "run_generate"),
                         (commands, "run_generate_pipeline")):
        monkeypatch.setattr(module, name, reached)


GENERATE = ("generate", "MODEL", "--prompt", "Hi")
BAD_FLAGS = {
    "max-new-tokens-0": ((*GENERATE, "--max-new-tokens", "0"),
                         "argument --max-new-tokens: 0 is too few: give at least 1 (tokens to generate)"),
    "max-new-tokens-negative": ((*GENERATE, "--max-new-tokens", "-1"), "argument --max-new-tokens: -1 is too few"),
    "temperature-0": ((*GENERATE, "--temperature", "0"),
                      "argument --temperature: 0 is not above 0; give a positive number (a sampling temperature"),
    "temperature-negative": ((*GENERATE, "--temperature", "-0.5"), "argument --temperature: -0.5 is not above 0"),
    "temperature-nan": ((*GENERATE, "--temperature", "nan"), "argument --temperature: nan is not a finite number"),
    "dtype-int8": ((*GENERATE, "--dtype", "int8"),
                   "argument --dtype: 'int8' is not a dtype to load a model in (an integer type; to store weights as "
                   "8-bit integers, use --quantize int8); use bfloat16 (bf16), float16 (fp16), float32 (fp32) or "
                   "float64"),
    "dtype-unknown": ((*GENERATE, "--dtype", "float17"), "argument --dtype: 'float17' is not a dtype to load"),
    "prompt-empty": (("generate", "MODEL", "--prompt", ""), "argument --prompt: the prompt is empty"),
    "top-p-above-1": ((*GENERATE, "--temperature", "0.7", "--top-p", "1.5"),
                      "argument --top-p: 1.5 is outside 0..1; give a probability mass from 0 to 1"),
    "top-p-without-sampling": ((*GENERATE, "--top-p", "0.9"),
                               "bigload: error: --top-p 0.9 applies to sampling, and this run decodes greedily; add "
                               "--temperature T"),
    "seed-too-large": ((*GENERATE, "--seed", str(2**64)), f"argument --seed: '{2**64}' is not a seed"),
    "timeout-0": ((*GENERATE, "--timeout", "0"), "argument --timeout: 0 is not above 0"),
    "budget-twice": ((*GENERATE, "--max-memory", "cpu=1GiB,cpu=2GiB"),
                     "argument --max-memory: cpu is given twice (cpu=1GiB and cpu=2GiB); give each device once"),
    "host-budget-without-torchrun": ((*GENERATE, "--max-memory-host", "0:cpu=1GiB"),
                                     "bigload: error: --max-memory-host gives one rank's budget in a run under "
                                     "torchrun; this run has one process, so use --max-memory"),
    "plan-dtype-float8": (("plan", "MODEL", "--dtype", "float8_e4m3fn"),
                          "argument --dtype: 'float8_e4m3fn' is not a dtype to load a model in (8-bit floats"),
    "hosts-0": (("plan", "MODEL", "--hosts", "0"), "argument --hosts: 0 is too few: give at least 1"),
    "host-outside-hosts": (("plan", "MODEL", "--max-memory-host", "5:cpu=1GiB"),
                           "bigload: error: --max-memory-host names host 5, but --hosts 1 means host 0 only"),
    "host-twice": (("plan", "MODEL", "--hosts", "2", "--max-memory-host", "1:cpu=1GiB", "--max-memory-host",
                    "1:cpu=2GiB"), "bigload: error: --max-memory-host gives host 1 more than once"),
    "json-into-missing-folder": (("plan", "MODEL", "--json", "/no/such/folder/plan.json"),
                                 "bigload: error: --json /no/such/folder/plan.json: the folder /no/such/folder does "
                                 "not exist"),
    "inspect-top-negative": (("inspect", "MODEL", "--top", "-1"), "argument --top: -1 is too few: give at least 0"),
    "demo-max-new-tokens-0": (("demo", "--max-new-tokens", "0"), "argument --max-new-tokens: 0 is too few"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flag_values_are_refused_before_anything_is_loaded(cli, nothing_loads, case: str):
    args, expected = BAD_FLAGS[case]
    out = cli(*args)
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


PLANNING_FLAGS = {
    "batch-size-0": (("--batch-size", "0"), "bigload: error: --batch-size 0 must be at least 1"),
    "prefetch-negative": (("--prefetch", "-1"), "bigload: error: --prefetch -1 is negative; use 0"),
    "context-length-negative": (("--context-length", "-1"), "bigload: error: --context-length -1 is negative"),
    "unknown-device": (("--max-memory", "npu=1GiB"), "bigload: error: --max-memory key 'npu' names no device"),
    "skip-without-quantize": (("--quantize-skip", "lm_head"),
                              "bigload: error: --quantize-skip lm_head was given without --quantize"),
}


@pytest.mark.parametrize("case", PLANNING_FLAGS)
def test_values_the_planner_reads_are_refused_before_loading(cli, model_folder: Path, case: str,
                                                            monkeypatch: pytest.MonkeyPatch):
    import bigload.cli.session as session

    monkeypatch.setattr(session, "from_pretrained", lambda *args, **kwargs: pytest.fail("loaded"))
    flags, expected = PLANNING_FLAGS[case]
    out = cli("generate", str(model_folder), "--prompt", "Hi", *flags)
    assert out.returncode == 2
    assert expected in out.stderr and "Traceback" not in out.stderr


def test_a_host_budget_outside_torchrun_ranks_is_refused_before_loading(cli, nothing_loads,
                                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = cli(*GENERATE, "--max-memory-host", "2:cpu=1GiB")
    assert out.returncode == 2
    assert "--max-memory-host names host 2, but WORLD_SIZE=2 means hosts 0 to 1" in out.stderr


def test_valid_flag_values_reach_the_library_unchanged(cli, monkeypatch: pytest.MonkeyPatch):
    import torch

    import bigload.cli.commands as commands
    import bigload.cli.session as session
    from bigload.sizes import parse_dtype

    seen: dict[str, object] = {}

    def run_generate(path, options, **kwargs):
        seen.update(path=path, options=options, **kwargs)
        return session.GenerateReport("", 0, 0.0, 0.0, 0.0, {}, 0.0)

    monkeypatch.setattr(commands, "run_generate", run_generate)
    out = cli(*GENERATE, "--dtype", "bf16", "--temperature", "0.7", "--top-p", "0", "--seed", "-1",
              "--max-new-tokens", "3", "--timeout", "5", "--max-memory", "cpu=1GiB,disk=2GiB", "--json")
    assert out.returncode == 0, out.stderr
    assert seen["options"] == session.GenerateOptions(prompt="Hi", max_new_tokens=3, temperature=0.7, top_p=0.0,
                                                      seed=-1)
    assert parse_dtype(seen["dtype"]) == torch.bfloat16
    assert seen["max_memory"] == {"cpu": "1GiB", "disk": "2GiB"}


def test_a_prompt_that_gives_no_token_is_refused_before_planning(model_folder: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    import bigload.cli.session as session
    from bigload.cli.session import load_for_generate
    from bigload.errors import BigloadError
    from bigload.messages import Audience

    monkeypatch.setattr(session, "plan_model", lambda *args, **kwargs: pytest.fail("planned"))
    with pytest.raises(BigloadError, match=r"prompt='' gives no token with this model's tokenizer") as error:
        load_for_generate(model_folder, prompt="", echo=None)
    assert error.value.render(Audience.CLI).startswith("--prompt '' gives no token")


# -- messages -----------------------------------------------------------------------------------------------


def test_a_quantize_refusal_names_the_flag_in_the_cli_and_the_keyword_in_python(cli, model_folder: Path,
                                                                                tmp_path: Path):
    from bigload.errors import OffloadError
    from bigload.integrations.hf import from_pretrained

    offload = tmp_path / "off"
    budget = {"cpu": "4MiB", "disk": "1GiB"}
    from_pretrained(model_folder, max_memory=budget, offload_folder=offload, progress=False)  # unquantized
    out = cli("generate", str(model_folder), "--prompt", "Hi", "--max-new-tokens", "1", "--max-memory",
              "cpu=4MiB,disk=1GiB", "--offload-folder", str(offload), "--quantize", "int8")
    assert out.returncode == 2
    assert (f"{offload} holds weights written with no quantization, and this load asks for --quantize int8. Use "
            "another --offload-folder for each scheme") in out.stderr
    assert "quantize=" not in out.stderr
    with pytest.raises(OffloadError, match=r"asks for quantize='int8'\. Use another offload_folder for each"):
        from_pretrained(model_folder, max_memory=budget, offload_folder=offload, quantize="int8", progress=False)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(buffered: bool):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"  # each print writes at once (the closed pipe shows inside the command)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before bigload writes a byte, as after `| head` has its lines
    try:
        done = subprocess.run([sys.executable, "-m", "bigload", "plan", "llama-3.1-405b", "--max-memory",
                               "0=80GiB,cpu=512GiB,disk=2TB"], stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=240, env=env)
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == 141  # what a shell reports for a tool SIGPIPE ended (`yes | head`)
