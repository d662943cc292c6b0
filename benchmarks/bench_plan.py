"""Planning a device map without reading any weight: time and bytes per device.

Models (meta, built with transformers' `LlamaForCausalLM` under each library's `init_empty_weights`):
Llama-3-70B and Llama-3.1-405B shapes (published hyper-parameters), and a synthetic model of 200,000 small
modules (MoE-like: blocks of many tiny experts), where a planner that is not linear in the module count shows.
Budgets: 8 × 80 GiB GPUs + 512 GiB CPU, and 2 × 24 GiB GPUs + 64 GiB CPU (the rest to disk). Sizes at bf16.

Methods:
- accelerate: `infer_auto_device_map(model, max_memory, no_split_module_classes, dtype)`;
- accelerate balanced: `get_balanced_memory` then `infer_auto_device_map` (what transformers' "auto" does);
- bigload compat: `bigload.integrations.device_maps.infer_auto_device_map` with the same arguments;
- bigload plan: `bigload.plan.inventory.inventory_from_module` + `bigload.plan.planner.plan(strategy="auto")`.
Bytes per device are recomputed here from each returned map (longest dotted prefix per tensor), so every
method is judged by the same arithmetic. A run longer than the cap is stopped and reported as "> N s".
"""

from __future__ import annotations

import signal
import time

from benchmarks.harness import BenchTimeout, failure_notes, interleave, median_of, need, status_of

GiB = 2**30
MODELS = {
    "llama-3-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672, vocab_size=128256),
    "llama-3.1-405b": dict(hidden_size=16384, num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8,
                           intermediate_size=53248, vocab_size=128256),
}
BUDGETS = {
    "8x80": ({**{i: 80 * GiB for i in range(8)}, "cpu": 512 * GiB}, "8 × 80 GiB + 512 GiB CPU"),
    "2x24": ({0: 24 * GiB, 1: 24 * GiB, "cpu": 64 * GiB}, "2 × 24 GiB + 64 GiB CPU"),
}
METHODS = ("bigload-compat", "bigload-plan", "accelerate", "accelerate-balanced")
COLUMNS = {"bigload-compat": "bigload compat", "bigload-plan": "bigload plan (auto)",
           "accelerate": "accelerate", "accelerate-balanced": "accelerate balanced"}


# ---------------------------------------------------------------- worker side


def _synthetic(modules: int):
    """About `modules` modules: blocks of 2,000 Linear(16, 16) experts (fewer blocks for fewer modules)."""
    from torch import nn

    per_block = min(2000, max(10, modules // 10))
    blocks = max(1, round(modules / (per_block + 2)))

    class ExpertBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(per_block))

    class Synthetic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(ExpertBlock() for _ in range(blocks))

    return Synthetic()


def _build(spec: dict, init_empty_weights):
    import torch

    name = spec["model"]
    with init_empty_weights():
        if name.startswith("synthetic"):
            return _synthetic(spec["modules"]), []
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(**MODELS[name], tie_word_embeddings=False, max_position_embeddings=8192)
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), ["LlamaDecoderLayer"]


