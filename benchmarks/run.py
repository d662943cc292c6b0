"""Run every benchmark and write RESULTS.md and results.json.

    python -m benchmarks                  # full sizes: large (7 GB) and small (1 GB) checkpoints
    python -m benchmarks --quick --out /tmp/bench   # tiny sizes, < 1 min: checks that everything runs
    python -m benchmarks --only beyond_ram --repeats 2   # RAM smaller than the model (memory cgroup; root)

Speed and memory claims in the README and docs/ come only from the RESULTS.md this writes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import report
from benchmarks.harness import run_specs
from benchmarks.limits import measure_limits
from benchmarks.make_checkpoint import make_checkpoint

HERE = Path(__file__).resolve().parent
BENCHES = ("load", "offload", "plan", "pipeline", "beyond_ram")  # beyond_ram last: --quick runs all in one process, and it joins a cgroup


@dataclass
class Context:
    """What every bench's `run(ctx)` receives."""

    work: Path
    quick: bool
    repeats: int
    timeout: float
    plan_timeout: float
    limits: dict = field(default_factory=dict)
    load_preset: str = "large"
    offload_preset: str = "small"
    beyond_preset: str = "large"

    _made: dict[str, Path] = field(default_factory=dict)

    def checkpoint(self, preset: str) -> Path:
        """The folder of `preset` under `work`, written on first use (kept between invocations)."""
        if preset not in self._made:
            folder = self.work / f"ckpt-{preset}"
            started = time.perf_counter()
            make_checkpoint(preset, folder)
            self.log(f"checkpoint {preset}: {folder} ({time.perf_counter() - started:.1f} s)")
            self._made[preset] = folder
        return self._made[preset]

    def log(self, message: str) -> None:
        print(message, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round, runs sharing processes")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for RESULTS.md and results.json")
    parser.add_argument("--work", type=Path, default=HERE / "_work", help="checkpoints and scratch files")
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    parser.add_argument("--repeats", type=int, default=None, help="rounds of interleaved runs (default 3; quick 1)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before one run is abandoned")
    parser.add_argument("--plan-timeout", type=float, default=None,
                        help="seconds before one planning run is reported as '> N s' (default 300; quick 20)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    ctx = Context(
        work=args.work.resolve(),
        quick=args.quick,
        repeats=args.repeats or (1 if args.quick else 3),
        timeout=args.timeout or (120 if args.quick else 900),
        plan_timeout=args.plan_timeout or (20 if args.quick else 300),
        load_preset="tiny" if args.quick else "large",
        offload_preset="tiny" if args.quick else "small",
        beyond_preset="tiny" if args.quick else "large",
    )
    ctx.limits = measure_limits(ctx.work, size=(64 if args.quick else 2048) * 2**20, repeats=1 if args.quick else 3,
                                log=ctx.log)
    modules = {name: importlib.import_module(f"benchmarks.bench_{name}") for name in args.only}
    planned = {name: mod.specs(ctx) for name, mod in modules.items()}
    prepare = {name: mod.before(ctx) if hasattr(mod, "before") else None for name, mod in modules.items()}
    results: dict[str, list[dict]] = {}
    if ctx.quick:
        # One process for every run: the imports dominate at tiny sizes, and nothing here is a measurement.
        specs = [dict(s, _bench=name) for name, ss in planned.items() for s in ss]
        ctx.log(f"quick: {len(specs)} runs in one worker process")
        done = run_specs(specs, isolated=False, timeout=ctx.timeout,
                         before=lambda spec: (prepare[spec["bench"]] or (lambda s: {}))(spec), log=ctx.log)
        for r in done:
            results.setdefault(r["spec"].pop("_bench"), []).append(r)
    else:
        for name, specs in planned.items():
            bench_started = time.perf_counter()
            ctx.log(f"{name}: {len(specs)} runs, one process each")
            results[name] = run_specs(specs, isolated=True, timeout=ctx.timeout, before=prepare[name], log=ctx.log)
            ctx.log(f"{name}: done in {time.perf_counter() - bench_started:.0f} s")
    command = ("python -m benchmarks " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))).strip()
    measured = {"date": report.now(), "command": command, "versions": report.versions()}
    sections = [dict(modules[name].summarize(ctx, results.get(name, [])), bench=name, measured=measured)
                for name in args.only]
    sections = _with_earlier_sections(args.out / "results.json", sections, quick=args.quick)
    report.write(args.out, command=command, info=report.machine(), sections=sections, limits=ctx.limits,
                 elapsed=time.perf_counter() - started, quick=args.quick)
    ctx.log(f"wrote {args.out / 'RESULTS.md'} and results.json in {time.perf_counter() - started:.0f} s")


def _with_earlier_sections(previous: Path, sections: list[dict], *, quick: bool) -> list[dict]:
    """`sections`, plus the sections of benches this run skipped (`--only`) from an earlier full run in the
    same folder, in bench order; each keeps the date and command that measured it."""
    if quick or not previous.is_file():
        return sections
    earlier = json.loads(previous.read_text())
    if earlier.get("quick"):
        return sections
    ran = {section["bench"] for section in sections}
    kept = [dict(section, measured=section.get("measured") or {"date": earlier["date"], "command": earlier["command"]})
            for section in earlier["sections"] if section.get("bench") not in ran and section.get("bench") in BENCHES]
    return sorted(sections + kept, key=lambda section: BENCHES.index(section["bench"]))


if __name__ == "__main__":
    main()
