"""The layout holds: layer contracts, no import cycle, no private import across modules, short files.

docs/architecture.md describes the layers; pyproject.toml's ``[tool.importlinter]`` states who may
import whom, and ``lint-imports`` checks it on the real import graph (function-level imports
included). The rest is checked here on the same graph (grimp, what import-linter runs on) and on
the source.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "sweeps")
MAX_LINES = 450


def _py_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def _module_name(path: Path) -> str:
    if not path.is_relative_to(ROOT):
        return path.stem
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_layer_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a set of modules
    that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return found


def test_no_import_cycle_anywhere():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert _cycles(graph) == []
    # the check sees imports inside functions too (the kind that made cli <-> cli_data a circle)
    graph.add_import(importer="trainer.tasks", imported="trainer.loop")
    assert any("trainer.tasks" in c for c in _cycles(graph))


@pytest.mark.parametrize("path", _py_files(*PACKAGES), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_450_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines: split it along what it does"


def _private_imports(path: Path, attributes: bool) -> list[str]:
    """Imports of another module's ``_private`` names (and, with ``attributes``, ``module._name``
    uses of an imported module). A ``_private`` module may be imported only inside its package."""
    tree = ast.parse(path.read_text())
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    modules: set[str] = set()  # local names bound to imported modules
    bad = []

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")
        base = base[: len(base) - node.level + 1]
        return ".".join([*base, node.module] if node.module else base)

    def private_module(name: str) -> bool:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.startswith("_") and not part.startswith("__"):
                owner = ".".join(parts[:i])
                if not (package == owner or package.startswith(owner + ".")):
                    return True
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if private_module(a.name):
                    bad.append(f"line {node.lineno}: import {a.name}")
                modules.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            source = absolute(node)
            if private_module(source):
                bad.append(f"line {node.lineno}: from {source} import ...")
            own = source == package or package.startswith(source + ".")  # a private submodule of ours
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__") and not own:
                    bad.append(f"line {node.lineno}: from {source} import {a.name}")
                modules.add(a.asname or a.name)  # may be a module (from . import cam)
    if attributes:
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return bad


@pytest.mark.parametrize(
    "path", _py_files(*PACKAGES, "benchmarks", "tests"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_private_name_of_another_module_is_imported(path):
    # tests may still poke at a module's private state (a compile cache) through the module object
    assert _private_imports(path, attributes=not path.is_relative_to(ROOT / "tests")) == []


def test_the_private_import_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from trainer.loop import _seed_all\nimport trainer.cam as cam\ncam._conv_mlp_head(None)\n"
        "from trainer._registry import Registry\n"
    )
    found = _private_imports(bad, attributes=True)
    assert len(found) == 3 and any("_seed_all" in f for f in found) and any("_registry" in f for f in found)
