"""The typed facade (``SagaStep``, ``SagaRollback``) describes the Celery tasks that run.

mypy cannot check this itself: a Celery task subclasses ``Any`` to it, so any class passes
for any protocol.  These tests hold the facade to the runtime objects and signatures.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, get_overloads

from saga_celery import RollbackContext, SagaApp, SagaRollback, SagaStep
from saga_celery._celery.tasks import SagaStepTask


def _keywords(fn: Callable[..., Any]) -> list[str]:
    """The keyword-only and ``**`` parameter names of ``fn``, in order."""
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


def test_a_step_and_its_rollback_have_every_member_their_types_promise(
        sagas: SagaApp) -> None:
    """A step is a ``SagaStep`` and its handler a ``SagaRollback``, member for member."""
    @sagas.step
    def reserve(sku: str, qty: int) -> str:
        return f"{sku}x{qty}"

    @reserve.rollback
    def release(ctx: RollbackContext) -> None:
        return None

    assert isinstance(reserve, SagaStep)
    assert isinstance(release, SagaRollback)
    assert not isinstance(release, SagaStep)
    assert reserve("sku-1", 2) == "sku-1x2"


def test_the_typed_options_are_the_runtime_options() -> None:
    """The options the overloads of ``@sagas.step(...)`` and ``@step.rollback(...)`` type are
    exactly those the runtime methods take: an option added to one is added to the other."""
    step_options = get_overloads(SagaApp.step)[-1]
    # A protocol's overloads have no implementation to look them up by: name them instead.
    rollback = SimpleNamespace(__module__=SagaStep.__module__, __qualname__="SagaStep.rollback")
    rollback_options = get_overloads(rollback)[-1]  # type: ignore[arg-type]
    assert _keywords(step_options) == _keywords(SagaApp.step)
    assert _keywords(rollback_options) == _keywords(SagaStepTask.rollback)
