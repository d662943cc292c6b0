"""The pages of docs/: every example runs and prints what the page shows (conventions: `docs_examples`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from docs_examples import EXAMPLE_TAGS, assert_output, fences, run_page

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


def test_output_comparison_forgives_only_times_generated_text_and_elisions() -> None:
    shown = "load 0.48 s | decode 1.7 tokens/s\nweights: cpu: 2.82 MiB\nOnce upon a time\nxyz\n...\nend"
    assert_output("t", "load 9.1 s | decode 30 tokens/s\nweights: cpu: 2.82 MiB\nOnce upon a time\nq\na\nb\nend\n",
                  shown)
    assert_output("t", "Once upon a time00E0E\n", "Once upon a time�E\n")
    for printed in ("load 9.1 s | decode 30 tokens/s\nweights: cpu: 2.83 MiB\nOnce upon a time\nq\nend",  # a size
                    "load 9.1 s | decode 30 tokens/s\nweights: cpu: 2.82 MiB\nOnce upon a time\nq\nend\nmore",
                    "Once upon a time\nq\nend"):  # lines missing before the elision
        with pytest.raises(AssertionError, match="differs"):
            assert_output("t", printed, shown)


def test_untagged_fences_and_unknown_commands_are_refused(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n```\nbigload plan x\n```\n")
    with pytest.raises(AssertionError, match="tag it one of"):
        run_page(page)
    page.write_text("```bash\nrm -rf build\n```\n")
    with pytest.raises(AssertionError, match="not run: REASON"):
        run_page(page)
    page.write_text("<!-- not run: deletes things -->\n```bash\nrm -rf build\n```\n")
    assert run_page(page) == ["page.md:2: deletes things"]
