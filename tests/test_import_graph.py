"""The packages' import graph: no cycles, and the boundaries the design draws.

Read from the source with :mod:`ast`: every ``import`` a module runs, at its top or inside a
function (imports only a type checker reads, under ``if TYPE_CHECKING:``, do not count).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedcore", "edge_agent", "gateway", "ledger", "fedledger", "monitoring", "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.add(target)
                # ``from . import _sync`` imports a module, not a name
                found.update(f"{target}.{alias.name}" for alias in child.names)
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    return {
        name: {target for target in _imports(path, name) if target in modules and target != name}
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def _without_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exports its modules, and they import each other through
    it only by mistake: edges into an ``__init__`` from inside its own package are kept,
    edges from an ``__init__`` into its own modules are not cycles of design."""
    packages = set(PACKAGES)
    return {
        name: {t for t in targets if not (name in packages and t.startswith(name + "."))}
        for name, targets in graph.items()
    }


def test_the_graph_is_read():
    graph = _graph()
    assert "gateway._service" in graph and "gateway._ingest" in graph["gateway._service"]
    assert "gateway._metrics" not in graph["gateway._rounds"]  # a TYPE_CHECKING import


def test_no_import_cycle():
    assert _cycles(_without_packages(_graph())) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", ["fedcore", "edge_agent"])
def test_what_devices_install_imports_no_gateway_ledger_or_cli(package):
    graph = _graph()
    for name, targets in graph.items():
        if name.split(".")[0] == package:
            outside = {t for t in targets if t.split(".")[0] in {"gateway", "ledger", "fedledger"}}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_bench_imports_no_private_name_of_another_package():
    graph = _graph()
    for name, targets in graph.items():
        if name.split(".")[0] != "bench":
            continue
        private = {
            t
            for t in targets
            if t.split(".")[0] != "bench" and any(p.startswith("_") for p in t.split(".")[1:])
        }
        assert not private, f"{name} imports private modules {sorted(private)}"
