"""The prepared GPU check (`python -m benchmarks.gpu_check`), run on the CPU with its fallback sizes.

The whole script on the GPU machine takes ~6 minutes; here its driver runs end to end on one step (a fresh
process, its log, the JSON, the table), its time limit is checked on a command that would hang, and the
measuring steps run in this process at the fallback's tiny sizes (the GPU machine runs each in its own).
"""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import gpu_check


def test_driver_runs_a_step_in_its_own_process_and_writes_json_log_and_table(tmp_path, capsys):
    code = gpu_check.main(["--out", str(tmp_path), "--cpu-fallback", "--steps", "sanitizer,features"])
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 0 and report["mode"] == "cpu-fallback"
    assert report["steps"]["sanitizer"]["status"] == "skipped"  # needs CUDA
    features = report["steps"]["features"]
    assert features["status"] == "ok" and features["limit_s"] <= gpu_check.LIMITS["features"]
    # Both features are in this tree: int8 generates, and the adapter's tokens equal peft's.
    quantize, adapter = features["results"]["quantize"], features["results"]["adapter"]
    assert quantize["status"] == "ok" and quantize["scheme"] == "int8" and len(quantize["tokens"]) == 8
    assert adapter["status"] == "ok" and adapter["tokens"] == adapter["peft_tokens"]
    # peft's own PeftModel.from_pretrained on a model bigload dispatched over cpu and disk: peft's tokens.
    own = features["results"]["peft-own"]
    assert own["status"] == "ok" and own["tokens"] == adapter["peft_tokens"], own
    assert own["map_devices"] == ["cpu", "disk"]
    main = features["results"]["peft-own-main"]  # the fix bigload's error names: device_map={"": DEVICE}
    assert main["status"] == "ok" and main["tokens"] == adapter["peft_tokens"], main
    assert "peft-own-tight" not in features["results"]  # peft's map spans a GPU and the CPU only on a GPU
    assert "quantize: {'status': 'ok', 'scheme': 'int8'" in (tmp_path / "features.log").read_text()
    assert table.splitlines()[-1].startswith("features   ok") and "step       status" in table


def test_a_step_past_its_limit_is_killed_and_reported(tmp_path):
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    status = gpu_check._run_logged(command, tmp_path / "x.log", 2, env=gpu_check.worker_env())
    assert status == "timeout" and "started" in (tmp_path / "x.log").read_text()


def test_unknown_step_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        gpu_check.main(["--out", str(tmp_path), "--steps", "load,warp"])
    assert "unknown steps ['warp']" in capsys.readouterr().err


def test_measuring_steps_run_on_the_cpu_and_agree(tmp_path):
    sizes = gpu_check.CPU_FALLBACK
    load, decode, auto = (gpu_check._Rows(tmp_path / f"{n}.json") for n in ("load", "decode", "auto"))
    gpu_check.step_load(load, sizes, tmp_path)
    assert {"bigload", "transformers", "accelerate"} <= set(load.data)
    assert all(load.data[m]["devices"] == ["cpu"] for m in ("bigload", "transformers", "accelerate"))
    gpu_check.step_decode(decode, sizes, tmp_path)
    rows = {key: row for key, row in decode.data.items() if isinstance(row, dict)}
    assert len(rows) == 8 and all("error" not in row for row in rows.values()), rows
    assert all(row["tokens_equal"] for row in rows.values())  # every map and library: the same tokens
    # On the CPU only disk layers move; on a GPU cpu layers stream too (half of them, then all).
    assert rows["bigload/gpu"]["bound_s"] == rows["bigload/all_cpu"]["bound_s"] == 0
    assert rows["bigload/all_disk"]["bound_s"] > 0
    maps = gpu_check.decode_maps(8, 0)
    moved = {kind: gpu_check._moved_bytes(tmp_path / "ckpt-tiny", maps[kind], 0) for kind in maps}
    assert moved["gpu"] == 0 < moved["half_cpu"] < moved["all_cpu"] == moved["all_disk"]
    gpu_check.step_auto(auto, sizes, tmp_path)
    assert [row["status"] for row in auto.data.values()] == ["ok", "ok"]
    assert json.loads((tmp_path / "decode.json").read_text()) == decode.data
