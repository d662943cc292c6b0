"""The GPU check: run bigload's CUDA path for real, in one short call on a machine with a GPU.

    PYTHONPATH=. python -m benchmarks.gpu_check --out DIR                  # on the GPU machine, ~6 minutes
    PYTHONPATH=. python -m benchmarks.gpu_check --out DIR --cpu-fallback   # anywhere: tiny sizes, on the CPU

Five steps, each in its own process under its own time limit (and all of them under `--budget-s`):

1. tests: `pytest -m gpu` (every gpu-marked test), then the stream-ordering ones under
   `TORCH_CUDA_SANITIZER=1` (step "sanitizer");
2. load: a ~3 GB bf16 Llama (`make_checkpoint.py medium`, written there first, step "checkpoint") onto
   cuda:0 with bigload, transformers and accelerate: ready time beside a large pinned host-to-device copy
   and a `cat` of the files;
3. decode: greedy decoding with every layer on the GPU, half the layers on cpu, all on cpu, all on disk,
   bigload vs accelerate (same dict map; cpu layers stream to the GPU): s/token, ratio to all-on-GPU, tokens
   equal to all-on-GPU, and the bound (bytes moved per token / measured pinned H2D bandwidth);
4. auto: `bigload.from_pretrained(device_map="auto", context_length=C)` (probed budget, and a small
   `max_memory` for GPU 0), then generate that whole context; peak reserved GPU memory beside the budget;
5. features: `quantize=` and a LoRA `adapter=` on the GPU, when this tree's `from_pretrained` has them
   ("not in this tree" otherwise); and the same adapter through peft's own `PeftModel.from_pretrained` on a
   model bigload dispatched over the GPU, cpu and disk (peft then re-dispatches it through accelerate's
   `dispatch_model`): unchanged ("peft-own"), with a small GPU budget given to peft so that its map spans the
   GPU and the CPU as on a consumer GPU ("peft-own-tight": bigload takes accelerate's hooks back off), and
   with `device_map={"": 0}` ("peft-own-main", the fix bigload's errors name); errors are recorded.

Writes DIR/gpu_check.json (every step: status, seconds, results), DIR/<step>.log (the step's output) and
DIR/<step>.json (its results, written row by row, so a step cut off by its limit keeps what it measured),
and prints a short table last. `--cpu-fallback` runs the same code on the CPU with the `tiny` preset and
small sizes, to check the script itself anywhere. The GPU machine has torch, transformers, accelerate, peft
and safetensors; the script installs nothing.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks.bench_load import preimport
from benchmarks.harness import worker_env
from benchmarks.make_checkpoint import checkpoint_files, make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30


@dataclass(frozen=True)
class Sizes:
    """What one mode of the check runs at."""

    device: str  # "cuda:0", or "cpu" with --cpu-fallback
    preset: str  # make_checkpoint preset of the load and decode steps
    h2d_bytes: int  # size of the measured host-to-device copy
    prompt: int  # prompt tokens of the decode step
    new_tokens: int  # tokens decoded per row
    contexts: tuple[int, int]  # step 4: context with the probed budget, with the small budget
    small_gpu_budget: str  # step 4's max_memory for GPU 0


GPU = Sizes("cuda:0", "medium", 1 * GiB, 16, 8, (2048, 256), "2GiB")
CPU_FALLBACK = Sizes("cpu", "tiny", 64 * 2**20, 4, 2, (24, 12), "2GiB")

# Seconds each step may take (the sum stays near 7 minutes); --budget-s caps them all together. The
# checkpoints are written in a step of their own, so a load cut off by its limit never leaves half a file.
LIMITS = {"tests": 90, "sanitizer": 40, "checkpoint": 50, "load": 60, "decode": 110, "auto": 50, "features": 30}
STEPS = tuple(LIMITS)


# ---------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, the logs and checkpoints")
    parser.add_argument("--cpu-fallback", action="store_true", help="tiny sizes on the CPU (checks the script)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--budget-s", type=float, default=430.0, help="seconds for all steps together")
    parser.add_argument("--worker", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = CPU_FALLBACK if args.cpu_fallback else GPU
    if args.worker:
        _WORKERS[args.worker](_Rows(args.out / f"{args.worker}.json"), sizes, args.out)
        return 0
    steps = [step for step in args.steps.split(",") if step]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    report = {"mode": "cpu-fallback" if args.cpu_fallback else "gpu", "machine": _machine(), "steps": {}}
    deadline = time.monotonic() + args.budget_s
    for step in steps:
        limit = min(LIMITS[step], deadline - time.monotonic())
        report["steps"][step] = _run_step(step, args, limit)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(_table(report))
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["steps"].values()) else 1


def _run_step(step: str, args: argparse.Namespace, limit: float) -> dict[str, Any]:
    if limit < 5:
        return {"status": "skipped", "seconds": 0.0, "reason": "no time left in --budget-s", "results": {}}
    if step == "sanitizer" and args.cpu_fallback:
        return {"status": "skipped", "seconds": 0.0, "reason": "the CUDA sanitizer needs CUDA", "results": {}}
    command = _step_command(step, args)
    log = args.out / f"{step}.log"
    started = time.monotonic()
    status = _run_logged(command, log, limit, env=_step_env(step))
    results_file = args.out / f"{step}.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if step in ("tests", "sanitizer"):
        results = {"summary": _pytest_summary(log.read_text(errors="replace"))}
    return {"status": status, "seconds": round(time.monotonic() - started, 1), "limit_s": round(limit),
            "command": " ".join(command), "results": results}


def _step_command(step: str, args: argparse.Namespace) -> list[str]:
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs"]
    if step == "tests":
        # The CPU fallback collects the gpu tests of one file (they skip): the point is that this runs.
        return [*pytest, "tests/test_gpu.py" if args.cpu_fallback else "tests"]
    if step == "sanitizer":
        # The stream-ordering tests only: the sanitizer slows every kernel launch down.
        return [*pytest, "tests/test_gpu.py", "tests/test_hooks.py", "-k", "not within_budget"]
    fallback = ["--cpu-fallback"] if args.cpu_fallback else []
    return [sys.executable, "-m", "benchmarks.gpu_check", "--worker", step, "--out", str(args.out), *fallback]


def _step_env(step: str) -> dict[str, str]:
    env = worker_env()
    if step == "sanitizer":
        env["TORCH_CUDA_SANITIZER"] = "1"  # reports unsynchronized accesses between CUDA streams
    return env


def _run_logged(command: list[str], log: Path, limit: float, *, env: dict[str, str]) -> str:
    """Run `command` with its output in `log`; "ok", "failed (exit N)" or "timeout" (its process group killed)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return "timeout"
    return "ok" if code == 0 else f"failed (exit {code})"


