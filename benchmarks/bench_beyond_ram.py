"""Offloaded generation with the RAM really smaller than the model: inside a memory cgroup.

The situation disk offload exists for. Every run is a fresh process inside its own memory cgroup (v1 or v2,
`benchmarks/cgroup.py`) whose limit is a fraction of the checkpoint (`LIMIT_FRACTION`; page cache counted),
after `sync; echo 3 > /proc/sys/vm/drop_caches`. Model: the `large` checkpoint (16 layers of 0.4 GB, bf16),
every decoder layer on disk, embeddings, final norm and head on the CPU. One warm-up token, then a greedy
`generate` of `NEW_TOKENS` tokens: each step reads every decoder layer once, so the time per decode step is
the time per pass over the offloaded weights.

The bound is a cold `cat` of the shards in the same cgroup, run before every measured run (interleaved, so
it is measured in the state the runs see): its bytes per second, applied to the offloaded bytes, is the read
bound per pass; its spread over the invocation is reported. Beside it, once per round, the layers' bytes read
the way bigload's explicit path reads them (`bigload.load.reads`, no model): what the disk gives to parallel
`O_DIRECT` reads, which can beat one buffered stream.

Methods (the same device map for all):
- bigload: `load_checkpoint_and_dispatch(..., max_memory={"cpu": limit})`: the budget decides how disk blocks
  come in (`disk_reads`, recorded per run: explicit reads when they exceed the memory left);
- bigload-mapped: the same with `disk_reads="mapped"` (in place through the page cache, the path used while
  the weights fit in memory);
- bigload-int8 / bigload-int4: `quantize="int8"|"int4"`, when this tree's `load_checkpoint_and_dispatch` has
  `quantize=` (otherwise reported as not in this tree); the timed load writes the quantized offload store;
- bigload-int8-reused: the same int8 load into an offload folder that an earlier process (`store-int8`, an
  untimed load run just before, in its own cgroup) filled, the page cache dropped in between: how a user runs
  a model a second time (bigload reuses a store built from the same checkpoint, dtype and scheme). A process
  that has just written 3 GB of store decodes more slowly on this VM (the virtual disk is still absorbing the
  writes; dropping the written pages from the page cache made no difference), so both are shown;
- accelerate: `accelerate.load_checkpoint_and_dispatch(model, folder, device_map=map, offload_folder=...)`;
- transformers: `AutoModelForCausalLM.from_pretrained(folder, device_map=map, offload_folder=...)`.
"""

from __future__ import annotations

import atexit
import inspect
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks import cgroup, pagecache
from benchmarks.bench_offload import quantize_kwargs
from benchmarks.harness import Unavailable, failure_notes, median_of, need, status_of
from benchmarks.make_checkpoint import checkpoint_files

LIMIT_FRACTION = 0.45  # of the checkpoint's bytes: ~3 GiB for the 7 GB `large`
QUICK_LIMIT = 2 * 2**30  # --quick: the process alone needs more than a fraction of a tiny model
CGROUP_NAME = "bigload-bench-beyond-ram"
PROMPT_TOKENS = 16
NEW_TOKENS = 4
PREFETCH = 1
METHODS = ("bigload", "bigload-mapped", "bigload-int8", "bigload-int8-reused", "bigload-int4", "accelerate",
           "transformers")
TITLES = {
    "bigload": "bigload (disk reads decided from the budget)",
    "bigload-mapped": "bigload, disk_reads='mapped' (in place via page cache)",
    "bigload-int8": "bigload, quantize='int8'",
    "bigload-int8-reused": "bigload, quantize='int8', offload store reused (built by an earlier process)",
    "bigload-int4": "bigload, quantize='int4'",
    "accelerate": "accelerate",
    "transformers": "transformers from_pretrained(device_map=, offload_folder=)",
}
HEADER = ("method", "s per pass", "÷ read bound", "prefill s", "kernel s per pass", "peak RSS", "cgroup peak",
          "load s", "tokens = reference")
