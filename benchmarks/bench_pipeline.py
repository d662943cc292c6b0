"""A model split over two `torchrun` ranks on this machine versus the same model in one process.

Model: the demo's random-weight Llama (`bigload.cli.demo`; `medium`: 16 blocks, hidden 1024, bf16, ~0.9 GB;
`small` in quick mode), greedy decoding of a fixed prompt. Both methods run the command a user runs, in a
fresh process tree, and report bigload's own figures (`bigload generate --json`):

- 1 process: `bigload generate MODEL --json` with every core for torch (`OMP_NUM_THREADS=<cores>`);
- 2 ranks: `torchrun --nnodes 1 --nproc-per-node 2 --no-python bigload generate MODEL --json`, the cores split
  between the ranks (`OMP_NUM_THREADS=<cores / 2>` each), hidden states over gloo on the loopback.

On one machine two ranks cannot beat one process at decoding (each token crosses the ring and the ranks run
one after the other); what this measures is the price of the pipeline: wire time per token, and how the load
is shared (each rank reads only its blocks). Ratios are 2 ranks ÷ 1 process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import failure_notes, interleave, median_of, status_of, worker_env

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2
METHODS = ("one-process", "two-ranks")
COLUMNS = ("1 process", "2 ranks", "ratio 2r/1p")


def _command(spec: dict, port: int) -> list[str]:
    args = ["generate", spec["folder"], "--prompt", PROMPT, "--max-new-tokens", str(spec["new_tokens"]), "--json"]
    if spec["method"] == "one-process":
        return [sys.executable, "-m", "bigload", *args]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
            str(port), "--no-python", "bigload", *args]


def measure(spec: dict) -> dict:
    import socket

    cores = os.cpu_count() or 1
    threads = cores if spec["method"] == "one-process" else max(1, cores // 2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**worker_env(), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(_command(spec, port), capture_output=True, text=True, env=env, timeout=spec["timeout"])
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    ranks = report.get("ranks", [])
    return {
        "tokens": report["token_ids"],
        "load_s": report["load_seconds"],
        "first_token_s": report["first_token_seconds"],
        "decode_tps": report["decode_tokens_per_second"],
        "comm_ms_per_token": report["comm_seconds_per_token"] * 1e3 if ranks else None,
        "rank_load_s": [r["seconds"] for r in ranks],
        "rank_bytes": [r["bytes_read"] for r in ranks],
        "threads": threads,
    }


def specs(ctx) -> list[dict]:
    from bigload.cli.demo import write_demo_model

    size = "small" if ctx.quick else "medium"
    folder = write_demo_model(ctx.work / f"demo-{size}", size)
    base = {"bench": "pipeline", "folder": str(folder), "size": size, "new_tokens": 8 if ctx.quick else 32,
            "timeout": ctx.timeout}
    return interleave([base], METHODS, ctx.repeats)


def summarize(ctx, results: list[dict]) -> dict:
    one = [r for r in results if r["spec"]["method"] == "one-process"]
    two = [r for r in results if r["spec"]["method"] == "two-ranks"]

    def row(label: str, key: str, fmt: str) -> list[str]:
        a, b = median_of(one, key), median_of(two, key)
        cells = [fmt.format(v) if v is not None else status_of(rs) for v, rs in ((a, one), (b, two))]
        return [label, *cells, f"{b / a:.2f}" if a and b else "—"]

    rank_rows = []
    for i in range(2):
        loads = [r["rank_load_s"][i] for r in two if r["status"] == "ok" and len(r["rank_load_s"]) > i]
        gib = [r["rank_bytes"][i] / 2**30 for r in two if r["status"] == "ok" and len(r["rank_bytes"]) > i]
        if loads:
            rank_rows.append([f"rank {i}: loader time, bytes read", "—",
                              f"{sorted(loads)[len(loads) // 2]:.2f} s, {gib[0]:.2f} GiB", "—"])
    same = [r["tokens"] == one[0]["tokens"] for r in two if r["status"] == "ok"] if one and one[0]["status"] == "ok" else []
    rows = [
        row("load (s)", "load_s", "{:.2f}"),
        *rank_rows,
        row("first token (s)", "first_token_s", "{:.3f}"),
        row("decode (tokens/s)", "decode_tps", "{:.1f}"),
        ["communication per token (ms)", "—", _median_text(two, "comm_ms_per_token"), "—"],
        ["tokens identical to 1 process", "—", ("yes" if all(same) else "NO") if same else status_of(two), "—"],
    ]
    size = results[0]["spec"]["size"] if results else "?"
    return {
        "title": "Across ranks (torchrun, one machine)",
        "header": ("figure", *COLUMNS),
        "rows": rows,
        "notes": [f"demo model `{size}`; 1 process: all cores for torch; 2 ranks: cores split between them, "
                  "gloo over the loopback; `bigload generate --json` figures; median of the rounds.",
                  "load: 1 process, `from_pretrained` (meta model, stream, hooks); 2 ranks, rank 0 from the ranks "
                  "agreeing on their inputs (each has built its meta model) to every rank loaded (plans, shard "
                  "selection, stream, hooks); the ranks load at the same time, each only its blocks.",
                  "communication per token: rank 0's time in the ring minus the stages' compute time (both ways, "
                  "all hops).", *failure_notes(results)],
        "raw": results,
    }


def _median_text(results: list[dict], key: str) -> str:
    value = median_of(results, key)
    return f"{value:.2f}" if value is not None else status_of(results)
