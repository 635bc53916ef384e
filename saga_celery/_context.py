"""What a running step or rollback handler knows about itself."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from saga_celery._core.config import StepConfig
from saga_celery._errors import SagaError


class StepContext(BaseModel):
    """The running step, from ``saga_celery.current_step()`` inside its body."""

    model_config = ConfigDict(frozen=True)

    saga_id: str
    step: str
    """The step's name (its Celery task name unless ``name=`` overrode it)."""
    count: int
    """1-based occurrence of this step's name in the saga."""
    attempt: int
    """1-based attempt number."""
    config: StepConfig
    params: JsonValue
    idempotency_key: str
    """Stable across retries and redeliveries; unique per saga, step and count."""


class RollbackContext(BaseModel):
    """What a rollback handler gets: the step's output and the error that failed the saga."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    saga_id: str
    step: str
    count: int
    attempt: int
    """Attempt number of this rollback handler (continues across ``retry_rollback``)."""
    output: JsonValue
    """The step's output, or None if the step itself failed."""
    error: dict[str, Any] | None
    """``{"type", "message"}`` of the error that failed the saga (``Terminated`` on terminate)."""
    params: JsonValue
    config: StepConfig
    idempotency_key: str
    """Its own key (not the step's), stable across the rollback's retries."""
    args: list[JsonValue] = Field(default_factory=list)
    """The step's own positional arguments, the previous stage's output first where the
    step received it: what a handler needs to undo a step that never returned."""
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)
    """The step's own keyword arguments."""
    step_idempotency_key: str = ""
    """The key the step's body saw, to look up an effect the step made under it."""
    step_error: dict[str, Any] | None = None
    """``{"type", "message"}`` of the step's own last failed attempt, or None."""


_current: ContextVar[StepContext | Callable[[], StepContext] | None] = ContextVar(
    "saga_celery_step", default=None)
"""The running step's context, or what builds it: most bodies never ask for it, and
building it (validating the saga's params) cost a step more than its own bookkeeping."""


def current_step() -> StepContext:
    """The context of the step running in this task; ``SagaError`` outside a saga step."""
    ctx = _current.get()
    if ctx is None:
        raise SagaError("current_step() was called outside a running saga step")
    if not isinstance(ctx, StepContext):
        ctx = ctx()
        _current.set(ctx)  # built once per attempt; the runtime resets the variable after
    return ctx


def step_idempotency_key(saga_id: str, step: str, count: int, *, key_format: int) -> str:
    """The key a step's body sees, in the encoding of the saga's format.

    Format 2 escapes ``%`` and ``:`` in each part before joining them with ``:``, so the key
    splits back into its parts: two different (saga id, step, count) never share one.
    Format 1 (0.1.0's) joins them as they are.
    """
    parts = [saga_id, step, str(count)]
    if key_format >= 2:
        parts = [_escape(part) for part in parts]
    return ":".join(parts)


def rollback_idempotency_key(saga_id: str, step: str, count: int, *, key_format: int) -> str:
    """The rollback handler's own key: its step's key plus a part no step key ends with."""
    return step_idempotency_key(saga_id, step, count, key_format=key_format) + ":rollback"


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")