def _pytest_summary(text: str) -> str:
    lines = [line.strip("= ") for line in text.splitlines() if " in " in line and ("passed" in line or
             "failed" in line or "skipped" in line or "error" in line or "deselected" in line)]
    return lines[-1] if lines else "no pytest summary (see the log)"


def _machine() -> dict[str, Any]:
    import platform

    import torch

    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, check=False)
        info["driver"] = driver.stdout.strip() or "unknown"
    return info


# ---------------------------------------------------------------- the table printed last


def _table(report: dict[str, Any]) -> str:
    lines = [f"GPU check ({report['mode']}): {report['machine']}", "", "step       status        s     figures"]
    for step, outcome in report["steps"].items():
        figures = _FIGURES.get(step, lambda r: "")(outcome["results"]) if outcome["results"] else ""
        lines.append(f"{step:<10} {outcome['status']:<12} {outcome['seconds']:>5}  {figures}")
    return "\n".join(lines)


def _load_figures(results: dict[str, Any]) -> str:
    parts = [f"H2D {results.get('h2d_gbps', '?')} GB/s", f"cat {results.get('cat_s', '?')} s"]
    parts += [f"{m} {r['ready_s']} s" if "ready_s" in r else f"{m} {r.get('error', '?')[:40]}"
              for m, r in results.items() if isinstance(r, dict)]
    return "; ".join(parts)