def _max_memory(spec: dict, model) -> dict:
    if spec["budget"] == "synthetic":
        total = sum(p.numel() * 2 for p in model.parameters())
        return {0: total // 3, 1: total // 3, "cpu": 4 * total}
    return dict(BUDGETS[spec["budget"]][0])


def _planner(method: str):
    """(init_empty_weights, plan(model, max_memory, no_split) -> (device_map, facts)) for `method`."""
    import torch

    if method.startswith("accelerate"):
        init_empty_weights, infer = need("accelerate", "init_empty_weights", "infer_auto_device_map")
        balanced = need("accelerate.utils", "get_balanced_memory")

        def plan(model, max_memory, no_split):
            if method == "accelerate-balanced":
                max_memory = balanced(model, max_memory=max_memory, no_split_module_classes=no_split,
                                      dtype=torch.bfloat16)
            return infer(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=torch.bfloat16), {}

        return init_empty_weights, plan

    init_empty_weights = need("bigload", "init_empty_weights")
    if method == "bigload-compat":
        infer = need("bigload", "infer_auto_device_map")

        def plan(model, max_memory, no_split):
            return infer(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=torch.bfloat16), {}

        return init_empty_weights, plan

    inventory_from_module = need("bigload", "inventory_from_module")
    plan_fn = need("bigload.plan", "plan")
    Budget = need("bigload.devices", "Budget")

    def plan(model, max_memory, no_split):
        t = time.perf_counter()
        inventory = inventory_from_module(model, dtype=torch.bfloat16, no_split_module_classes=no_split)
        inventory_s = time.perf_counter() - t
        # accelerate treats a budget without "disk" as an unlimited disk; bigload's planner gives a device
        # that is absent nothing, so the same budget names the disk explicitly.
        budget = Budget.of({**max_memory, "disk": 2**62})
        # bigload keeps a default headroom on each GPU (max(1 GiB, 5 %)); the synthetic model's toy GPUs of a
        # few MiB are smaller than that, so there it plans, like accelerate, with none.
        extra = {"headroom": 0} if any(isinstance(k, int) and v < 2**30 for k, v in max_memory.items()) else {}
        result = plan_fn(inventory, budget, strategy="auto", dtype=torch.bfloat16, **extra)
        return dict(result.device_map), {"inventory_s": inventory_s}

    return init_empty_weights, plan


def bytes_per_device(model, device_map: dict) -> dict[str, int]:
    """Bytes (bf16 for floating tensors) each device holds under `device_map`, each tensor counted once."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        key = name
        while key not in device_map:
            if not key:
                raise KeyError(f"{name} is not covered by the device map")
            key = key.rpartition(".")[0]
        width = 2 if tensor.is_floating_point() else tensor.element_size()
        device = str(device_map[key])
        out[device] = out.get(device, 0) + tensor.numel() * width
    return out


def _alarm(seconds: float):
    def fire(signum, frame):
        raise BenchTimeout(f"> {seconds:.0f} s")

    signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def measure(spec: dict) -> dict:
    init_empty_weights, plan = _planner(spec["method"])
    t0 = time.perf_counter()
    model, no_split = _build(spec, init_empty_weights)
    build_s = time.perf_counter() - t0
    max_memory = _max_memory(spec, model)
    _alarm(spec["cap_s"])
    try:
        t1 = time.perf_counter()
        device_map, facts = plan(model, max_memory, no_split)
        plan_s = time.perf_counter() - t1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return {"build_s": build_s, "plan_s": plan_s, "modules": sum(1 for _ in model.modules()),
            "map_entries": len(device_map), "bytes": bytes_per_device(model, device_map), **facts}


# ---------------------------------------------------------------- parent side


def specs(ctx) -> list[dict]:
    # --quick: one model and the budget that uses every kind of device (GPU, cpu, disk).
    cases = [{"bench": "plan", "model": m, "budget": b, "cap_s": ctx.plan_timeout}
             for m in (("llama-3-70b",) if ctx.quick else MODELS) for b in (("2x24",) if ctx.quick else BUDGETS)]
    n = 2_000 if ctx.quick else 200_000
    # One round only: building 200,000 modules takes about a minute per run, and the figure that matters
    # here is the order of magnitude (seconds, or minutes and a cap).
    cases.append({"bench": "plan", "model": f"synthetic-{n // 1000}k", "modules": n, "budget": "synthetic",
                  "cap_s": ctx.plan_timeout, "_repeats": 1})
    return interleave(cases, METHODS, ctx.repeats)


def _devices_cell(b: dict[str, int], n_gpus: int, unit: int) -> str:
    """'GPU0 21.1 · GPU1 23.9 · cpu 60.6 GiB', or for many GPUs '8 of 8 GPUs, 9.9–17.5 · cpu 0.0 GiB'."""
    name = "GiB" if unit == GiB else "MiB"
    fmt = lambda n: f"{n / unit:.1f}"  # noqa: E731
    gpus = [b.get(str(i), 0) for i in range(n_gpus)]
    if n_gpus <= 2:
        parts = [f"GPU{i} {fmt(v)}" for i, v in enumerate(gpus)]
    else:
        used = [v for v in gpus if v] or [0]
        parts = [f"{sum(1 for v in gpus if v)} of {n_gpus} GPUs, {fmt(min(used))}–{fmt(max(used))}"]
    parts += [f"{k} {fmt(b[k])}" for k in ("cpu", "disk") if b.get(k)]
    return " · ".join(parts) + f" {name}"


def _ratio(a, b, what: str) -> str | None:
    return f"{a / b:.2f} ({what})" if a is not None and b else None


def summarize(ctx, results: list[dict]) -> dict:
    by: dict[tuple, list[dict]] = {}
    for r in results:
        s = r["spec"]
        by.setdefault((s["model"], s["budget"], s["method"]), []).append(r)
    rows = []
    for (model, budget) in dict.fromkeys((s["model"], s["budget"]) for s in (r["spec"] for r in results)):
        label = f"{model}, {BUDGETS[budget][1] if budget in BUDGETS else '2 GPUs of 1/3 model + CPU'}"
        runs = {m: by.get((model, budget, m), []) for m in METHODS}
        times = {m: median_of(rs, "plan_s") for m, rs in runs.items()}
        cells = [(f"{times[m]:.3f} s" if times[m] is not None else None) if status_of(rs) == "ok" else status_of(rs)
                 for m, rs in runs.items()]
        ok_any = next((r for rs in runs.values() for r in rs if r["status"] == "ok"), None)
        mods = f" ({ok_any['modules']:,} modules)" if ok_any else ""
        ratios = [_ratio(times["bigload-compat"], times["accelerate"], "compat ÷ accelerate"),
                  _ratio(times["bigload-plan"], times["accelerate-balanced"], "plan ÷ balanced")]
        rows.append([f"plan time — {label}{mods}", *cells, "; ".join(r for r in ratios if r) or None])
        n_gpus = sum(1 for k in BUDGETS[budget][0] if isinstance(k, int)) if budget in BUDGETS else 2
        unit = GiB if budget in BUDGETS else 2**20
        mapcells = []
        for m, rs in runs.items():
            ok = [r for r in rs if r["status"] == "ok"]
            mapcells.append(_devices_cell(ok[0]["bytes"], n_gpus, unit) if ok else status_of(rs))
        rows.append([f"bytes per device — {label}", *mapcells, None])
    notes = [
        "Times are the planning call only (for bigload plan: inventory + plan; inventory alone is in results.json); "
        "building the meta model is not counted.",
        "Bytes per device recomputed from each map at bf16; 'k of 8 GPUs, a–b' gives how many GPUs hold "
        "anything and the least and most loaded of those.",
        f"Runs are capped at {ctx.plan_timeout:.0f} s (SIGALRM in the worker); a capped run shows '> N s'.",
        "Every budget also allows an unlimited disk (accelerate's implicit default; given to `bigload.plan.planner` "
        "explicitly as `\"disk\": 2**62`). The synthetic model has no no-split classes. bigload plan keeps its default GPU headroom (max(1 GiB, 5 %) per GPU, and the CPU pays the GPU slots' pinned staging), which is why its GPUs hold less than accelerate's; the synthetic model's GPUs of a few MiB are below that headroom, so there it is given `headroom=0`.",
    ]
    notes += failure_notes(results)
    header = ("figure", *(COLUMNS[m] for m in METHODS), "ratio")
    return {"title": "Planning a device map", "header": header, "rows": rows, "notes": notes, "raw": results}