QUANTIZED = ("bigload-int8", "bigload-int8-reused", "bigload-int4")
SCHEMES = {"bigload-int8": "int8", "bigload-int8-reused": "int8", "bigload-int4": "int4"}
# A reused method's store is written by an untimed load in an earlier process (`BUILDS[method]`).
BUILDS = {"bigload-int8-reused": "store-int8"}
# A quantized run's tokens are checked against the same store generated again through the other disk path.
OTHER_PATH = {"read": "mapped", "mapped": "read"}


def device_map(num_layers: int) -> dict[str, str]:
    """Every decoder layer on disk; embeddings, rotary, norm and head on the CPU."""
    layers = {f"model.layers.{i}": "disk" for i in range(num_layers)}
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", **layers, "model.norm": "cpu", "lm_head": "cpu"}


# ---------------------------------------------------------------- worker side


def measure(spec: dict) -> dict:
    if spec.get("cgroup"):
        cgroup.join(spec["cgroup"])  # first: everything this process allocates from now on counts
    if spec["method"] == "cat":
        return _measure_cat(spec)
    if spec["method"] == "read-direct":
        return _measure_direct_reads(spec)
    if spec["method"] in BUILDS.values():
        return _build_store(spec)
    return _measure_generate(spec)


def _measure_direct_reads(spec: dict) -> dict:
    """The decoder layers' bytes read as bigload's explicit path reads them, with no model and no compute:
    `O_DIRECT`, `reads.READERS` reads of `reads.CHUNK_BYTES` in flight, into two buffers used in turn, the next
    layer's read started before the current one is waited on (as the runtime's prefetch 1 does)."""
    import mmap

    import torch

    open_checkpoint = need("bigload", "open_checkpoint")
    reads = need("bigload.load.reads")
    layers: dict[int, list] = {}
    for name, ref in open_checkpoint(spec["folder"]).tensors.items():
        if name.startswith("model.layers."):
            layers.setdefault(int(name.split(".")[2]), []).append(ref)
    largest = max(sum(ref.nbytes for ref in refs) for refs in layers.values()) + (1 << 20)
    buffers = [torch.frombuffer(mmap.mmap(-1, largest), dtype=torch.uint8) for _ in range(2)]
    reader = reads.BlockReader()
    total = 0
    started = time.perf_counter()
    try:
        pending = None
        for i, refs in enumerate(layers.values()):
            extents = [reads.Extent(ref.file, ref.offset, ref.nbytes) for ref in refs]
            block = reads.layout(extents, [ref.dtype.itemsize for ref in refs], [0] * len(refs), largest)
            current = reader.start(block, buffers[i % 2])
            if pending is not None:
                pending.wait()
            pending = current
            total += sum(ref.nbytes for ref in refs)
        if pending is not None:
            pending.wait()
    finally:
        reader.close()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": total, "bytes_s": total / seconds,
            "cgroup_peak": cgroup.peak_bytes(spec["cgroup"]) if spec.get("cgroup") else None}


def _measure_cat(spec: dict) -> dict:
    files = [str(f) for f in checkpoint_files(Path(spec["folder"]))]
    started = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True, timeout=600)
    seconds = time.perf_counter() - started
    total = sum(Path(f).stat().st_size for f in files)
    return {"seconds": seconds, "bytes": total, "bytes_s": total / seconds,
            "cgroup_peak": cgroup.peak_bytes(spec["cgroup"]) if spec.get("cgroup") else None}