def _decode_figures(results: dict[str, Any]) -> str:
    rows = [f"{key} {row['s_per_token']}s/t x{row.get('ratio', '?')} bound {row.get('bound_s', '?')}"
            f"{'' if row.get('tokens_equal', True) else ' TOKENS DIFFER'}"
            if "s_per_token" in row else f"{key} {row.get('error', '?')[:30]}" for key, row in results.items()
            if isinstance(row, dict)]
    return "; ".join(rows)


def _auto_figures(results: dict[str, Any]) -> str:
    return "; ".join(f"{key}: {row.get('status', '?')} reserved {row.get('max_reserved_gib', '?')}/"
                     f"{row.get('budget_gib', '?')} GiB" for key, row in results.items())


_FIGURES: dict[str, Callable[[dict[str, Any]], str]] = {
    "tests": lambda r: r["summary"],
    "sanitizer": lambda r: r["summary"],
    "checkpoint": lambda r: "; ".join(f"{k} {v['gb']} GB in {v['seconds']} s" for k, v in r.items()),
    "load": _load_figures,
    "decode": _decode_figures,
    "auto": _auto_figures,
    "features": lambda r: "; ".join(f"{k}: {v if isinstance(v, str) else v.get('status', v)}" for k, v in r.items()),
}


# ---------------------------------------------------------------- worker side (one process per step)


