"""RESULTS.md and results.json: tables, the machine they were measured on, and the command that made them."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

__all__ = ["machine", "ratio_cell", "render", "rewrite", "write"]

HEADER = ("figure", "bigload", "accelerate", "transformers", "limit", "ratio b/a · b/t")


def ratio_cell(bigload, accelerate, transformers=None, *, floor: float = 0.0) -> str | None:
    """`bigload ÷ accelerate · bigload ÷ transformers` for whichever exist.

    `floor`: below it a figure is noise (a memory peak of a few MiB), and a ratio of noise is not shown.
    """
    parts = []
    for other in (accelerate, transformers):
        if bigload is not None and other and max(bigload, other) >= floor:
            parts.append(f"{bigload / other:.2f}")
        else:
            parts.append("—")
    return None if parts == ["—", "—"] else " · ".join(parts)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version(dist)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """The versions of the libraries a figure depends on; each section of results.json records them, so a
    claim copied from it can say which releases it compares (they move faster than the machine)."""
    import torch

    return {"torch": torch.__version__, **{dist: _version(dist) for dist in
                                          ("transformers", "accelerate", "safetensors", "bigload")}}


def machine() -> dict[str, object]:
    import psutil
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def _cell(value) -> str:
    if value is None:
        return "—"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


ANALYSIS = Path(__file__).resolve().parent / "ANALYSIS.md"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write(out: Path, *, command: str, info: dict, sections: list[dict], limits: dict, elapsed: float,
          quick: bool) -> None:
    """Write results.json and RESULTS.md (rendered from it, with `ANALYSIS.md` appended) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"date": now(), "command": command, "quick": quick, "elapsed_s": elapsed, "machine": info,
               "limits": limits, "sections": sections}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out / "RESULTS.md").write_text(render(payload, analysis=_analysis(quick)))


def rewrite(out: Path) -> None:
    """Render `out`/RESULTS.md again from `out`/results.json (after editing ANALYSIS.md: no re-measuring)."""
    payload = json.loads((out / "results.json").read_text())
    (out / "RESULTS.md").write_text(render(payload, analysis=_analysis(payload["quick"])))


def _analysis(quick: bool) -> str | None:
    # The profiling findings belong to the full run they explain, not to a quick run's placeholder figures.
    return None if quick or not ANALYSIS.is_file() else ANALYSIS.read_text()


def render(payload: dict, *, analysis: str | None = None) -> str:
    """RESULTS.md for a results.json payload; `analysis` (markdown) goes after the tables."""
    command, quick, info = payload["command"], payload["quick"], payload["machine"]
    lines = ["# bigload benchmarks", ""]
    if quick:
        lines += ["**Quick mode: tiny sizes, runs sharing processes. These figures check that the benchmarks run;"
                  " they are not measurements.**", ""]
    lines += [
        f"Measured {payload['date']} with `{command}` ({payload['elapsed_s'] / 60:.1f} min).",
        "",
        "Every figure is a median over runs interleaved round-robin in this one invocation, each run in a fresh "
        "process; `ratio b/a · b/t` is bigload ÷ accelerate and bigload ÷ transformers (below 1: bigload's "
        "figure is lower — better for times and memory, worse for tokens/s). A cell holding `unavailable` or "
        "`error` names why the method could not run. The `limit` column is the bound this machine puts on the "
        "figure (see *Machine limits*).",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "## Machine limits", ""]
    lines += _table(("bound", "value", "how"), payload["limits"].get("rows", []))
    for section in payload["sections"]:
        lines += ["", f"## {section['title']}", ""]
        measured = section.get("measured")
        if measured and (measured["command"] != command or measured.get("versions")):
            with_versions = ", ".join(f"{k} {v}" for k, v in (measured.get("versions") or {}).items())
            lines += [f"Measured {measured['date']} with `{measured['command']}`"
                      + (f" ({with_versions})." if with_versions else "."), ""]
        tables = section.get("tables") or [{"rows": section["rows"], "header": section.get("header")}]
        for i, table in enumerate(tables):
            if table.get("title"):
                lines += [f"### {table['title']}", ""]
            lines += _table(table.get("header") or section.get("header") or HEADER, table["rows"])
            if i < len(tables) - 1:
                lines += [""]
        if section.get("notes"):
            lines += [""] + [f"- {n}" for n in section["notes"]]
    if analysis:
        lines += ["", analysis.strip()]
    lines += ["", "Regenerate: `" + command + "` (see `benchmarks/README.md`).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    rewrite(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
