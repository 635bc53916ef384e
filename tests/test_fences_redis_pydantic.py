"""What the library may touch of redis-py and pydantic, and what the pure core may import.

Only ``saga_celery/_internals`` names a private attribute of redis-py or pydantic (SPEC
section 9); the core (``saga_celery/_core``) imports the standard library, pydantic and
its own modules and errors, nothing else.  Both checks read the source, so they hold
whatever a test run happens to execute.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pydantic
import redis
import redis.client
import redis.connection

PACKAGE = Path(__file__).resolve().parents[1] / "saga_celery"
FENCE = PACKAGE / "_internals"
CORE = PACKAGE / "_core"


def private_names() -> set[str]:
    """The private attribute names of redis-py's client, pool, connection and pipeline and
    of pydantic's models, as the installed versions define them."""
    objects: list[object] = [redis.Redis, redis.ConnectionPool, redis.connection.Connection,
                             redis.client.Pipeline, pydantic.BaseModel,
                             redis.connection.Connection(), redis.ConnectionPool()]
    names = {name for obj in objects for name in dir(obj) if name.startswith("_")}
    return {name for name in names if not _dunder(name) or name.startswith("__pydantic")}


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def modules(root: Path) -> Iterator[tuple[Path, ast.Module]]:
    """Every module under ``root``, parsed."""
    for path in sorted(root.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def reaches(tree: ast.Module, names: set[str]) -> Iterator[tuple[int, str]]:
    """Where ``tree`` reads one of ``names`` off an object other than its own ``self``."""
    for node in ast.walk(tree):
        own = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
            node.value.id in ("self", "cls"))
        if isinstance(node, ast.Attribute) and node.attr in names and not own:
            yield node.lineno, ast.unparse(node)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value.startswith("__pydantic")):
            yield node.lineno, repr(node.value)


def imported(tree: ast.Module) -> Iterator[str]:
    """Every module ``tree`` imports, absolute."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            yield node.module


def test_only_the_fence_names_private_internals_of_redis_py_or_pydantic() -> None:
    """No module outside ``_internals`` reads a private attribute of redis-py or pydantic,
    or imports one of their private modules."""
    names = private_names()
    found = []
    for path, tree in modules(PACKAGE):
        if FENCE in path.parents:
            continue
        found += [f"{path.name}:{line}: {text}" for line, text in reaches(tree, names)]
        found += [f"{path.name}: imports {module}" for module in imported(tree)
                  if module.split(".")[0] in ("redis", "pydantic", "pydantic_core")
                  and any(part.startswith("_") for part in module.split("."))]
    assert found == []


def test_the_core_imports_only_the_standard_library_pydantic_and_itself() -> None:
    """The pure core (``saga_celery/_core``) imports nothing but the standard library,
    pydantic, its own modules and the library's errors."""
    allowed = {*sys.stdlib_module_names, "pydantic"}
    found = []
    for path, tree in modules(CORE):
        for module in imported(tree):
            own = module.startswith("saga_celery._core") or module == "saga_celery._errors"
            if not own and module.split(".")[0] not in allowed:
                found.append(f"{path.name}: {module}")
    assert found == []
