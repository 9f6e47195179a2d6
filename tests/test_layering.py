"""The house's import rules, read from the code (every ``import`` statement, deferred ones included):

    kernels/   imports nothing of the project (plain ops on tensors and a rule descriptor)
    models/    imports kernels/
    server/    imports models/ and kernels/
    loadtest/  imports nothing of the project (an HTTP client)

No runtime package imports benchmarks/, tests/ or deploy/; every project import goes through the one
import root ``miras_serve``; and neither the packages nor their modules import each other in a loop. ``python -m pytest
tests/test_layering.py`` prints each forbidden edge with its file and line.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ("kernels", "models", "server", "loadtest")
TOOLING = ("benchmarks", "tests", "deploy")
MAY_IMPORT = {"kernels": set(), "models": {"kernels"}, "server": {"models", "kernels"}, "loadtest": set()}
IMPORT_ROOT = "miras_serve"


@dataclass(frozen=True)
class Edge:
    source: str  # the importing module, e.g. "models.layers"
    target: str  # the imported module, package or name, e.g. "kernels.scan" or "models.memory.dot"
    where: str  # file:line

    @property
    def source_package(self) -> str:
        return self.source.split(".")[0]

    @property
    def target_package(self) -> str:
        return self.target.split(".")[0]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_target(name: str) -> str | None:
    """The project module an absolute import names (without the import root), or None if not the project's."""
    parts = name.split(".")
    if parts[0] == IMPORT_ROOT:
        return ".".join(parts[1:]) or None
    if parts[0] in RUNTIME + TOOLING:
        return name
    return None


def imports_of(root: Path, path: Path) -> tuple[list[Edge], list[str]]:
    """The project imports of one file, and its imports of a project package that bypass the import root."""
    source = module_name(root, path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    edges, bare = [], []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: resolved inside the package
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
            names = [f"{IMPORT_ROOT}.{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module == IMPORT_ROOT:  # from miras_serve import models
                names = [f"{IMPORT_ROOT}.{alias.name}" for alias in node.names]
            else:  # "from a.b import c": module a.b.c if there is one, else a name of a.b (module_cycles decides)
                names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = project_target(name)
            if target is None:
                continue
            if name.split(".")[0] != IMPORT_ROOT and target.split(".")[0] in RUNTIME:
                bare.append(f"{where}: imports {name!r} (use {IMPORT_ROOT}.{name})")
            edges.append(Edge(source, target, where))
    return edges, bare


def import_graph(root: Path) -> tuple[list[Edge], list[str]]:
    edges, bare = [], []
    for folder in RUNTIME:
        for path in sorted((root / folder).rglob("*.py")):
            found, wrong = imports_of(root, path)
            edges += found
            bare += wrong
    return edges, bare


def forbidden_edges(edges: list[Edge]) -> list[str]:
    bad = []
    for edge in edges:
        src, dst = edge.source_package, edge.target_package
        if dst != src and dst not in MAY_IMPORT[src]:
            bad.append(f"{edge.where}: {src}/ may not import {dst}/ ({edge.source} -> {edge.target})")
    return bad


def package_cycles(edges: list[Edge]) -> list[list[str]]:
    """Each cycle of the package graph (runtime packages, edges between different packages), as a path."""
    graph: dict[str, set[str]] = {p: set() for p in RUNTIME}
    for edge in edges:
        if edge.target_package in graph and edge.target_package != edge.source_package:
            graph[edge.source_package].add(edge.target_package)
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for start in RUNTIME:
        if start not in done:
            visit(start, [start])
    return cycles


def module_cycles(edges: list[Edge], modules: set[str]) -> list[list[str]]:
    """The groups of modules that import each other in a loop (deferred imports included): the strongly
    connected components of more than one module, each sorted."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for edge in edges:
        target = edge.target
        while target and target not in modules:  # "models.memory.dot" names a module's attribute
            target = target.rpartition(".")[0]
        if target and target != edge.source and edge.source in graph:
            graph[edge.source].add(target)
    order, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's algorithm
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in order:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return groups


def runtime_modules(root: Path) -> set[str]:
    return {module_name(root, path) for folder in RUNTIME for path in (root / folder).rglob("*.py")}


def test_every_project_import_goes_through_the_import_root():
    _, bare = import_graph(ROOT)
    assert not bare, "\n".join(bare)


def test_no_forbidden_import_edges():
    edges, _ = import_graph(ROOT)
    assert edges, "no project imports found: the checker reads nothing"
    bad = forbidden_edges(edges)
    assert not bad, "\n".join(bad)


def test_the_package_graph_has_no_cycle():
    edges, _ = import_graph(ROOT)
    assert not package_cycles(edges)


def test_no_modules_import_each_other_in_a_loop():
    edges, _ = import_graph(ROOT)
    assert not module_cycles(edges, runtime_modules(ROOT))


@pytest.fixture
def tangled_tree(tmp_path: Path) -> Path:
    """A tree that breaks every rule once."""
    files = {
        "kernels/__init__.py": "",
        "kernels/scan.py": "from miras_serve.models.config import MirasConfig\nfrom . import ops\n",
        "kernels/ops.py": "import torch\n",
        "models/__init__.py": "from miras_serve.kernels import scan\n",
        "models/bench.py": "def f():\n    from miras_serve.server import engine\n",
        "server/__init__.py": "",
        "server/engine.py": "from models import config\nfrom benchmarks.report import write\n",
        "loadtest/__init__.py": "from miras_serve import models\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_checker_finds_each_kind_of_violation(tangled_tree: Path):
    edges, bare = import_graph(tangled_tree)
    assert bare == ["server/engine.py:1: imports 'models.config' (use miras_serve.models.config)"]
    bad = forbidden_edges(edges)
    assert any(b.startswith("kernels/scan.py:1: kernels/ may not import models/") for b in bad)
    assert any(b.startswith("models/bench.py:2: models/ may not import server/") for b in bad)  # a deferred import
    assert any(b.startswith("server/engine.py:2: server/ may not import benchmarks/") for b in bad)
    assert any(b.startswith("loadtest/__init__.py:1: loadtest/ may not import models/") for b in bad)
    assert not any("kernels.ops" in b for b in bad)  # a relative import inside the package is fine
    assert ["kernels", "models", "kernels"] in package_cycles(edges)
    assert module_cycles(edges, runtime_modules(tangled_tree)) == [["kernels.scan", "models"]]