def _loader(spec: dict, offload: Path, disk_reads: str | None = None):
    """A callable that loads the model as `spec["method"]` does (bigload: with `disk_reads` if given)."""
    import torch

    folder, method = spec["folder"], spec["method"]
    dmap = device_map(json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"])
    if method == "transformers":
        auto = need("transformers", "AutoModelForCausalLM")
        return lambda: auto.from_pretrained(folder, device_map=dmap, offload_folder=str(offload),
                                            dtype=torch.bfloat16)
    if method == "accelerate":
        init_empty_weights, load = need("accelerate", "init_empty_weights", "load_checkpoint_and_dispatch")

        def run_accelerate():
            model = _meta_model(folder, init_empty_weights)
            model.tie_weights()  # accelerate's docs ask for it after its init_empty_weights
            return load(model, folder, device_map=dmap, offload_folder=str(offload), dtype=torch.bfloat16)

        return run_accelerate
    init_empty_weights = need("bigload", "init_empty_weights")
    load = need("bigload", "load_checkpoint_and_dispatch")
    kwargs: dict = {"prefetch": spec["prefetch"], "max_memory": {"cpu": spec["budget"]}}
    if method == "bigload-mapped" or disk_reads is not None:
        kwargs["disk_reads"] = disk_reads or "mapped"
    if method.startswith("bigload-int"):
        if "quantize" not in inspect.signature(load).parameters:
            raise Unavailable("quantize= is not in this tree")

    def run_bigload():
        model = _meta_model(folder, init_empty_weights)
        extra = quantize_kwargs(folder, SCHEMES[method], model) if method in SCHEMES else {}
        load(model, folder, device_map=dmap, offload_folder=str(offload), dtype=torch.bfloat16, progress=False,
             **kwargs, **extra)
        return model

    return run_bigload


def _meta_model(folder: str, init_empty_weights):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def _measure_generate(spec: dict) -> dict:
    import resource

    import torch

    from benchmarks.bench_offload import _Clock, prompt_ids
    from benchmarks.procmem import MemorySampler

    torch.manual_seed(0)
    offload = _offload_folder(spec)
    reused = spec["method"] in BUILDS
    if not reused:
        shutil.rmtree(offload, ignore_errors=True)
    elif not (offload / "index.json").is_file():
        raise RuntimeError(f"no offload store in {offload}: its build ({BUILDS[spec['method']]}) did not run or failed")
    run = _loader(spec, offload)
    try:
        built = _index_stamp(offload) if reused else None
        with MemorySampler() as mem:
            t0 = time.perf_counter()
            model = run().eval()
            load_s = time.perf_counter() - t0
            ids = prompt_ids(model.config.vocab_size, spec["prompt_tokens"])
            args = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=model.config.pad_token_id)
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=1, min_new_tokens=1, **args)  # warm-up: one pass
                clock = _Clock()
                system0, t1 = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
                out = model.generate(ids, max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"],
                                     streamer=clock, **args)
                t2, system1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
        stamps = clock.times[-spec["new_tokens"]:]
        passes = spec["new_tokens"]  # prefill + one decode step per further token, each over every layer
        result = {
            "load_s": load_s,
            "prefill_s": stamps[0] - t1,
            "pass_s": (stamps[-1] - stamps[0]) / (len(stamps) - 1),
            "generate_s": t2 - t1,
            "system_s_per_pass": (system1 - system0) / passes,
            "tokens": out[0, ids.shape[1]:].tolist(),
            "cgroup_peak": cgroup.peak_bytes(spec["cgroup"]) if spec.get("cgroup") else None,
            **mem.result(),
        }
        if built is not None:  # the timed load found the store and wrote nothing: the index is the one built
            result["store_reused"] = built == _index_stamp(offload)
        result["rss_peak"] = result["total_peak"] + result["baseline_rss"]  # the process's whole RSS at its peak
        result.update(_bigload_facts(model))
        if spec["method"] in QUANTIZED and result.get("disk_reads") in OTHER_PATH:
            del model, out
            result.update(_check_tokens(spec, offload, ids, args, OTHER_PATH[result["disk_reads"]]))
        return result
    finally:
        shutil.rmtree(offload, ignore_errors=True)


