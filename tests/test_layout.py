"""The package layout keeps its promises (docs/architecture.md, "Packages and their order"): the packages
follow the data's way through the system and import only packages below them; no import cycle; no module
over ~600 lines and no function over ~60 lines of code."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import bigload

ROOT = Path(bigload.__file__).parent

# Lowest first. A module may import its own package and the packages below it, never one above.
ORDER = ("leaf", "formats", "plan", "load", "runtime", "integrations", "distributed", "api", "cli")
LEAVES = {"errors", "messages", "sizes", "devices", "tensors", "empty", "quant"}
TOP = {"__init__", "__main__", "hooks"}  # the public surface: re-exports of everything below
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60


@functools.lru_cache(maxsize=1)
def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("bigload", *parts)).removesuffix(".__init__")
        out[name] = path
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # bigload itself
    first = parts[1]
    if first in TOP and len(parts) == 2:
        return None
    return "leaf" if first in LEAVES else first


def _imports(path: Path) -> list[tuple[str, int]]:
    """bigload modules imported at run time (not under `if TYPE_CHECKING:`), with their line numbers."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bigload"):
            # `from bigload.formats import pages` imports the module `bigload.formats.pages`.
            found.extend((f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in _modules()
                          else node.module, node.lineno) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names if alias.name.startswith("bigload"))
    return found


def test_no_package_imports_one_above_it():
    wrong = []
    for module, path in _modules().items():
        here = _layer(module)
        if here is None:
            continue
        for imported, line in _imports(path):
            there = _layer(imported)
            if there is not None and ORDER.index(there) > ORDER.index(here):
                wrong.append(f"{module}:{line} ({here}) imports {imported} ({there})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    modules = _modules()
    graph = {name: {imported for imported, _ in _imports(path) if imported in modules} for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            # A package's __init__ importing its own modules is not a cycle its modules can see.
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def _code_lines(node: ast.AST, source: list[str]) -> int:
    """Lines of a function that hold code: not blank, not comments, not its docstring."""
    body = node.body  # type: ignore[attr-defined]
    skip: set[int] = set()
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        skip = set(range(body[0].lineno, body[0].end_lineno + 1))
    lines = range(node.lineno, node.end_lineno + 1)  # type: ignore[attr-defined]
    return sum(1 for n in lines if n not in skip and source[n - 1].strip() and not source[n - 1].strip().startswith("#"))


def test_modules_and_functions_stay_small():
    too_long = []
    for module, path in _modules().items():
        source = path.read_text().splitlines()
        if len(source) > MAX_MODULE_LINES:
            too_long.append(f"{module}: {len(source)} lines")
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = _code_lines(node, source)
                if count > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {count} lines of code")
    assert not too_long, "\n".join(too_long)
