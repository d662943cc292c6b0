"""Offloaded generation: greedy decoding with decoder layers on disk, bigload vs accelerate.

Both libraries get the identical device map and the same offload folder layout:
- `memory`: everything on the CPU (the reference speed);
- `half`: decoder layers 4-7 on disk;
- `all`: every decoder layer on disk.
From a fixed 32-token prompt, 32 new tokens, greedy. A streamer timestamps each token, so prefill (time to the
first new token) and decode (tokens/s over the other 31) are separate figures. Cold runs evict the checkpoint
and the offload folder from the page cache after loading, right before generating. bigload runs with
prefetch 1 (the default) and 0. Every run's tokens are compared with transformers' in-memory model.

Methods: `accelerate.load_checkpoint_and_dispatch(model, folder, device_map=map, offload_folder=...)`,
`bigload.load_checkpoint_and_dispatch(..., prefetch=p)`, and `transformers.from_pretrained` (in memory
only, the reference tokens). Each on a meta model from `from_config`, then `model.generate`.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

from benchmarks import pagecache
from benchmarks.bench_load import MEMORY_NOISE
from benchmarks.harness import failure_notes, interleave, median_of, need, status_of
from benchmarks.make_checkpoint import checkpoint_files

PROMPT_TOKENS = 32
NEW_TOKENS = 32
MAPS = ("memory", "half", "all")
# bigload with `quantize=`: in memory only (beyond RAM, where they matter most: bench_beyond_ram).
QUANTIZED = {"bigload-int8-p1": "int8", "bigload-int4-p1": "int4"}
METHODS = ("bigload-p1", "accelerate", "bigload-p0", "transformers", *QUANTIZED)
MAP_TITLES = {"memory": "in memory", "half": "layers 4-7 on disk", "all": "all decoder layers on disk"}


def device_map(kind: str, num_layers: int) -> dict[str, str]:
    """The device map both libraries receive, in transformers' format."""
    if kind == "memory":
        return {"": "cpu"}
    first_on_disk = num_layers // 2 if kind == "half" else 0
    layers = {f"model.layers.{i}": "disk" if i >= first_on_disk else "cpu" for i in range(num_layers)}
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", **layers, "model.norm": "cpu", "lm_head": "cpu"}


# ---------------------------------------------------------------- worker side


