"""The benchmarks must keep running: `python -m benchmarks --quick` end to end, and the checkpoint writer.

Timings are never asserted; what is asserted is that every method ran, that generated tokens equal
transformers' in-memory tokens, and that every loader produced the same weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_beyond_ram, bench_offload, pagecache, report  # noqa: E402
from benchmarks.make_checkpoint import checkpoint_files, make_checkpoint, tensor_shapes, PRESETS  # noqa: E402


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(folder):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-tied"])
def test_checkpoint_matches_transformers_llama(tmp_path, preset):
    from transformers import AutoConfig, LlamaForCausalLM

    folder = make_checkpoint(preset, tmp_path / preset)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # save_pretrained writes a tied tensor once
    tensors = _read_all(folder)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    assert len(checkpoint_files(folder)) > 1  # sharded, so loaders walk an index
    norm = tensors["model.norm.weight"].float()
    assert not torch.all(norm == 1) and abs(norm.mean().item() - 1) < 0.05  # a loader skipping norms is caught
    assert tensors["model.layers.0.mlp.up_proj.weight"].float().std().item() == pytest.approx(0.02, rel=0.1)


def test_checkpoint_is_deterministic_and_rewritten_only_when_stale(tmp_path):
    a = make_checkpoint("tiny", tmp_path / "a")
    b = make_checkpoint("tiny", tmp_path / "b")
    assert [f.read_bytes() for f in checkpoint_files(a)] == [f.read_bytes() for f in checkpoint_files(b)]
    mtime = checkpoint_files(a)[0].stat().st_mtime_ns
    make_checkpoint("tiny", a)
    assert checkpoint_files(a)[0].stat().st_mtime_ns == mtime


def test_presets_have_the_documented_sizes():
    size = lambda p: sum(2 * torch.Size(s).numel() for s in tensor_shapes(PRESETS[p]).values())  # noqa: E731
    assert 0.9e9 < size("small") < 1.1e9
    assert 6.5e9 < size("large") < 7.5e9
    assert 2.7e9 < size("medium") < 3.2e9  # the GPU check's "~3 GB" Llama
    assert size("tied") < size("small")


def test_page_cache_eviction_is_verified(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(os.urandom(4 * 2**20))
    assert pagecache.warm([f]) == 1.0
    result = pagecache.evict([f])
    assert result["resident_after"] == pagecache.resident_fraction([f])


@pytest.mark.slow
def test_quick_benchmarks_run_and_agree(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rendered = (out / "RESULTS.md").read_text()
    assert rendered.startswith("# bigload benchmarks") and "Quick mode" in rendered
    assert "## Analysis" not in rendered  # profiling notes explain a full run, not placeholder figures
    (out / "RESULTS.md").unlink()
    report.rewrite(out)  # re-rendered from results.json alone
    assert (out / "RESULTS.md").read_text() == rendered
    results = json.loads((out / "results.json").read_text())
    sections = {s["title"]: s for s in results["sections"]}
    beyond = "Beyond RAM: offloaded generation inside a memory cgroup"
    assert set(sections) == {"Loading a checkpoint into CPU memory", "Offloaded generation", "Planning a device map",
                             "Across ranks (torchrun, one machine)", beyond}

    runs = [r for s in sections.values() for r in s.get("raw", [])]
    for r in runs:
        assert r["status"] == "ok", (r["spec"], r.get("reason"), r.get("traceback"))

    if "raw" not in sections[beyond]:  # no memory cgroup here: the section says so and measures nothing
        assert "Skipped" in sections[beyond]["notes"][0]
    else:
        by_method = {r["spec"]["method"]: r for r in sections[beyond]["raw"] if r["status"] == "ok"}
        assert set(bench_beyond_ram.QUANTIZED) <= set(by_method)  # this tree has quantize=: every row ran
        assert by_method["bigload"]["disk_reads"] == "read"  # told a fraction of the model: explicit reads
        assert by_method["bigload-mapped"]["disk_reads"] == "mapped"
        for method in ("bigload", "bigload-mapped", "transformers"):
            assert by_method[method]["tokens"] == by_method["accelerate"]["tokens"], method
        rows = {row[0].split(" [")[0]: row for row in sections[beyond]["rows"]}
        for method in bench_beyond_ram.QUANTIZED:  # the same quantized store, through the other disk path
            run = by_method[method]
            assert run["check_path"] != run["disk_reads"] and run["check_tokens"] == run["tokens"], run
            assert rows[bench_beyond_ram.TITLES[method]][-1] == f"yes: its {run['check_path']} path"
        reused = by_method["bigload-int8-reused"]  # the store an earlier load built, reused: the same int8 bytes
        assert reused["store_reused"] and reused["tokens"] == by_method["bigload-int8"]["tokens"], reused

    for check in sections["Loading a checkpoint into CPU memory"]["checks"]:
        assert check["weights_equal"], check
        assert not any(check["on_meta"].values()), check

    offload = sections["Offloaded generation"]["raw"]
    for tied in (False, True):
        group = [r for r in offload if bool(r["spec"].get("tied")) == tied and r["status"] == "ok"]
        reference = [r["tokens"] for r in group if r["spec"]["method"] == "transformers"]
        assert reference, "transformers' in-memory reference did not run"
        for r in group:
            if r["spec"]["method"] not in bench_offload.QUANTIZED:  # quantized weights approximate bf16's
                assert r["tokens"] == reference[0], r["spec"]
        quantized = [r for r in group if r["spec"]["method"] in bench_offload.QUANTIZED]
        assert len(quantized) == (0 if tied else len(bench_offload.QUANTIZED)), [r["spec"] for r in quantized]

    pipeline = sections["Across ranks (torchrun, one machine)"]["raw"]
    tokens = {r["spec"]["method"]: r["tokens"] for r in pipeline}
    assert tokens["two-ranks"] == tokens["one-process"]


def test_full_results_carry_the_analysis_after_the_tables(tmp_path, monkeypatch):
    analysis = tmp_path / "ANALYSIS.md"
    analysis.write_text("## Analysis\n\nThe cast is bound by page faults.\n")
    monkeypatch.setattr(report, "ANALYSIS", analysis)
    section = {"title": "Planning a device map", "rows": [["plan time", "1 s", "2 s", "—", "—", "0.50 · —"]]}
    report.write(tmp_path, command="python -m benchmarks", info={"cpu": "test"}, sections=[section],
                 limits={"rows": []}, elapsed=60.0, quick=False)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| plan time | 1 s | 2 s | — | — | 0.50 · — |" in text
    assert text.index("| plan time") < text.index("The cast is bound by page faults.") < text.index("Regenerate:")
    analysis.write_text("## Analysis\n\nRevised after profiling.\n")
    report.rewrite(tmp_path)
    assert "Revised after profiling." in (tmp_path / "RESULTS.md").read_text()


def test_a_partial_run_keeps_the_other_sections_of_the_earlier_full_run(tmp_path):
    from benchmarks.run import _with_earlier_sections

    def section(bench: str, date: str) -> dict:
        return {"bench": bench, "title": bench, "rows": [], "measured": {"date": date, "command": f"run {date}"}}

    earlier = {"quick": False, "date": "d1", "command": "python -m benchmarks",
               "sections": [section("load", "d1"), section("offload", "d1"), section("plan", "d1")]}
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    merged = _with_earlier_sections(tmp_path / "results.json", [section("offload", "d2")], quick=False)
    assert [(s["bench"], s["measured"]["date"]) for s in merged] == [("load", "d1"), ("offload", "d2"), ("plan", "d1")]
    # A quick run's placeholder figures never mix with real ones, either way round.
    assert _with_earlier_sections(tmp_path / "results.json", [section("offload", "d2")], quick=True) == \
        [section("offload", "d2")]
    (tmp_path / "results.json").write_text(json.dumps(dict(earlier, quick=True)))
    assert len(_with_earlier_sections(tmp_path / "results.json", [section("offload", "d2")], quick=False)) == 1


def test_ratios_of_noise_are_not_shown():
    mib = 2**20
    assert report.ratio_cell(2 * mib, 1 * mib, 4 * mib, floor=64 * mib) is None  # a few MiB either way
    assert report.ratio_cell(6.8 * 2**30, 7.5 * 2**30, 13 * 2**30, floor=64 * mib) == "0.91 · 0.52"
    assert report.ratio_cell(1 * mib, 700 * mib, floor=64 * mib) == "0.00 · —"  # one side real: a real ratio


def test_each_section_says_which_library_versions_measured_it(tmp_path):
    versions = report.versions()
    assert set(versions) == {"torch", "transformers", "accelerate", "safetensors", "bigload"}
    from importlib.metadata import version

    assert versions["transformers"] == version("transformers")
    measured = {"date": "2026-11-30 00:00 UTC", "command": "python -m benchmarks", "versions": versions}
    section = {"title": "Planning a device map", "rows": [["plan time", "1 s", "2 s", "—", "—", "0.50 · —"]],
               "measured": measured}
    report.write(tmp_path, command="python -m benchmarks", info={"cpu": "test"}, sections=[section],
                 limits={"rows": []}, elapsed=60.0, quick=True)
    text = (tmp_path / "RESULTS.md").read_text()
    assert f"transformers {versions['transformers']}, accelerate {versions['accelerate']}" in text
    assert json.loads((tmp_path / "results.json").read_text())["sections"][0]["measured"]["versions"] == versions


def test_beyond_ram_tokens_column_checks_quantized_runs_against_their_other_path():
    """Quantized rows are never judged by accelerate's tokens (their weights are approximate) but by the same
    store's tokens through the other disk path; unquantized rows by accelerate's."""
    cell = bench_beyond_ram.tokens_cell
    reference = [5, 6, 7]
    assert cell("accelerate", [{"tokens": reference}], reference) == "reference"
    assert cell("bigload", [{"tokens": reference}] * 2, reference) == "yes"
    assert cell("bigload", [{"tokens": reference}, {"tokens": [5, 6, 8]}], reference) == "**NO** (1/2)"
    quantized = {"tokens": [9, 9, 9], "check_tokens": [9, 9, 9], "check_path": "mapped"}
    assert cell("bigload-int8", [quantized, quantized], reference) == "yes: its mapped path"
    drifted = dict(quantized, check_tokens=[9, 9, 1])
    assert cell("bigload-int4", [quantized, drifted], reference) == "**NO** (1/2): its mapped path"
    assert cell("bigload-int8", [{"tokens": [9, 9, 9]}], reference) is None  # no check recorded: no verdict
