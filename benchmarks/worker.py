"""Executes measured runs: reads a JSON list of specs on stdin, prints one result line per spec.

Started by `harness.run_specs` in a fresh process; not meant to be run by hand (but it can be, to debug one
run: `echo '[{"bench": "load", ...}]' | python -m benchmarks.worker`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from benchmarks.harness import RESULT_PREFIX, BenchTimeout, Unavailable


def _bench(name: str):
    if name == "load":
        from benchmarks import bench_load as mod
    elif name == "offload":
        from benchmarks import bench_offload as mod
    elif name == "plan":
        from benchmarks import bench_plan as mod
    elif name == "pipeline":
        from benchmarks import bench_pipeline as mod
    elif name == "beyond_ram":
        from benchmarks import bench_beyond_ram as mod
    else:
        raise ValueError(f"unknown bench {name!r}")
    return mod


def run_one(spec: dict) -> dict:
    started = time.perf_counter()
    try:
        result = _bench(spec["bench"]).measure(spec)
        return {"status": "ok", **result, "run_s": time.perf_counter() - started}
    except Unavailable as exc:
        return {"status": "unavailable", "reason": str(exc)}
    except BenchTimeout as exc:
        return {"status": "timeout", "reason": str(exc)}
    except Exception as exc:  # a failing method is a result to report, not a crash of the benchmark
        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{os.path.basename(last.filename)}:{last.lineno}"
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc} ({where})"[:600],
                "traceback": traceback.format_exc()[-4000:]}


def main() -> None:
    specs = json.loads(sys.stdin.read())
    for spec in specs:
        result = run_one(spec)
        print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
