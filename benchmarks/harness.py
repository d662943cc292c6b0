"""Running measured runs in fresh processes, interleaved, and summarizing them.

Each measured run is a `spec` (a JSON-able dict naming its bench, method and case) executed by
`python -m benchmarks.worker` in a new process, so no run inherits another's allocator state, imports or
page mappings. Runs of the competing methods are interleaved round-robin (the order rotates every repeat), so
a machine that slows down during the invocation slows all methods alike; figures are medians over repeats.

A run's result is a dict with "status": "ok", "unavailable" (the method's import failed: its library or the
bigload module is missing), "error" (it raised; "reason" holds the message) or "timeout".
In --quick mode all of a bench's specs share one worker process: the point there is that the code runs,
not what it measures.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = ["RESULT_PREFIX", "BenchTimeout", "Unavailable", "failure_notes", "interleave", "median_of", "need", "run_specs", "worker_env"]

RESULT_PREFIX = "BENCH-RESULT "
ROOT = Path(__file__).resolve().parent.parent


class BenchTimeout(Exception):
    """A run hit its own cap (e.g. a planner stopped after N seconds); reported as "> N s"."""


class Unavailable(Exception):
    """The method cannot run here: its library, or the bigload module it needs, does not import."""


def need(module: str, *names: str):
    """Import `module` and return it (or its attributes `names`), raising Unavailable if that fails."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"{module} does not import ({exc})") from exc
    if not names:
        return mod
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise Unavailable(f"{module} has no {', '.join(missing)}")
    values = tuple(getattr(mod, n) for n in names)
    return values[0] if len(values) == 1 else values


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
    )
    return env


def _run_worker(specs: list[dict], timeout: float | None) -> list[dict]:
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker"],
            input=json.dumps(specs),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=worker_env(),
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return [{"status": "timeout", "reason": f"> {timeout:.0f} s", "timeout_s": timeout} for _ in specs]
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if len(results) < len(specs):
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        reason = f"worker exited with {proc.returncode} after {time.perf_counter() - started:.1f} s: {tail}"
        results += [{"status": "error", "reason": reason} for _ in specs[len(results):]]
    return results


def run_specs(
    specs: Sequence[dict],
    *,
    isolated: bool = True,
    timeout: float | None = None,
    before: Callable[[dict], dict] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Run each spec (in its own process when `isolated`); `before(spec)` prepares the machine (e.g. evicts
    the page cache) and returns facts merged into the result. Returns results in spec order, each holding
    its spec under "spec"."""
    results: list[dict] = []
    if isolated:
        timed_out: dict[str, dict] = {}  # a run that hit its cap once is not re-run in later rounds
        for i, spec in enumerate(specs, 1):
            key = json.dumps({k: v for k, v in spec.items() if k != "repeat"}, sort_keys=True)
            if key in timed_out:
                result = {**timed_out[key], "skipped": True, "spec": spec, "prep": {}}
                log(f"  [{i}/{len(specs)}] {_label(spec)}: skipped, timed out in an earlier round")
                results.append(result)
                continue
            prep = before(spec) if before else {}
            (result,) = _run_worker([spec], timeout)
            if result["status"] == "timeout":
                timed_out[key] = {"status": "timeout", "reason": result.get("reason", "")}
            result.update(spec=spec, prep=prep)
            log(f"  [{i}/{len(specs)}] {_label(spec)}: {_short(result)}")
            results.append(result)
        return results
    for spec in specs:  # quick mode: prepare all first, then one process runs them in order
        spec.setdefault("_prep", before(spec) if before else {})
    shared = _run_worker(list(specs), None if timeout is None else timeout * len(specs))
    for spec, result in zip(specs, shared):
        result.update(spec=spec, prep=spec.pop("_prep"))
        log(f"  {_label(spec)}: {_short(result)}")
        results.append(result)
    return results


def _label(spec: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in spec.items() if k not in ("bench", "folder", "work") and not k.startswith("_"))


def _short(result: dict) -> str:
    if result["status"] != "ok":
        return f"{result['status']}: {result.get('reason', '')}"[:160]
    keys = [k for k in ("load_s", "ready_s", "decode_tok_s", "plan_s", "seconds") if k in result]
    return ", ".join(f"{k}={result[k]:.3g}" for k in keys) or "ok"


def interleave(cases: Iterable[dict], methods: Sequence[str], repeats: int) -> list[dict]:
    """Specs for `repeats` rounds; in each round every case runs every method, the method order rotated by
    the round number so that no method always runs first (after a cache warm-up) or last. A case may
    name methods to leave out (`_skip`) and fewer rounds for itself (`_repeats`)."""
    cases = list(cases)
    specs = []
    for r in range(repeats):
        order = list(methods[r % len(methods):]) + list(methods[: r % len(methods)])
        for case in cases:
            if r >= case.get("_repeats", repeats):
                continue
            for method in order:
                if method in case.get("_skip", ()):
                    continue
                spec = {k: v for k, v in case.items() if k not in ("_skip", "_repeats")}
                specs.append({**spec, "method": method, "repeat": r})
    return specs


def median_of(results: Iterable[dict], key: str) -> float | None:
    values = [r[key] for r in results if r.get("status") == "ok" and r.get(key) is not None]
    return statistics.median(values) if values else None


def status_of(results: Sequence[dict]) -> str:
    """"ok" if any run succeeded, else a short cell for the table: "unavailable", "error", "> N s"."""
    if any(r.get("status") == "ok" for r in results):
        return "ok"
    if not results:
        return "not run"
    r = results[0]
    return r.get("reason", "timeout") if r["status"] == "timeout" else r["status"]


def failure_notes(results: Iterable[dict]) -> list[str]:
    """One line per distinct (method, status, reason) among runs that did not succeed."""
    seen: dict[tuple[str, str, str], int] = {}
    for r in results:
        if r.get("status") not in ("ok", None):
            key = (r["spec"].get("method", "?"), r["status"], r.get("reason", ""))
            seen[key] = seen.get(key, 0) + 1
    return [f"{method}: {status} in {n} run(s) — {reason}" for (method, status, reason), n in seen.items()]