class _Rows:
    """A step's results, rewritten to its JSON file after every row (a step cut off keeps what it did)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
        print(f"{key}: {value}", flush=True)


def _device_key(sizes: Sizes) -> int | str:
    return 0 if sizes.device.startswith("cuda") else "cpu"


def _sync(sizes: Sizes) -> None:
    import torch

    if sizes.device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(sizes: Sizes) -> None:
    import torch

    gc.collect()
    if sizes.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(0)


def _checkpoint(sizes: Sizes, out: Path) -> Path:
    return make_checkpoint(sizes.preset, out / f"ckpt-{sizes.preset}")


def _h2d_gbps(sizes: Sizes) -> float:
    """GB/s of one large copy from pinned host memory to the device (a plain copy on the CPU fallback)."""
    import torch

    on_gpu = sizes.device.startswith("cuda")
    source = torch.empty(sizes.h2d_bytes, dtype=torch.uint8, pin_memory=on_gpu).fill_(1)
    target = torch.empty(sizes.h2d_bytes, dtype=torch.uint8, device=sizes.device)
    target.copy_(source, non_blocking=True)  # warm-up
    _sync(sizes)
    started = time.perf_counter()
    for _ in range(3):
        target.copy_(source, non_blocking=True)
    _sync(sizes)
    return round(3 * sizes.h2d_bytes / (time.perf_counter() - started) / 1e9, 2)


def _meta_llama(folder: Path, init_empty_weights: Callable[[], Any]):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)


def _load_bigload(folder: Path, device_map: Any, offload: Path | None = None):
    import torch

    from bigload.integrations.loading import load_checkpoint_and_dispatch
    from bigload.empty import init_empty_weights

    model = _meta_llama(folder, init_empty_weights)
    return load_checkpoint_and_dispatch(model, folder, device_map=device_map, offload_folder=offload,
                                        dtype=torch.bfloat16).eval()


def _load_accelerate(folder: Path, device_map: Any, offload: Path | None = None):
    import torch
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    model = _meta_llama(folder, init_empty_weights)
    model.tie_weights()
    return load_checkpoint_and_dispatch(model, str(folder), device_map=device_map,
                                        offload_folder=str(offload) if offload else None,
                                        dtype=torch.bfloat16).eval()


def _load_transformers(folder: Path, device_map: Any, offload: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, dtype=torch.bfloat16).eval()


def _guarded(rows: _Rows, key: str, fn: Callable[[], dict[str, Any]]) -> None:
    """One row; an error is recorded in the row (with its type) and the step goes on."""
    try:
        rows[key] = fn()
    except Exception as error:  # a failing library must not hide the others' figures
        rows[key] = {"error": f"{type(error).__name__}: {error}"[:500]}


def step_checkpoint(rows: _Rows, sizes: Sizes, out: Path) -> None:
    for preset in (sizes.preset, "tiny"):
        started = time.perf_counter()
        folder = make_checkpoint(preset, out / f"ckpt-{preset}")
        size = sum(f.stat().st_size for f in checkpoint_files(folder))
        rows[preset] = {"gb": round(size / 1e9, 2), "seconds": round(time.perf_counter() - started, 1)}


def step_load(rows: _Rows, sizes: Sizes, out: Path) -> None:
    folder = _checkpoint(sizes, out)
    files = checkpoint_files(folder)
    rows["checkpoint_gb"] = round(sum(f.stat().st_size for f in files) / 1e9, 2)
    started = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    rows["cat_s"] = round(time.perf_counter() - started, 2)
    rows["h2d_gbps"] = _h2d_gbps(sizes)  # also initialises CUDA, which no timed load should pay
    preimport()  # nor Python imports
    target = {"": _device_key(sizes)}
    for name, load in (("bigload", _load_bigload), ("transformers", _load_transformers),
                       ("accelerate", _load_accelerate)):
        _free(sizes)
        _guarded(rows, name, lambda: _timed_load(load, folder, target, sizes))


def _timed_load(load: Callable[..., Any], folder: Path, device_map: Any, sizes: Sizes) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    model = load(folder, device_map)
    _sync(sizes)
    ready = time.perf_counter() - started
    devices = sorted({str(p.device) for p in model.parameters()})
    row = {"ready_s": round(ready, 2), "devices": devices}
    if sizes.device.startswith("cuda"):
        row["max_reserved_gib"] = round(torch.cuda.max_memory_reserved(0) / GiB, 2)
    del model
    return row


def decode_maps(num_layers: int, device: int | str) -> dict[str, dict[str, int | str]]:
    """The decode step's device maps: every layer on the device, half / all on cpu, all on disk."""
    def layers(kind: str, first: int) -> dict[str, int | str]:
        return {f"model.layers.{i}": kind if i >= first else device for i in range(num_layers)}

    ends = {"model.embed_tokens": device, "model.rotary_emb": device}
    tail = {"model.norm": device, "lm_head": device}
    return {
        "gpu": {"": device},
        "half_cpu": {**ends, **layers("cpu", num_layers // 2), **tail},
        "all_cpu": {**ends, **layers("cpu", 0), **tail},
        "all_disk": {**ends, **layers("disk", 0), **tail},
    }


def _moved_bytes(folder: Path, device_map: dict[str, int | str], device: int | str) -> int:
    """Bytes of weights brought to `device` per token: every block placed elsewhere (cpu and disk blocks
    stream to the GPU under a dict map; on the CPU fallback only disk blocks move)."""
    from bigload.formats.discover import open_checkpoint

    offloaded = [key for key, value in device_map.items() if value != device]
    index = open_checkpoint(folder)
    return sum(ref.nbytes for name, ref in index.tensors.items()
               if any(name.startswith(key + ".") for key in offloaded))


def step_decode(rows: _Rows, sizes: Sizes, out: Path) -> None:
    import torch

    folder = _checkpoint(sizes, out)
    config = json.loads((folder / "config.json").read_text())
    gbps = _h2d_gbps(sizes)
    rows["h2d_gbps"] = gbps
    prompt = torch.randint(3, config["vocab_size"], (1, sizes.prompt), generator=torch.Generator().manual_seed(0))
    maps = decode_maps(config["num_hidden_layers"], _device_key(sizes))
    for library, load in (("bigload", _load_bigload), ("accelerate", _load_accelerate)):
        first: dict[str, Any] = {}
        for kind, device_map in maps.items():
            _free(sizes)
            key = f"{library}/{kind}"
            offload = out / f"off-{library}-{kind}"
            _guarded(rows, key, lambda: _decode_row(load, folder, device_map, prompt, sizes, offload))
            row = rows.data[key]
            if "tokens" not in row:
                continue
            if kind == "gpu":
                first = {"tokens": row["tokens"], "s": row["s_per_token"]}
            if first:
                row.update(tokens_equal=row["tokens"] == first["tokens"],
                           ratio=round(row["s_per_token"] / first["s"], 2) if first["s"] else None)
            # Three significant digits, not fixed decimals: the CPU fallback's tiny bounds are microseconds.
            row["bound_s"] = float(f"{_moved_bytes(folder, device_map, _device_key(sizes)) / (gbps * 1e9):.3g}")
            rows[key] = row


def _decode_row(load: Callable[..., Any], folder: Path, device_map: dict[str, int | str], prompt: Any,
                sizes: Sizes, offload: Path) -> dict[str, Any]:
    import torch

    model = load(folder, device_map, offload)
    ids = prompt.to(sizes.device)
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                       pad_token_id=0)  # warm-up: kernels, first prefetch order
        _sync(sizes)
        started = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sizes.new_tokens,
                             min_new_tokens=sizes.new_tokens, do_sample=False, pad_token_id=0)
        _sync(sizes)
    seconds = time.perf_counter() - started
    del model
    return {"s_per_token": round(seconds / sizes.new_tokens, 4), "tokens": out[0, sizes.prompt:].tolist()}


