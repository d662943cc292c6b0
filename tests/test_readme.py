"""The README's commands and code, run literally in a scratch folder, in the order a newcomer runs them
(conventions: `docs_examples`)."""

import re
from pathlib import Path

import pytest

from docs_examples import EXAMPLE_TAGS, fences, run_page

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SETUP = ('python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt torch==2.13.0 && '
         'pip install -c constraints.txt -e ".[hf]" && bigload demo')
TEST_COMMAND = "python -m pytest -q --durations=15"


def test_readme_commands_and_code_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # what the README's `cd "$(mktemp -d)"` does
    skipped = run_page(README)
    # Left out: only the set-up and test commands, which `.ci/run` runs on a fresh machine.
    assert len(skipped) == 3, skipped
    ran = [f for f in fences(README) if f.tag in EXAMPLE_TAGS and f.not_run is None]
    commands = [line[2:] for f in ran if f.tag == "console" for line in f.body.splitlines() if line.startswith("$ ")]
    assert [c.split()[:2] for c in commands] == [["cd", '"$(mktemp'], ["bigload", "demo"], ["bigload", "generate"],
                                                 ["bigload", "plan"]]
    assert [f.tag for f in ran] == ["console", "python", "console", "console"]
    assert (tmp_path / "demo-model" / "config.json").is_file()  # `bigload demo --dir demo-model` wrote it


def test_readme_set_up_and_test_commands_are_the_ones_ci_runs() -> None:
    text = README.read_text()
    blocks = {f.body for f in fences(README) if f.tag == "bash"}
    assert SETUP in blocks
    assert f'pip install -c constraints.txt -e ".[test]"\n{TEST_COMMAND}' in blocks
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci and 'pip install --quiet -c constraints.txt "torch==2.13.0"' in ci
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert "first gets the CPU build" not in text


def test_readme_measured_results_are_rows_of_the_committed_benchmark_run() -> None:
    """Every table row under 'Measured against accelerate' is a row of benchmarks/RESULTS.md, verbatim; every
    other figure of the section is in RESULTS.md too, and so is the command that measured them."""
    section = README.read_text().split("## Measured against accelerate\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    assert len(rows) >= 6
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert "Quick mode" not in results  # the committed file is a full run
    result_lines = set(results.splitlines())
    assert [row for row in rows if row not in result_lines] == []
    prose = "\n".join(line for line in section.splitlines() if not line.startswith("|"))
    figures = re.findall(r"\b\d+\.\d+ s\b", prose)
    assert len(figures) >= 6
    assert [figure for figure in figures if figure not in results] == []
    command = "python -m benchmarks --only load offload beyond_ram --repeats 3 --timeout 300 --work /tmp/bwork"
    assert command in " ".join(section.split()) and command in results


def test_readme_commands_leave_no_files_in_the_clone() -> None:
    """Whatever the README's commands write when run in the clone itself is ignored by git."""
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    for output in ("/demo-model/", "/offload/", "/plan.json"):
        assert output in ignored


def test_readme_stays_a_five_minute_read() -> None:
    """The README says what bigload is and shows it; everything else lives in docs/ (linked from it)."""
    text = README.read_text()
    prose = re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M)  # examples and their output are skimmed
    assert len(prose.split()) <= 1300  # about five minutes at a reading pace of 250 words a minute
    assert "docs/README.md" in text
