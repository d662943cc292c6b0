"""The README's commands and code, run literally in a scratch folder, in the order a newcomer runs them."""

import re
import shlex
from pathlib import Path

import pytest

from bigload.cli.commands import main

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


def _expected_outputs() -> list[str]:
    """The ```text block that follows each ```python block: what the snippet prints, pasted."""
    return re.findall(r"```python\n.*?```\n[^`]*?```text\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_commands_and_code_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # what the README's `cd "$(mktemp -d)"` does
    (console,) = _blocks("console")
    lines = console.splitlines()
    assert lines[0] == '$ cd "$(mktemp -d)"'
    commands = [line[2:] for line in lines if line.startswith("$ bigload ")]
    assert [c.split()[1] for c in commands] == ["demo", "plan", "plan", "inspect", "generate"]
    assert len(commands) == len(lines) - 1
    for command in commands:
        code = main(shlex.split(command)[1:])
        out = capsys.readouterr()
        assert code == 0, f"{command}\n{out.err}"
    assert (tmp_path / "plan.json").is_file()

    snippets = _blocks("python")
    expected = _expected_outputs()
    assert len(snippets) == len(expected) == 2
    for snippet, pasted in zip(snippets, expected):
        namespace: dict[str, object] = {}
        exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
        printed = capsys.readouterr().out.strip().splitlines()
        pasted_lines = pasted.strip().splitlines()
        # The generated text of random weights is gibberish whose last bits may differ across CPUs: the
        # pasted line is checked up to the prompt; every other line must be exactly what was printed.
        text_lines = [i for i, line in enumerate(pasted_lines) if line.startswith("Once upon a time")]
        for i in text_lines:
            assert printed[i].startswith("Once upon a time")
            printed[i] = pasted_lines[i]
        assert printed == pasted_lines


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


def test_readme_pasted_error_is_what_the_cli_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """The does-not-fit error pasted in the README is today's, spelled with the CLI's flags."""
    command = "bigload plan llama-3-70b --max-memory 0=24GiB,cpu=32GiB"
    pasted = README.read_text().split(f"```\n$ {command}\n", 1)[1].split("```", 1)[0]
    assert main(shlex.split(command)[1:]) == 2
    assert capsys.readouterr().err.strip() == pasted.strip()
    assert "--offload-folder DIR" in pasted


def test_readme_commands_leave_no_files_in_the_clone() -> None:
    """Whatever the README's commands write when run in the clone itself is ignored by git."""
    ignored = (README.parent / ".gitignore").read_text().splitlines()
    for output in ("/demo-model/", "/offload/", "/plan.json"):
        assert output in ignored


def test_readme_torch_line_says_how_to_get_the_cpu_build() -> None:
    text = README.read_text()
    assert "pip install -c constraints.txt torch==2.13.0" in text  # the one-command setup, unchanged
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert "first gets the CPU build" not in text
