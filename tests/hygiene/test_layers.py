"""Layers import one way, and no module imports itself around a loop.

    opd.shared  <-  opd.modeling  <-  opd.server, opd.client  <-  opd.bench

The contract (shared) depends on nothing of opd's; the math both sides use (modeling) on the
contract only; the teacher service (server) and the student side (client) on those two and never
on each other, so either ships and tests alone; the benchmarks may use everything. Every import
counts, module-level or inside a function (a function-local import is not a way around a cycle
or a layer); only `if TYPE_CHECKING:` blocks are left out (they never run). Read from the
source with ast, so the test needs no import of torch or vLLM.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "opd.shared": "shared",
    "opd.modeling": "modeling",
    "opd.server": "server",
    "opd.client": "client",
    "opd.bench": "bench",
}
ALLOWED = {
    "opd.shared": {"opd.shared"},
    "opd.modeling": {"opd.shared", "opd.modeling"},
    "opd.server": {"opd.shared", "opd.modeling", "opd.server"},
    "opd.client": {"opd.shared", "opd.modeling", "opd.client"},
    "opd.bench": set(PACKAGES),
}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts]
            out[".".join([package, *(p for p in parts if p != "__init__")])] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported(path: Path) -> Iterator[str]:
    """Every opd module (or name in one) the file imports, outside TYPE_CHECKING blocks."""

    def walk(node: ast.AST) -> Iterator[str]:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("opd"):
                assert child.module is not None
                yield child.module
                yield from (f"{child.module}.{alias.name}" for alias in child.names)
            elif isinstance(child, ast.Import):
                yield from (a.name for a in child.names if a.name.startswith("opd"))
            yield from walk(child)

    yield from walk(ast.parse(path.read_text()))


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {
        name: {dep for dep in imported(path) if dep in mods and dep != name}
        for name, path in mods.items()
    }


def test_layers_import_one_way():
    wrong = []
    for name, path in modules().items():
        layer = ".".join(name.split(".")[:2])
        for dep in imported(path):
            if ".".join(dep.split(".")[:2]) not in ALLOWED[layer]:
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_no_import_cycles():
    """Tarjan's strongly connected components of the import graph: every one a single module."""
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_graph_sees_function_local_imports():
    """The test's own check: a lazy import inside a function is an edge like any other."""
    edges = graph()
    assert "opd.client.train.trainer" in edges["opd.client.commands"]  # run_train's import
    assert "opd.client.recipes.probe" in edges["opd.client.commands"]  # run_probe_command's