def _offload_folder(spec: dict) -> Path:
    """Where a method's offload store goes; a reused method's store is the one its build wrote."""
    return Path(spec["work"]) / f"offload-{spec.get('for', spec['method'])}"


def _build_store(spec: dict) -> dict:
    """An untimed load (as the reused method `spec["for"]` loads) that fills its offload folder, in a process of
    its own before the timed one: the timed process finds the store and reuses it."""
    offload = _offload_folder(spec)
    shutil.rmtree(offload, ignore_errors=True)
    started = time.perf_counter()
    _loader({**spec, "method": spec["for"]}, offload)()
    return {"seconds": time.perf_counter() - started, "store_bytes": sum(f.stat().st_size for f in offload.iterdir())}


def _index_stamp(offload: Path) -> tuple[int, int]:
    stat = (offload / "index.json").stat()
    return stat.st_ino, stat.st_mtime_ns


def _check_tokens(spec: dict, offload: Path, ids, args: dict, path: str) -> dict:
    """The quantized run's tokens again, from the same offload store (reused, not rebuilt) brought in through
    the other disk path (`path`: "mapped" in place, or "read" explicitly): quantized weights approximate the
    bf16 ones, so accelerate's tokens are no reference for them, but both paths must bring in the same bytes.
    Measured after the timed run, in the same cgroup; not timed."""
    import gc

    import torch

    gc.collect()  # the measured model's slots go before the second one's come
    model = _loader(spec, offload, disk_reads=path)().eval()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], **args)
    return {"check_path": path, "check_tokens": out[0, ids.shape[1]:].tolist()}


def tokens_cell(method: str, ok: list[dict], reference: list[int] | None) -> str | None:
    """The `tokens = reference` cell of one method's row from its successful runs: accelerate's tokens are the
    reference of unquantized methods; a quantized method's runs are each compared with their own check
    (`_check_tokens`: the same store through the other disk path)."""
    if method == "accelerate":
        return "reference"
    if method in QUANTIZED:
        checked = [r for r in ok if r.get("check_tokens") is not None]
        if not checked:
            return None
        equal = sum(r["tokens"] == r["check_tokens"] for r in checked)
        paths = "/".join(sorted({r["check_path"] for r in checked}))
        verdict = "yes" if equal == len(checked) else f"**NO** ({equal}/{len(checked)})"
        return f"{verdict}: its {paths} path"
    if reference is None:
        return None
    equal = sum(r["tokens"] == reference for r in ok)
    return "yes" if equal == len(ok) else f"**NO** ({equal}/{len(ok)})"


def _bigload_facts(model) -> dict:
    """How bigload brought disk blocks in (the path is decided at load time; recorded, not assumed)."""
    try:
        from bigload.runtime import runtime_of
    except ImportError:
        return {}
    runtime = runtime_of(model)
    if runtime is None:
        return {}
    stats = runtime.stats()
    return {"disk_reads": getattr(stats, "disk_reads", None),
            "paths": sorted(set(getattr(stats, "paths", {}).values())),
            "reserve_bytes": stats.reserve_bytes, "peak_bytes_held": stats.peak_bytes_held}


# ---------------------------------------------------------------- parent side


def _folder(ctx) -> Path:
    return ctx.checkpoint(ctx.beyond_preset)


def _limit(ctx) -> tuple[int, int]:
    """(the cgroup's limit, the CPU budget bigload is told): both the fraction of the checkpoint, except that
    in --quick the cgroup gets `QUICK_LIMIT` (a Python process with torch needs more than a tiny model)."""
    budget = int(sum(f.stat().st_size for f in checkpoint_files(_folder(ctx))) * LIMIT_FRACTION)
    return (QUICK_LIMIT if ctx.quick else budget), budget