class _Clock:
    """A generation streamer that records when each token arrives (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _meta_model(folder: str, init_empty_weights):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model


def _load(spec: dict, offload: Path):
    import torch

    folder, method = spec["folder"], spec["method"]
    num_layers = json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"]
    dmap = device_map(spec["map"], num_layers)
    if method == "transformers":
        auto = need("transformers", "AutoModelForCausalLM")
        return lambda: auto.from_pretrained(folder, device_map="cpu", dtype=torch.bfloat16), "transformers.from_pretrained"
    if method == "accelerate":
        init_empty_weights, load = need("accelerate", "init_empty_weights", "load_checkpoint_and_dispatch")
        kwargs = {}
        api = "accelerate.load_checkpoint_and_dispatch"
        retie = True  # accelerate's init_empty_weights unties weights; its docs say to call tie_weights()
    else:
        init_empty_weights = need("bigload", "init_empty_weights")
        load = need("bigload", "load_checkpoint_and_dispatch")
        kwargs = {"prefetch": int(method.rsplit("p", 1)[1])}
        api = "bigload.load_checkpoint_and_dispatch"
        retie = False  # bigload's init_empty_weights keeps ties made in __init__: no call needed

    def run():
        model = _meta_model(folder, init_empty_weights)
        if retie:
            model.tie_weights()
        extra = quantize_kwargs(folder, QUANTIZED[method], model) if method in QUANTIZED else {}
        out = load(model, folder, device_map=dmap, offload_folder=str(offload), dtype=torch.bfloat16, **kwargs,
                   **extra)
        return out if isinstance(out, torch.nn.Module) else model

    return run, api


def quantize_kwargs(folder: str, scheme: str, model) -> dict:
    """bigload's `quantize=` (and `quantize_skip=`) for `scheme` on the model of checkpoint `folder`: int4's
    groups of 128 get smaller when the model's widths are not multiples of 128, and Linears whose inputs no
    group size divides stay unquantized (both only in the tiny quick-mode checkpoints)."""
    import torch

    if scheme != "int4":
        return {"quantize": scheme}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    widths = [getattr(config, name, 128) for name in ("hidden_size", "intermediate_size")]
    group = next((g for g in (128, 64) if all(w % g == 0 for w in widths)), 32)
    if group == 128:
        return {"quantize": scheme}
    skip = [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module.in_features % group]
    return {"quantize": f"int4:{group}", "quantize_skip": skip}


def prompt_ids(vocab_size: int, length: int):
    import torch

    gen = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab_size, (1, length), generator=gen)


def measure(spec: dict) -> dict:
    import torch

    from benchmarks.procmem import MemorySampler

    torch.manual_seed(0)
    offload = Path(spec["work"]) / f"offload-{spec['method']}-{spec['map']}-{spec['cache']}-{spec['repeat']}"
    shutil.rmtree(offload, ignore_errors=True)
    run, api = _load(spec, offload)
    from benchmarks.bench_load import preimport

    preimport()
    try:
        with MemorySampler() as mem:
            t0 = time.perf_counter()
            model = run()
            load_s = time.perf_counter() - t0
            model.eval()
            cached = [Path(spec["folder"]), offload]
            if spec["cache"] == "cold":
                evicted = pagecache.evict(cached)
            resident = pagecache.resident_fraction(cached)
            ids = prompt_ids(model.config.vocab_size, spec["prompt_tokens"])
            clock = _Clock()
            with torch.inference_mode():
                t1 = time.perf_counter()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec["new_tokens"],
                                     min_new_tokens=spec["new_tokens"], do_sample=False, streamer=clock,
                                     pad_token_id=model.config.pad_token_id)
                t2 = time.perf_counter()
        stamps = clock.times[-spec["new_tokens"]:]
        tokens = out[0, ids.shape[1]:].tolist()
        offload_bytes = sum(f.stat().st_size for f in pagecache.files_under([offload]))
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    result = {
        "api": api,
        "load_s": load_s,
        "prefill_s": stamps[0] - t1,
        "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "generate_s": t2 - t1,
        "tokens": tokens,
        "resident_before_generate": round(resident, 4),
        "offload_folder_bytes": offload_bytes,
        **mem.result(),
    }
    if spec["cache"] == "cold":
        result["eviction"] = evicted["method"]
    return result


# ---------------------------------------------------------------- parent side


def _layer_bytes(folder: Path) -> dict[int, int]:
    """Bytes of each decoder layer, from the safetensors headers."""
    sizes: dict[int, int] = {}
    for f in checkpoint_files(folder):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name.startswith("model.layers."):
                layer = int(name.split(".")[2])
                start, end = info["data_offsets"]
                sizes[layer] = sizes.get(layer, 0) + end - start
    return sizes


def _checkpoints(ctx) -> tuple[Path, Path]:
    tied = "tiny-tied" if ctx.offload_preset == "tiny" else "tied"
    return ctx.checkpoint(ctx.offload_preset), ctx.checkpoint(tied)


def specs(ctx) -> list[dict]:
    folder, tied = _checkpoints(ctx)
    work = ctx.work / "offload"
    work.mkdir(parents=True, exist_ok=True)
    tokens = 8 if ctx.quick else NEW_TOKENS
    base = {"bench": "offload", "folder": str(folder), "work": str(work), "prompt_tokens": tokens, "new_tokens": tokens}
    offloaded = ("transformers", *QUANTIZED)
    cases = [
        {**base, "map": "memory", "cache": "warm", "_skip": ("bigload-p0",)},
        {**base, "map": "half", "cache": "warm", "_skip": offloaded},
        {**base, "map": "all", "cache": "warm", "_skip": offloaded},
        {**base, "map": "half", "cache": "cold", "_skip": offloaded},
        {**base, "map": "all", "cache": "cold", "_skip": offloaded},
        # tied embeddings: lm_head shares the embedding's tensor; offloading must keep them one tensor
        {**base, "folder": str(tied), "map": "all", "cache": "warm", "tied": True, "_skip": ("bigload-p0", *QUANTIZED)},
    ]
    if ctx.quick:  # every code path once: the cold path is the same for both maps
        cases = [c for c in cases if (c["map"], c["cache"]) != ("half", "cold")]
    return interleave(cases, METHODS, ctx.repeats)


def before(ctx):
    """Every load starts warm (the cold case evicts after loading, inside the run)."""
    files = [f for folder in _checkpoints(ctx) for f in checkpoint_files(folder)]
    return lambda spec: {"resident_after": round(pagecache.warm(files), 4)}


def _fmt(v, unit, digits=2):
    return None if v is None else f"{v:.{digits}f}{unit}"


def summarize(ctx, results: list[dict]) -> dict:
    from benchmarks.report import ratio_cell

    layer_bytes = _layer_bytes(_checkpoints(ctx)[0])
    limits = ctx.limits

    by: dict[tuple, list[dict]] = {}
    for r in results:
        s = r["spec"]
        by.setdefault((bool(s.get("tied")), s["map"], s["cache"], s["method"]), []).append(r)

    def runs(m, map_, cache="warm", tied=False):
        return by.get((tied, map_, cache, m), [])

    def cell(rs, key, unit, digits=2):
        st = status_of(rs)
        return _fmt(median_of(rs, key), unit, digits) if st == "ok" else st

    reference = {}
    for tied in (False, True):
        ref = [r for r in results if r["status"] == "ok" and r["spec"]["method"] == "transformers"
               and bool(r["spec"].get("tied")) == tied]
        reference[tied] = ref[0]["tokens"] if ref else None

    def same_tokens(rs, tied=False):
        ok = [r for r in rs if r["status"] == "ok"]
        if not ok or reference[tied] is None:
            return status_of(rs) if not ok else "no reference"
        equal = sum(r["tokens"] == reference[tied] for r in ok)
        return "yes" if equal == len(ok) else f"**NO** ({equal}/{len(ok)} runs equal)"

    memory_tps = {m: median_of(runs(m, "memory"), "decode_tok_s") for m in ("bigload-p1", "accelerate", "transformers")}
    compute_s = 1 / memory_tps["transformers"] if memory_tps["transformers"] else None
    rows, load_rows = [], []
    for map_ in MAPS:
        n = len(layer_bytes)
        disk_bytes = sum(v for k, v in layer_bytes.items() if map_ != "memory" and k >= (n // 2 if map_ == "half" else 0))
        for cache in ("warm", "cold") if map_ != "memory" else ("warm",):
            tag = f"{MAP_TITLES[map_]}, page cache {cache}"  # RAM holds the model; beyond RAM: bench_beyond_ram
            b, b0, a, t = (runs(m, map_, cache) for m in ("bigload-p1", "bigload-p0", "accelerate", "transformers"))
            vb, vb0, va, vt = (median_of(x, "decode_tok_s") for x in (b, b0, a, t))
            limit = None
            if compute_s and limits.get("read_warm_bytes_s"):
                limit = f"{1 / max(compute_s, disk_bytes / limits['read_warm_bytes_s']):.2f} tok/s"
            rows.append([f"**decode tokens/s** — {tag}", cell(b, "decode_tok_s", " tok/s"),
                         cell(a, "decode_tok_s", " tok/s"), cell(t, "decode_tok_s", " tok/s"), limit,
                         ratio_cell(vb, va, vt)])
            if map_ != "memory":
                rb = vb / memory_tps["bigload-p1"] if vb and memory_tps["bigload-p1"] else None
                ra = va / memory_tps["accelerate"] if va and memory_tps["accelerate"] else None
                rows.append([f"decode ÷ same library in memory — {tag}", _fmt(rb, ""), _fmt(ra, ""), None, None,
                             ratio_cell(rb, ra)])
                rows.append([f"decode tokens/s, bigload prefetch 0 — {tag}", cell(b0, "decode_tok_s", " tok/s"),
                             None, None, None, f"prefetch 1 ÷ 0: {vb / vb0:.2f}" if vb and vb0 else None])
            rows.append([f"prefill (time to first token) — {tag}", cell(b, "prefill_s", " s"), cell(a, "prefill_s", " s"),
                         cell(t, "prefill_s", " s"), None,
                         ratio_cell(median_of(b, "prefill_s"), median_of(a, "prefill_s"), median_of(t, "prefill_s"))])
            rows.append([f"tokens equal to transformers in memory — {tag}",
                         same_tokens(b) if map_ == "memory" else f"p1: {same_tokens(b)}; p0: {same_tokens(b0)}",
                         same_tokens(a), "reference" if map_ == "memory" else None, None, None])
            if map_ == "memory":
                rows += _quantized_rows(runs, vb, cell)
        # Loads are the same in the warm and cold cases (eviction happens after loading): pool them.
        b, a, t = ([r for c in ("warm", "cold") for r in runs(m, map_, c)] for m in ("bigload-p1", "accelerate", "transformers"))
        tag = MAP_TITLES[map_]
        load_rows.append([f"load — {tag}", cell(b, "load_s", " s"), cell(a, "load_s", " s"), cell(t, "load_s", " s"),
                          None, ratio_cell(median_of(b, "load_s"), median_of(a, "load_s"), median_of(t, "load_s"))])
        load_rows.append([f"private (anon) peak, load + generate — {tag}", _gib(b), _gib(a), _gib(t), None,
                          ratio_cell(median_of(b, "anon_peak"), median_of(a, "anon_peak"), median_of(t, "anon_peak"),
                                     floor=MEMORY_NOISE)])
        if map_ != "memory":
            load_rows.append([f"offload folder size — {tag}", _gib(b, "offload_folder_bytes"),
                              _gib(a, "offload_folder_bytes"), None, f"{disk_bytes / 2**30:.2f} GiB of weights", None])
    tb, ta, tt = (runs(m, "all", tied=True) for m in ("bigload-p1", "accelerate", "transformers"))
    rows.append(["tied embeddings, all layers on disk: tokens equal to transformers in memory",
                 same_tokens(tb, True), same_tokens(ta, True), "reference" if reference[True] else status_of(tt), None, None])
    rows.append(["tied embeddings, all layers on disk: decode tokens/s", cell(tb, "decode_tok_s", " tok/s"),
                 cell(ta, "decode_tok_s", " tok/s"), cell(tt, "decode_tok_s", " tok/s") + " (in memory)"
                 if status_of(tt) == "ok" else status_of(tt), None,
                 ratio_cell(median_of(tb, "decode_tok_s"), median_of(ta, "decode_tok_s"))])
    residency = sorted({r.get("resident_before_generate") for r in results
                        if r["spec"]["cache"] == "cold" and r.get("status") == "ok"})
    spec0 = results[0]["spec"] if results else {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS}
    notes = [
        f"{spec0['prompt_tokens']}-token prompt, {spec0['new_tokens']} new tokens, greedy, bf16 on the CPU; decode = "
        f"the {spec0['new_tokens'] - 1} tokens after the first. Tied case: `{Path(tb[0]['spec']['folder']).name if tb else '?'}`, "
        "accelerate gets `model.tie_weights()` after `init_empty_weights` as its docs ask; bigload gets no such call.",
        "`limit` for decode: 1 ÷ max(compute time per token in memory (transformers), offloaded bytes per token ÷ "
        "warm read bandwidth) — what perfect prefetch could reach.",
        "Cold: checkpoint and offload folder evicted after loading, just before generating; pages resident then: "
        + (", ".join(f"{v:.2f}" for v in residency) or "—") + ". Decode reads them again after the first token.",
        "Private peak: RssAnon above the process's baseline, over load and generation.",
        "quantize='int8' / 'int4' rows: bigload with its Linear weights quantized while loading (in memory, "
        "prefetch 1); `÷ bf16` is its decode speed over bigload's own bf16 in memory. Their tokens are not "
        "compared (quantized weights approximate the bf16 ones).",
    ]
    apis = sorted({r.get("api") for r in results if r.get("api")})
    notes.append("Entry points measured: " + ", ".join(f"`{a}`" for a in apis) + ".")
    notes += failure_notes(results)
    for r in results:  # the tokens are long; keep them in results.json only once per run
        r.setdefault("tokens", None)
    tables = [{"title": "Generation", "rows": rows},
              {"title": "Loading with offload (warm and cold runs pooled)", "rows": load_rows}]
    return {"title": "Offloaded generation", "tables": tables, "notes": notes, "raw": results}


def _quantized_rows(runs, bf16_tok_s: float | None, cell) -> list[list]:
    """In-memory decode and prefill of bigload with `quantize=`, beside bigload's bf16 (`bf16_tok_s`)."""
    rows = []
    for method, scheme in QUANTIZED.items():
        rs = runs(method, "memory")
        tok_s = median_of(rs, "decode_tok_s")
        ratio = f"÷ bf16: {tok_s / bf16_tok_s:.2f}" if tok_s and bf16_tok_s else None
        rows.append([f"**decode tokens/s, bigload quantize='{scheme}'** — in memory", cell(rs, "decode_tok_s", " tok/s"),
                     None, None, None, ratio])
        rows.append([f"prefill, bigload quantize='{scheme}' — in memory", cell(rs, "prefill_s", " s"), None, None, None,
                     None])
    return rows


def _gib(rs, key="anon_peak"):
    st = status_of(rs)
    if st != "ok":
        return st
    v = median_of(rs, key)
    return None if v is None else f"{v / 2**30:.2f} GiB"
