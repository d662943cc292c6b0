"""Loading a checkpoint into CPU memory: bigload vs accelerate vs transformers vs `cat` of the files.

Per run: the load call (config read, meta model, loading), then touching one byte of every page of every
tensor (a loader that returns file-backed mmap views pays its page faults here, so only `ready` = load +
touch compares loaders fairly), and the private (anonymous) and file-backed memory peaks separately.
Cases: warm and cold page cache, stored dtype (bf16) and a cast to float16. Every run is a fresh process;
the methods run interleaved; figures are medians.

Methods:
- bigload: `bigload.empty.init_empty_weights` + transformers `from_config`, then
  `bigload.load_checkpoint_and_dispatch(model, folder, device_map={"": "cpu"}, dtype=...)`
  (or `bigload.load_checkpoint_in_model` with the same arguments where that is missing).
- accelerate: `init_empty_weights` + `from_config`, then `load_checkpoint_and_dispatch(model, folder,
  device_map={"": "cpu"}, dtype=...)`.
- transformers: `AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=...)`.
- bigload-hf: `bigload.from_pretrained(folder, device_map="cpu", dtype=...)`, beside transformers' (one row).
- cat: `cat` of the safetensors files to /dev/null (the cost of reading the bytes, nothing else).
- read: the files read with 8 MiB `readinto` calls, one stream (`limits.read_through`): the read bound, measured
  interleaved with the loads so that it sees the disk in the state they see (this VM's disk is up to 3x
  slower for minutes after heavy reads), beside the once-per-invocation figure of *Machine limits*.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from benchmarks import pagecache
from benchmarks.harness import Unavailable, failure_notes, interleave, median_of, need, status_of
from benchmarks.make_checkpoint import checkpoint_files

METHODS = ("bigload", "accelerate", "transformers", "bigload-hf", "cat", "read")


# ---------------------------------------------------------------- worker side (runs in the fresh process)


def _meta_model(folder: str, dtype, init_empty_weights):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _loader_bigload(folder: str, dtype):
    init_empty_weights = need("bigload", "init_empty_weights")
    try:
        load = need("bigload", "load_checkpoint_and_dispatch")
        api = "bigload.load_checkpoint_and_dispatch"
    except Unavailable:
        load = need("bigload", "load_checkpoint_in_model")
        api = "bigload.load_checkpoint_in_model"

    def run():
        model = _meta_model(folder, dtype, init_empty_weights)
        out = load(model, folder, device_map={"": "cpu"}, dtype=dtype)
        return out if isinstance(out, type(model)) else model

    return run, api


def _loader_accelerate(folder: str, dtype):
    init_empty_weights, load = need("accelerate", "init_empty_weights", "load_checkpoint_and_dispatch")

    def run():
        model = _meta_model(folder, dtype, init_empty_weights)
        return load(model, folder, device_map={"": "cpu"}, dtype=dtype)

    return run, "accelerate.load_checkpoint_and_dispatch"


def _loader_transformers(folder: str, dtype):
    auto = need("transformers", "AutoModelForCausalLM")

    def run():
        return auto.from_pretrained(folder, device_map="cpu", dtype=dtype)

    return run, "transformers.AutoModelForCausalLM.from_pretrained"


def _loader_bigload_hf(folder: str, dtype):
    from_pretrained = need("bigload", "from_pretrained")

    def run():
        return from_pretrained(folder, device_map="cpu", dtype=dtype)

    return run, "bigload.from_pretrained"


def _loader_cat(folder: str, dtype):
    files = [str(f) for f in checkpoint_files(Path(folder))]

    def run():
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        return None

    return run, "cat"


def _loader_read(folder: str, dtype):
    from benchmarks.limits import read_through

    files = checkpoint_files(Path(folder))

    def run():
        for f in files:
            read_through(f)
        return None

    return run, "readinto (8 MiB)"


LOADERS = {
    "bigload": _loader_bigload,
    "accelerate": _loader_accelerate,
    "transformers": _loader_transformers,
    "bigload-hf": _loader_bigload_hf,
    "cat": _loader_cat,
    "read": _loader_read,
}


def preimport() -> None:
    """Import what the load calls would otherwise import lazily (transformers' Llama modeling, every
    library's loading modules), so a timed load measures loading, not Python imports."""
    import importlib

    for name in ("transformers.models.llama.modeling_llama", "accelerate", "accelerate.utils.modeling",
                 "bigload"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def touch_every_page(model) -> dict[str, object]:
    """Read one byte of every page of every distinct tensor. Returns a checksum of those bytes (equal across
    loaders that hold equal weights), the bytes covered and the tensors still on meta (never loaded)."""
    import torch

    seen: set[int] = set()
    checksum = 0
    nbytes = 0
    on_meta = []
    for name, t in model.state_dict(keep_vars=True).items():
        if t.device.type == "meta":
            on_meta.append(name)
            continue
        if t.data_ptr() in seen:  # tied weights: touch once
            continue
        seen.add(t.data_ptr())
        flat = t.detach().reshape(-1).view(torch.uint8)
        checksum += int(flat[::4096].sum(dtype=torch.int64))
        nbytes += flat.numel()
    return {"touch_sum": checksum, "tensor_bytes": nbytes, "on_meta": len(on_meta)}


def measure(spec: dict) -> dict:
    import torch

    from benchmarks.procmem import MemorySampler

    folder = spec["folder"]
    dtype = getattr(torch, spec["dtype"])
    run, api = LOADERS[spec["method"]](folder, dtype)
    preimport()
    resident = pagecache.resident_fraction(checkpoint_files(Path(folder)))
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        model = run()
        t1 = time.perf_counter()
        touched = touch_every_page(model) if model is not None else {}
        t2 = time.perf_counter()
    result = {"api": api, "load_s": t1 - t0, "touch_s": t2 - t1, "ready_s": t2 - t0,
              "resident_before": round(resident, 4), **touched}
    if model is not None:
        result.update(mem.result())
        result["dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    return result


# ---------------------------------------------------------------- parent side (orchestration and table)


def _files(ctx) -> list[Path]:
    return checkpoint_files(ctx.checkpoint(ctx.load_preset))


def specs(ctx) -> list[dict]:
    folder = str(ctx.checkpoint(ctx.load_preset))
    cases = [{"bench": "load", "folder": folder, "dtype": d, "cache": c} for d in ("bfloat16", "float16")
             for c in ("warm", "cold") if not (ctx.quick and (d, c) == ("float16", "cold"))]
    for case in cases:
        if case["dtype"] != "bfloat16":
            case["_skip"] = ("cat", "read")  # they read bytes; they have no dtype
    return interleave(cases, METHODS, ctx.repeats)


def before(ctx):
    """Set the page cache the way the run's case asks, right before its process starts."""
    files = _files(ctx)

    def prepare(spec: dict) -> dict:
        if spec["cache"] == "cold":
            return pagecache.evict(files)
        return {"method": "read through", "resident_after": round(pagecache.warm(files), 4)}

    return prepare


def _fmt_s(v):
    return None if v is None else f"{v:.2f} s"


def _ratio(bound: float | None, value: float | None) -> str | None:
    return None if not bound or not value else f"{bound / value:.2f}"


def _fmt_gb(v):
    return None if v is None else f"{v / 2**30:.2f} GiB"


FIGURES = (  # label, result key, formatter
    ("load call", "load_s", _fmt_s),
    ("touch every page", "touch_s", _fmt_s),
    ("**ready** (load + touch)", "ready_s", _fmt_s),
    ("private (anon) peak", "anon_peak", _fmt_gb),
    ("file-backed peak", "file_peak", _fmt_gb),
    ("total RSS peak (VmHWM)", "total_peak", _fmt_gb),
)
LOADERS_SHOWN = ("bigload", "accelerate", "transformers")
MEMORY_NOISE = 64 * 2**20  # peaks below this are allocator and interpreter noise: no ratio is shown


def summarize(ctx, results: list[dict]) -> dict:
    from benchmarks.report import ratio_cell

    folder = ctx.checkpoint(ctx.load_preset)
    total = sum(f.stat().st_size for f in checkpoint_files(folder))
    limits = ctx.limits

    by: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        s = r["spec"]
        by.setdefault((s["dtype"], s["cache"], s["method"]), []).append(r)

    rows, checks = [], []
    for dtype in ("bfloat16", "float16"):
        for cache in ("warm", "cold"):
            tag = f"{cache}, {'bf16' if dtype == 'bfloat16' else 'cast to fp16'}"
            read_bw = limits.get(f"read_{cache}_bytes_s")
            touch_bw = limits.get("mmap_touch_bytes_s") if cache == "warm" else None
            fastest = max(filter(None, [read_bw, touch_bw]), default=None)
            cat = by.get((dtype, cache, "cat"), [])
            read = by.get((dtype, cache, "read"), [])
            for label, key, fmt in FIGURES:
                runs = {m: by.get((dtype, cache, m), []) for m in LOADERS_SHOWN}
                vals = {m: median_of(rs, key) for m, rs in runs.items()}
                cells = [fmt(vals[m]) if status_of(rs) == "ok" else status_of(rs) for m, rs in runs.items()]
                limit = None
                if key == "ready_s" and fastest:
                    limit = _fmt_s(total / fastest)
                    if status_of(cat) == "ok":
                        limit += f" (`cat`: {_fmt_s(median_of(cat, 'load_s'))})"
                    if cache == "cold" and status_of(read) == "ok":
                        limit += f"; interleaved: {_fmt_s(median_of(read, 'load_s'))}"
                elif key == "total_peak":
                    limit = f"model {_fmt_gb(total)}"
                rows.append([f"{label} — {tag}", *cells, limit,
                             ratio_cell(vals["bigload"], vals["accelerate"], vals["transformers"],
                                        floor=MEMORY_NOISE if key.endswith("_peak") else 0.0)])
                if key == "ready_s" and cache == "cold" and status_of(read) == "ok":
                    bound = median_of(read, "load_s")
                    rows.append([f"cold read bound ÷ ready (1.00: at the disk's speed) — {tag}",
                                 *[_ratio(bound, vals[m]) for m in LOADERS_SHOWN],
                                 f"bound: {_fmt_s(bound)}, 8 MiB reads interleaved with the loads", None])
                if key == "ready_s":
                    hf = by.get((dtype, cache, "bigload-hf"), [])
                    v = median_of(hf, key)
                    rows.append([f"ready, `bigload.from_pretrained` — {tag}",
                                 fmt(v) if status_of(hf) == "ok" else status_of(hf), None, None, None,
                                 f"— · {v / vals['transformers']:.2f}" if v and vals["transformers"] else None])
            # Equal weights across loaders: same page-touch checksum, and nothing left on meta.
            sums = {m: {x.get("touch_sum") for x in by.get((dtype, cache, m), []) if x["status"] == "ok"}
                    for m in (*LOADERS_SHOWN, "bigload-hf")}
            present = {m: v for m, v in sums.items() if v}
            if not present:
                continue  # a case this run skipped (quick mode runs no cold cast)
            agree = len(set().union(*present.values())) <= 1
            on_meta = {m: max(x.get("on_meta", 0) for x in by[(dtype, cache, m)] if x["status"] == "ok")
                       for m in present}
            checks.append({"case": tag, "methods": sorted(present), "weights_equal": agree, "on_meta": on_meta})

    residency: dict[str, list[float]] = {}
    for r in results:
        if "resident_before" in r:
            residency.setdefault(r["spec"]["cache"], []).append(r["resident_before"])
    notes = [
        f"Checkpoint `{folder.name}`: {total / 1e9:.2f} GB of bf16 safetensors in "
        f"{len(checkpoint_files(folder))} shards; {len({r['spec']['repeat'] for r in results})} round(s).",
        "`limit` for ready: bytes ÷ the fastest way this machine makes them readable (warm: the larger of "
        "buffered-read and mmap page-fault bandwidth; cold: cold sequential read, measured once before the runs; `interleaved`: the same 8 MiB reads of the "
        "checkpoint's files, cold, run among the loads, the bound the `÷ ready` row uses); `cat` of the same files "
        "beside it.",
        "Memory peaks are above each process's baseline after its imports. Private = RssAnon (memory the "
        "process owns); file-backed = RssFile (page-cache pages it maps: shared, reclaimable).",
        "Checkpoint pages resident at the start of each run: "
        + "; ".join(f"{c}: {min(v):.2f}–{max(v):.2f}" for c, v in sorted(residency.items())) + ".",
    ]
    for c in checks:
        notes.append(f"Weights equal across {', '.join(c['methods']) or 'no method'} ({c['case']}): "
                     f"{'yes' if c['weights_equal'] else '**NO**'}; tensors left on meta: {c['on_meta']}.")
    apis = sorted({r.get("api") for r in results if r.get("api")})
    notes.append("Entry points measured: " + ", ".join(f"`{a}`" for a in apis) + ".")
    notes += failure_notes(results)
    return {"title": "Loading a checkpoint into CPU memory", "rows": rows, "notes": notes,
            "checks": checks, "raw": results}