def specs(ctx) -> list[dict]:
    if cgroup.unavailable() is not None:
        return []  # the section says why (summarize)
    folder = _folder(ctx)
    work = ctx.work / "beyond_ram"
    work.mkdir(parents=True, exist_ok=True)
    limit, budget = _limit(ctx)
    base = {"bench": "beyond_ram", "folder": str(folder), "work": str(work), "limit": limit, "budget": budget,
            "prompt_tokens": 8 if ctx.quick else PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "prefetch": PREFETCH,
            "cgroup": None, "quick": ctx.quick}
    methods = ["read-direct"] + [m for m in METHODS if _quantize_in_tree() or not m.startswith("bigload-int")]
    out = []
    for r in range(ctx.repeats):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for method in order:
            if method in BUILDS:  # its store, written by an earlier process
                out.append({**base, "method": BUILDS[method], "for": method, "repeat": r})
            # The bound is measured right before every run, in the state that run sees.
            out += [{**base, "method": "cat", "before": method, "repeat": r}, {**base, "method": method, "repeat": r}]
    return out


def _quantize_in_tree() -> bool:
    """Whether this tree's `load_checkpoint_and_dispatch` takes `quantize=` (it lands with another branch)."""
    try:
        from bigload.integrations.loading import load_checkpoint_and_dispatch
    except ImportError:
        return False
    return "quantize" in inspect.signature(load_checkpoint_and_dispatch).parameters


_made: list[cgroup.MemoryCgroup] = []


def before(ctx):
    """Per run: a fresh cgroup with the limit and (full runs) a dropped page cache; removed at exit."""
    if cgroup.unavailable() is not None:
        return None

    def prepare(spec: dict) -> dict:
        _remove_made()
        group = cgroup.MemoryCgroup.create(CGROUP_NAME, spec["limit"])
        _made.append(group)
        spec["cgroup"] = str(group.path)
        dropped = False if ctx.quick else pagecache.drop_caches()  # quick: the code path, not a measurement
        return {"cgroup": str(group.path), "caches_dropped": dropped}

    atexit.register(_remove_made)
    return prepare


def _remove_made() -> None:
    while _made:
        _made.pop().remove()


def _cell(value, fmt: str):
    return None if value is None else fmt.format(value)


