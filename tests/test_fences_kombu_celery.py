"""What the library may touch of kombu and Celery: only ``saga_celery/_internals`` names a
private attribute of either (SPEC section 9).

The check reads the source, so it holds whatever a test run happens to execute.  A private
name is one the installed kombu or Celery defines with a leading underscore on the classes
the library works with; a saga class that subclasses one of them (``SagaRequest``,
``SagaTask``) may use its own attributes, not its base's private ones.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import celery
import celery.canvas
import celery.local
import celery.worker.request
import kombu
import kombu.message
import kombu.messaging
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual

PACKAGE = Path(__file__).resolve().parents[1] / "saga_celery"
FENCE = PACKAGE / "_internals"
DEPENDENCIES = ("kombu", "celery")
CLASSES: tuple[type, ...] = (
    kombu_redis.Channel, kombu_redis.QoS, virtual.Channel, virtual.QoS, kombu.message.Message,
    kombu.messaging.Producer, kombu.Connection, celery.Celery, celery.Task,
    celery.worker.request.Request, celery.canvas.Signature, celery.local.Proxy)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@cache
def private_names(cls: type) -> set[str]:
    """The private names of ``cls`` and of its kombu and Celery bases: its attributes, and
    the ones its methods set on an instance (``self._message = message``)."""
    names = {name for name in dir(cls) if _private(name)}
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in DEPENDENCIES:
            names |= _set_on_self(klass)
    return names


def _set_on_self(cls: type) -> set[str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # a class built at run time: its attributes are in dir()
        return set()
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "self"
            and _private(node.attr)}


PRIVATE = {name for cls in CLASSES for name in private_names(cls)}


def modules() -> Iterator[tuple[str, ast.Module]]:
    """Every module of the package outside the fence: dotted name, parsed."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if FENCE not in path.parents:
            dotted = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
            yield dotted.removesuffix(".__init__"), ast.parse(path.read_text(), str(path))


def _base_private(module: str, classdef: ast.ClassDef) -> set[str]:
    """The private names a class of the library takes from a kombu or Celery base class,
    less the ones it defines itself."""
    cls = getattr(importlib.import_module(module), classdef.name, None)
    if not isinstance(cls, type):
        return set()
    bases = [b for b in CLASSES if issubclass(cls, b)]
    own = {name for klass in cls.__mro__ if klass.__module__.startswith("saga_celery")
           for name in vars(klass)}
    return {name for b in bases for name in private_names(b)} - own


def reaches(module: str, tree: ast.Module) -> Iterator[str]:
    """Where ``tree`` reads a private name of kombu or Celery, or imports one."""
    inherited: dict[int, set[str]] = {}
    for classdef in (c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)):
        names = _base_private(module, classdef)
        inherited.update((id(node), names) for node in ast.walk(classdef))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not own or node.attr in inherited.get(id(node), set()):
                yield f"{module}:{node.lineno}: {ast.unparse(node)}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                DEPENDENCIES):
            dotted = [*(node.module or "").split("."), *(a.name for a in node.names)]
            if any(_private(part) for part in dotted):
                yield f"{module}:{node.lineno}: from {node.module} import ..."


def test_only_the_fence_names_private_internals_of_kombu_or_celery() -> None:
    """No module outside ``_internals`` reads a private attribute of kombu or Celery, or
    imports a private name of theirs."""
    found = [hit for module, tree in modules() for hit in reaches(module, tree)]
    assert found == []


def test_the_check_sees_a_reach() -> None:
    """The check is not blind: the reaches this release moved into the fence are found."""
    tree = ast.parse("from celery.canvas import _chain\n"
                     "def f(channel, message):\n"
                     "    channel.qos._remove_from_indices('tag', None)\n"
                     "    message._state = 'ACK'\n")
    assert len(list(reaches("saga_celery._celery.acks", tree))) == 3
    subclass = ast.parse("class SagaRequest(Request):\n"
                         "    def f(self):\n"
                         "        return self._message, self._acked_by_task\n")
    assert [hit.split(": ")[1] for hit in reaches("saga_celery._celery.request", subclass)] == [
        "self._message"]
