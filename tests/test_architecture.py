"""The package's shape (STYLE.md): no import circle, and the core depends on nothing but
the standard library, pydantic and itself.

Imports are read from the source (``ast``), counting every import a module makes, at its
top or inside a function, except those under ``if TYPE_CHECKING:`` (types only, no run-time
dependency).  A circle is a set of modules that reach each other through those imports.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "saga_celery"


def module_name(path: Path) -> str:
    """``saga_celery/_store/redis.py`` -> ``saga_celery._store.redis``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


_MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST, here: str) -> Iterator[str]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            continue
        if isinstance(child, ast.Import):
            yield from (alias.name for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:  # relative: resolve against this module's package
                package = here.rsplit(".", child.level)[0]
                base = f"{package}.{base}" if base else package
            for alias in child.names:  # ``from pkg import module`` imports that module
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in _MODULES else base
        yield from _imports(child, here)


def graph() -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports."""
    modules = _MODULES
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges[name] = {i for i in _imports(tree, name) if i in modules and i != name}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_circle() -> None:
    """No two modules of saga_celery reach each other through run-time imports (a circle
    is the sign of a collaborator digging through the app it came from)."""
    assert circles(graph()) == []


def test_the_circle_finder_finds_a_circle() -> None:
    """The check is not vacuous: a circle of three is found, a chain is not."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "_core").glob("*.py")), ids=lambda p: p.name)
def test_the_core_imports_only_the_standard_library_pydantic_and_itself(path: Path) -> None:
    """The pure core (``saga_celery/_core``) knows no Celery, kombu, Redis or structlog."""
    tree = ast.parse(path.read_text(), str(path))
    top = {name.split(".")[0] for name in _imports(tree, module_name(path))}
    foreign = {t for t in top if t not in sys.stdlib_module_names
               and t not in {"pydantic", "pydantic_core", "saga_celery", "__future__"}}
    assert foreign == set()
    ours = {name for name in _imports(tree, module_name(path))
            if name.startswith("saga_celery.") and not name.startswith(
                ("saga_celery._core", "saga_celery._errors"))}
    assert ours == set(), "the core imports only itself and the error tree"