def summarize(ctx, results: list[dict]) -> dict:
    _remove_made()
    title = "Beyond RAM: offloaded generation inside a memory cgroup"
    why = cgroup.unavailable()
    if why is not None:
        return {"title": title, "header": HEADER, "rows": [], "notes": [f"Skipped: {why}. Nothing was measured."]}
    folder = _folder(ctx)
    from benchmarks.bench_offload import _layer_bytes

    disk_bytes = sum(_layer_bytes(folder).values())
    cats = [r for r in results if r["spec"]["method"] == "cat" and r["status"] == "ok"]
    bounds = sorted(disk_bytes / r["bytes_s"] for r in cats)
    bound = statistics.median(bounds) if bounds else None
    by = {m: [r for r in results if r["spec"]["method"] == m] for m in METHODS}
    reference = next((r["tokens"] for r in by["accelerate"] if r["status"] == "ok"), None)
    rows = []
    if bound is not None:
        spread = f"{bounds[0]:.2f}–{bounds[-1]:.2f}"
        gbs = statistics.median(r["bytes_s"] for r in cats) / 1e9
        rows.append([f"read bound: cold `cat` of the shards, same cgroup ({gbs:.2f} GB/s; spread {spread} s)",
                     f"{bound:.2f}", "1.00", None, None, None,
                     _gib(median_of(cats, "cgroup_peak")), None, None])
    direct = [r for r in results if r["spec"]["method"] == "read-direct" and r["status"] == "ok"]
    if direct:
        per_pass = sorted(disk_bytes / r["bytes_s"] for r in direct)
        rows.append([f"explicit reads alone: the layers read as bigload reads them, no compute "
                     f"({statistics.median(r['bytes_s'] for r in direct) / 1e9:.2f} GB/s)",
                     f"{statistics.median(per_pass):.2f} ({per_pass[0]:.2f}–{per_pass[-1]:.2f})",
                     _cell(bound / statistics.median(per_pass) if bound else None, "{:.2f}"),
                     None, None, None, _gib(median_of(direct, "cgroup_peak")), None, None])
    for method in METHODS:
        runs = by[method]
        ok = [r for r in runs if r["status"] == "ok"]
        if not ok:
            reason = runs[0].get("reason", status_of(runs)) if runs else "not run"
            if not runs and method.startswith("bigload-int") and not _quantize_in_tree():
                reason = "quantize= is not in this tree"
            rows.append([TITLES[method], reason, None, None, None, None, None, None, None])
            continue
        per_pass = median_of(ok, "pass_s")
        spread = f" ({min(r['pass_s'] for r in ok):.2f}–{max(r['pass_s'] for r in ok):.2f})" if len(ok) > 1 else ""
        label = TITLES[method]
        paths = sorted({p for r in ok for p in r.get("paths", [])})
        if paths:
            label += f" [{', '.join(paths)}]"
        rows.append([label, f"{per_pass:.2f}{spread}", _cell(bound / per_pass if bound else None, "{:.2f}"),
                     _cell(median_of(ok, "prefill_s"), "{:.2f}"), _cell(median_of(ok, "system_s_per_pass"), "{:.2f}"),
                     _gib(median_of(ok, "rss_peak")),
                     _gib(median_of(ok, "cgroup_peak")), _cell(median_of(ok, "load_s"), "{:.1f}"),
                     tokens_cell(method, ok, reference)])
    limit = _limit(ctx)[0]
    notes = [
        f"Limit {limit / 2**30:.2f} GiB (memory cgroup, page cache counted) for a checkpoint of "
        f"{sum(f.stat().st_size for f in checkpoint_files(folder)) / 1e9:.2f} GB; {disk_bytes / 1e9:.2f} GB of decoder "
        "layers on disk, embeddings/norm/head on the CPU; bf16 on the CPU, greedy.",
        f"One warm-up token, then {NEW_TOKENS} tokens: `s per pass` = time per decode step (each reads every "
        "layer once), median (min–max) over runs; `prefill s` = time to the first of them; `kernel s per pass` "
        "= the process's system CPU time over the generate ÷ passes (page-cache reclaim shows here).",
        "`÷ read bound` = read bound per pass ÷ s per pass (1.00 = the disk's speed). The bound: bytes per "
        "second of a cold `cat` of all shards, run before every measured run in a fresh cgroup with the same "
        "limit, applied to the decoder layers' bytes.",
        f"bigload prefetch {PREFETCH}; bigload is given `max_memory={{'cpu': limit}}` (the memory it may use).",
        "`tokens = reference`: greedy tokens equal to accelerate's, for the unquantized methods. int8/int4 weights "
        "only approximate the bf16 ones, so their greedy tokens can (and on the large random-weight model do) "
        "differ from accelerate's after a few steps; each quantized run is instead checked against itself: after "
        "the timed generate, the same offload store (reused, not rebuilt) is loaded again through the other disk "
        "path (explicit O_DIRECT reads vs mapped in place, named in the cell) and must give the same tokens, so "
        "the beyond-RAM path brings the quantized bytes in exactly.",
        "`peak RSS`: the process's VmHWM over load and generate; `cgroup peak`: the cgroup's peak usage, page "
        "cache included.",
    ]
    if ctx.quick:
        notes.append("Quick mode: tiny model, a 2 GiB cgroup limit (bigload told the fraction of the model), page "
                     "cache not dropped: the code path, not a measurement.")
    notes += failure_notes(results)
    for r in results:
        r.setdefault("tokens", None)
    return {"title": title, "header": HEADER, "rows": rows, "notes": notes, "raw": results}


def _gib(value):
    return None if value is None else f"{value / 2**30:.2f} GiB"
