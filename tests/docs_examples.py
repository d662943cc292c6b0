"""The examples of a Markdown page, run as a reader runs them, with what they print compared to the page.

The conventions pages follow (`docs/README.md` states them for writers):
- Every fence has a tag. `python`, `console` and `bash` are examples; `text` and `json` are output or data.
- `<!-- not run: REASON -->` on the line right before a fence leaves that example out; REASON says why (it
  needs a GPU, torchrun, a package install...). Every other example runs.
- `python`: a page's examples run in page order in one namespace, in the page's scratch folder, which holds
  the demo model as `demo-model`. The `text` fence that comes next (with only prose between) is what the
  example prints.
- `console`: each `$ ` line is a command, and the lines up to the next `$ ` line are what it prints: its
  stdout, or its stderr when the shown output holds bigload's error line (`bigload: error: ...`, or
  argparse's `bigload plan: error: ...`): it must then exit non-zero, otherwise with 0. `bash`: a command
  per line (a trailing `\\` continues it), nothing shown. Commands that run: `bigload ...` and
  `cd "$(mktemp -d)"` (the scratch folder is already a fresh one).
- Output is compared line by line, exactly, except for times and speeds (`0.48 s`, `15 ms`, `1.7 tokens/s`,
  which vary from run to run); the text generated after the prompt `Once upon a time` (random weights:
  the last bits of a logit, so the tokens, may differ between CPUs): the rest of a line starting with the
  prompt, or the line after a line holding only the prompt; and a line `...`, which stands for any lines.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from bigload.cli.commands import main

EXAMPLE_TAGS = ("python", "console", "bash")
OUTPUT_TAGS = ("text", "json")
PROMPT = "Once upon a time"
SCRATCH_CD = 'cd "$(mktemp -d)"'
_TIMING = re.compile(r"\b\d+(?:\.\d+)? (?:s|ms|tokens/s)\b")
_NOT_RUN = re.compile(r"^<!-- not run: (.+?) -->$")
_FENCE = re.compile(r"^```(\S*)\s*$")
_ERROR = re.compile(r"^bigload(?: [a-z]+)?: error: ")


@dataclass(frozen=True)
class Fence:
    """One fenced block of a page."""

    page: Path
    line: int  # 1-based line of the opening fence
    tag: str
    body: str
    not_run: str | None  # the reason given in a `<!-- not run: ... -->` comment right before it
    prose_before: str  # the text between the previous fence and this one

    @property
    def where(self) -> str:
        return f"{self.page.name}:{self.line}"


def fences(page: Path) -> list[Fence]:
    """The page's fenced blocks, in order."""
    lines = page.read_text().splitlines()
    found: list[Fence] = []
    prose: list[str] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            prose.append(lines[i])
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page.name}:{i + 1}: a fence that is never closed")
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        reason = _NOT_RUN.match(before)
        found.append(Fence(page, i + 1, opening.group(1), "\n".join(lines[i + 1:end]),
                           reason.group(1).strip() if reason else None, "\n".join(prose)))
        prose = []
        i = end + 1
    return found


def check_tags(page: Path) -> None:
    """Every fence is tagged with a kind the runner knows, so no example escapes it unseen."""
    for fence in fences(page):
        assert fence.tag in EXAMPLE_TAGS + OUTPUT_TAGS, (
            f"{fence.where}: fence tagged {fence.tag!r}; tag it one of {EXAMPLE_TAGS + OUTPUT_TAGS}")
        if fence.not_run is not None:
            assert fence.tag in EXAMPLE_TAGS, f"{fence.where}: 'not run' marks only examples"


def _pattern(shown: str) -> re.Pattern[str]:
    """`shown` as a regular expression over normalized printed lines (see the module docstring)."""
    parts: list[str] = []
    free_next = False
    for line in _normalize(shown).splitlines():
        if free_next:
            parts.append(r"[^\n]*\n")
            free_next = False
        elif line == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        elif line == PROMPT:
            parts.append(re.escape(line) + r"\n")
            free_next = True
        elif line.startswith(PROMPT):
            parts.append(re.escape(PROMPT) + r"[^\n]*\n")
        else:
            parts.append(re.escape(line) + r"\n")
    return re.compile("".join(parts))


def _normalize(text: str) -> str:
    lines = [_TIMING.sub("<time>", line.rstrip()) for line in text.strip("\n").splitlines()]
    return "\n".join(lines) + "\n"


def assert_output(where: str, printed: str, shown: str) -> None:
    """`printed` is what the page shows, by the rules of the module docstring."""
    if _pattern(shown).fullmatch(_normalize(printed)):
        return
    diff = "\n".join(difflib.unified_diff(shown.strip("\n").splitlines(), printed.strip("\n").splitlines(),
                                          "shown in the page", "printed", lineterm=""))
    raise AssertionError(f"{where}: the output differs from the page's\n{diff}")


def _commands(fence: Fence) -> list[tuple[str, str | None]]:
    """(command, shown output or None) of a console or bash fence."""
    if fence.tag == "bash":
        joined = fence.body.replace("\\\n", " ")
        return [(line.strip(), None) for line in joined.splitlines() if line.strip()]
    commands: list[tuple[str, list[str]]] = []
    for line in fence.body.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:].strip(), []))
        else:
            assert commands, f"{fence.where}: console output before any `$ ` command"
            commands[-1][1].append(line)
    return [(command, "\n".join(out) if any(s.strip() for s in out) else None) for command, out in commands]


def run_command(where: str, command: str, shown: str | None) -> None:
    """One shell command of a page: the scratch-folder `cd`, or `bigload ...` through the CLI's `main`."""
    if command == SCRATCH_CD:
        return
    argv = shlex.split(command)
    assert argv[0] == "bigload", (
        f"{where}: `{command}` cannot run in the docs test; mark its fence <!-- not run: REASON -->")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv[1:])
        except SystemExit as exit_:  # argparse's errors exit
            code = exit_.code if isinstance(exit_.code, int) else 1
    fails = shown is not None and any(_ERROR.match(line) for line in shown.splitlines())
    assert (code != 0) == fails, f"{where}: `{command}` exited {code}\n{err.getvalue()}"
    if shown is not None:
        assert_output(f"{where} `{command}`", err.getvalue() if fails else out.getvalue(), shown)


def run_python(fence: Fence, namespace: dict[str, object], shown: str | None) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(fence.body, fence.where, "exec"), namespace)  # noqa: S102 - our own pages
    if shown is not None:
        assert_output(fence.where, out.getvalue(), shown)


def run_page(page: Path) -> list[str]:
    """Run every example of `page` in the current folder; return the reasons of those left out."""
    check_tags(page)
    blocks = fences(page)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    skipped: list[str] = []
    for i, fence in enumerate(blocks):
        if fence.tag not in EXAMPLE_TAGS:
            continue
        if fence.not_run is not None:
            skipped.append(f"{fence.where}: {fence.not_run}")
            continue
        if fence.tag == "python":
            following = blocks[i + 1] if i + 1 < len(blocks) else None
            shown = following.body if following is not None and following.tag == "text" else None
            run_python(fence, namespace, shown)
        else:
            for command, shown in _commands(fence):
                run_command(fence.where, command, shown)
    return skipped
