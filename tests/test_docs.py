"""The pages of docs/: every example runs and prints what the page shows (conventions: `docs_examples`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from docs_examples import EXAMPLE_TAGS, fences, run_page

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Written and kept true by others; they hold diagrams, not examples (checked below).
OWNED_ELSEWHERE = ("architecture.md", "reliability.md")
PAGES = sorted(page.name for page in DOCS.glob("*.md") if page.name not in OWNED_ELSEWHERE)
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)")


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model, written once for every page (`bigload demo --dir demo-model` writes the same)."""
    from bigload.cli.demo import write_demo_model
    from bigload.integrations.hf import without_transformers_progress

    with without_transformers_progress():
        return write_demo_model(tmp_path_factory.mktemp("demo") / "demo-model", "small")


@pytest.mark.parametrize("name", PAGES)
def test_page_examples_run_and_print_what_the_page_shows(name: str, demo_model: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "demo-model").symlink_to(demo_model, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    skipped = run_page(DOCS / name)
    examples = [f for f in fences(DOCS / name) if f.tag in EXAMPLE_TAGS]
    if examples and name != "benchmarks.md":  # its examples take an hour or a GPU
        assert len(skipped) < len(examples), f"{name}: no example runs"


def test_the_index_links_every_page() -> None:
    index = (DOCS / "README.md").read_text()
    linked = {target for target, _ in _LINK.findall(index)}
    missing = [page.name for page in DOCS.glob("*.md") if page.name != "README.md" and page.name not in linked]
    assert missing == []


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{p.name}" for p in sorted(DOCS.glob("*.md")))])
def test_links_between_pages_lead_somewhere(page: str) -> None:
    """A relative link names a file of the repository; a `#fragment` into a page names one of its headings."""
    source = ROOT / page
    for target, fragment in _LINK.findall(source.read_text()):
        if "://" in target:
            continue
        path = (source.parent / target).resolve()
        assert path.exists(), f"{page}: link to {target}, which does not exist"
        if fragment and path.suffix == ".md":
            assert fragment in _anchors(path), f"{page}: no heading '#{fragment}' in {target}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("name", OWNED_ELSEWHERE)
def test_pages_written_elsewhere_hold_no_example_left_untested(name: str) -> None:
    assert [f.where for f in fences(DOCS / name) if f.tag in EXAMPLE_TAGS] == []


def test_measured_rows_are_rows_of_the_committed_benchmark_run() -> None:
    """Every table row of the benchmarks page is a row of benchmarks/RESULTS.md, verbatim."""
    rows = [line for line in (DOCS / "benchmarks.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| figure |", "| method |"))]
    assert len(rows) >= 20
    results = set((ROOT / "benchmarks" / "RESULTS.md").read_text().splitlines())
    assert [row for row in rows if row not in results] == []


def test_the_does_not_fit_error_names_the_cli_flags() -> None:
    """The planning page's error is the CLI's (run and compared by the page test), spelled with flags."""
    text = (DOCS / "planning.md").read_text()
    shown = text.split("$ bigload plan llama-3-70b --max-memory 0=24GiB,cpu=32GiB\n", 1)[1].split("```", 1)[0]
    assert "--offload-folder DIR" in shown and "offload_folder=" not in shown
