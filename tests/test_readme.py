"""The README's commands and code, run literally in a scratch folder, in the order a newcomer runs them."""

import re
import shlex
from pathlib import Path

import pytest

from bigload.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_commands_and_code_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (console,) = _blocks("console")
    commands = [line[2:] for line in console.splitlines() if line.startswith("$ bigload ")]
    assert [c.split()[1] for c in commands] == ["demo", "plan", "plan", "inspect", "generate"]
    for command in commands:
        code = main(shlex.split(command)[1:])
        out = capsys.readouterr()
        assert code == 0, f"{command}\n{out.err}"
    assert (tmp_path / "plan.json").is_file()

    snippets = _blocks("python")
    assert len(snippets) == 2
    for snippet in snippets:
        namespace: dict[str, object] = {}
        exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    printed = capsys.readouterr().out
    assert "'disk'" in printed  # the first snippet's hf_device_map offloads to disk
    assert "Once upon a time" in printed


def test_readme_test_command_is_the_one_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    command = "python -m pytest -q --durations=15"
    assert command in README.read_text()
    assert command in ci


def test_readme_pasted_plan_output_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    """The plan table pasted in the README is what the command prints today."""
    text = README.read_text()
    command = "bigload plan llama-3-70b --max-memory 0=24GiB,1=24GiB,cpu=64GiB,disk=500GiB --context-length 8192"
    pasted = text.split(f"```\n$ {command}\n", 1)[1].split("```", 1)[0]
    assert main(shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out.strip() == pasted.strip()


def test_readme_measured_results_are_rows_of_the_committed_benchmark_run() -> None:
    """Every table row under 'Measured against accelerate' is a row of benchmarks/RESULTS.md, verbatim."""
    section = README.read_text().split("## Measured against accelerate\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    assert len(rows) >= 6
    results = (README.parent / "benchmarks" / "RESULTS.md").read_text()
    assert "Quick mode" not in results  # the committed file is a full run
    result_lines = set(results.splitlines())
    assert [row for row in rows if row not in result_lines] == []
    assert "python -m benchmarks" in section  # the command that reproduces them