def step_auto(rows: _Rows, sizes: Sizes, out: Path) -> None:
    folder = _checkpoint(sizes, out)
    probed, constrained = sizes.contexts
    cases = {"probed": (None, probed),
             "small_gpu": ({_device_key(sizes): sizes.small_gpu_budget, "cpu": "64GiB"}, constrained)}
    if sizes.device == "cpu":
        cases["small_gpu"] = ({"cpu": "64GiB"}, constrained)
    for key, (max_memory, context) in cases.items():
        _free(sizes)
        _guarded(rows, key, lambda: _auto_row(folder, max_memory, context, sizes, out / f"off-auto-{key}"))


def _auto_row(folder: Path, max_memory: Any, context: int, sizes: Sizes, offload: Path) -> dict[str, Any]:
    import torch

    from bigload.plan.budget import detect_budget
    from bigload.integrations.hf import from_pretrained

    on_gpu = sizes.device.startswith("cuda")
    budget = detect_budget(max_memory).get(0) if on_gpu else None
    model = from_pretrained(folder, device_map="auto", max_memory=max_memory, context_length=context,
                            offload_folder=offload, progress=False)
    plan = model.bigload_plan
    new = 16 if on_gpu else 2
    ids = torch.randint(3, 1000, (1, context - new), device=sizes.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    row = {"status": "ok" if out.shape[1] == context else f"generated {out.shape[1]} of {context}",
           "context": context, "map_devices": sorted({str(v) for v in plan.device_map.values()}),
           "explain": plan.explain()}
    if on_gpu:
        reserved = torch.cuda.max_memory_reserved(0)
        row.update(max_reserved_gib=round(reserved / GiB, 2), budget_gib=round(budget / GiB, 2),
                   within_budget=reserved <= budget)
    del model
    return row


def step_features(rows: _Rows, sizes: Sizes, out: Path) -> None:
    from bigload.integrations.hf import from_pretrained

    parameters = inspect.signature(from_pretrained).parameters
    folder = make_checkpoint("tiny", out / "ckpt-tiny")
    if "quantize" not in parameters:
        rows["quantize"] = "not in this tree"
    else:
        _guarded(rows, "quantize", lambda: _quantize_row(folder, sizes))
    if "adapter" not in parameters:
        rows["adapter"] = "not in this tree"
    else:
        _guarded(rows, "adapter", lambda: _adapter_row(folder, sizes, out / "lora"))
        adapter = rows.data["adapter"]
        if isinstance(adapter, dict) and "peft_tokens" in adapter:  # the adapter and peft's tokens exist
            expected = adapter["peft_tokens"]
            for key, peft_kwargs in _peft_own_cases(sizes).items():
                _guarded(rows, key, lambda: _peft_own_row(folder, sizes, out / "lora", expected,
                                                          out / f"off-{key}", peft_kwargs))


def _peft_own_cases(sizes: Sizes) -> dict[str, dict[str, Any]]:
    """peft's own call three ways: unchanged (on a GPU larger than the model peft's map is the GPU alone, a
    plain `model.to(0)`); with a GPU budget a consumer GPU would leave (peft's map then spans the GPU and the
    CPU: accelerate's dispatch_model hooks the model, and bigload takes the hooks off before the forward);
    with the fix bigload's errors name for the cases accelerate fails on, `device_map={"": DEVICE}`."""
    device = _device_key(sizes)
    cases: dict[str, dict[str, Any]] = {"peft-own": {}, "peft-own-main": {"device_map": {"": device}}}
    if device != "cpu":  # the tiny checkpoint is ~1 MB: 300 kB of GPU holds its embedding, the rest is CPU
        cases["peft-own-tight"] = {"max_memory": {device: 300_000, "cpu": 64 * GiB}, "offload_folder": None}
    return cases


def _quantize_row(folder: Path, sizes: Sizes) -> dict[str, Any]:
    """The first quantization scheme this tree accepts, loaded on the device and generating."""
    import torch

    from bigload.errors import BigloadError
    from bigload.integrations.hf import from_pretrained

    errors = []
    for scheme in ("int8", "nf4", "int4", "fp8"):
        try:
            model = from_pretrained(folder, device_map={"": _device_key(sizes)}, quantize=scheme, progress=False)
        except (BigloadError, ValueError, TypeError) as error:
            errors.append(f"{scheme}: {error}"[:200])
            continue
        ids = torch.tensor([[1, 5, 9, 13]], device=sizes.device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 pad_token_id=0)
        return {"status": "ok", "scheme": scheme, "tokens": out[0].tolist()}
    return {"status": "no scheme accepted", "errors": errors}


def _adapter_row(folder: Path, sizes: Sizes, adapter_dir: Path) -> dict[str, Any]:
    """A random LoRA adapter through bigload vs peft on transformers' model: tokens equal."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bigload.integrations.hf import from_pretrained

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    reference = get_peft_model(base, lora).to(sizes.device).eval()
    reference.save_pretrained(adapter_dir)
    ids = torch.tensor([[1, 5, 9, 13, 21, 34]], device=sizes.device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        expected = reference.generate(input_ids=ids, **kwargs)
        model = from_pretrained(folder, device_map={"": _device_key(sizes)}, adapter=str(adapter_dir),
                                dtype=torch.bfloat16, progress=False)
        got = model.generate(ids, **kwargs)
    return {"status": "ok" if torch.equal(got.cpu(), expected.cpu()) else "tokens differ from peft",
            "tokens": got[0].tolist(), "peft_tokens": expected[0].tolist()}


def _peft_own_row(folder: Path, sizes: Sizes, adapter_dir: Path, expected: list[int], offload: Path,
                  peft_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The adapter `_adapter_row` wrote, through peft's own `PeftModel.from_pretrained` (given
    `peft_kwargs`), on the checkpoint dispatched by bigload with half its layers on the device, a quarter on cpu
    and a quarter on disk: tokens equal to peft's on the model in memory (`expected`)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from bigload.integrations.loading import load_checkpoint_and_dispatch
    from bigload.empty import init_empty_weights

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n, device = config.num_hidden_layers, _device_key(sizes)
    layers = {f"model.layers.{i}": device if i < n // 2 else "cpu" if i < 3 * n // 4 else "disk" for i in range(n)}
    device_map = {"model.embed_tokens": device, "model.rotary_emb": device, **layers, "model.norm": device,
                  "lm_head": device}
    base = load_checkpoint_and_dispatch(empty, folder, device_map=device_map, offload_folder=offload,
                                        dtype=torch.bfloat16)
    if "offload_folder" in peft_kwargs:  # peft's map may put layers on disk: accelerate then needs a folder
        peft_kwargs = {**peft_kwargs, "offload_folder": str(offload / "peft")}
    model = PeftModel.from_pretrained(base, adapter_dir, **peft_kwargs)  # peft's own call
    ids = torch.tensor([[1, 5, 9, 13, 21, 34]], device=sizes.device)
    with torch.inference_mode():
        got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    return {"status": "ok" if got[0].tolist() == expected else "tokens differ from peft",
            "tokens": got[0].tolist(), "peft_tokens": expected, "map_devices": sorted({str(v) for v in layers.values()}),
            "peft_kwargs": {key: str(value) for key, value in peft_kwargs.items()}}


_WORKERS: dict[str, Callable[[_Rows, Sizes, Path], None]] = {
    "checkpoint": step_checkpoint,
    "load": step_load,
    "decode": step_decode,
    "auto": step_auto,
    "features": step_features,
}


if __name__ == "__main__":
    sys.exit(main())
