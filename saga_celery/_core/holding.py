"""Hold instead of rolling back (SPEC section 8): ``on_failure="hold"``, redrive, rollback.

A saga whose plan says ``hold`` goes to status ``held`` when a step fails for good, instead
of rolling back: nothing is undone, in-flight siblings finish and are recorded.  Then
``redrive()`` runs the failed steps again with a fresh retry budget (attempt numbers go on),
``rollback()`` starts the rollback as for a failure, and the hold timeout, when it passes
first, starts it by itself (a ``wake`` timer whose key is ``HOLD_KEY``).  Output errors, wait
timeouts and ``terminate`` never hold.  Pure, like the rest of the core.
"""

from __future__ import annotations

from datetime import timedelta

from saga_celery._core.attempts import send_attempt
from saga_celery._core.events import Ctx, error_fields
from saga_celery._core.model import (
    Dispatch,
    ErrorInfo,
    Hold,
    Kind,
    OnFailure,
    SagaStatus,
    StepStatus,
    dispatch_id,
)

HOLD_KEY = "hold"
"""The key of a hold's timer (no step key: those hold a '#')."""

NEVER_HOLD = frozenset({"OutputNotSerializableError", "OutputTooLargeError",
                        "EventTimeoutError"})
"""Errors that roll back even under ``hold``: redriving could not change them."""


def holds(ctx: Ctx, error: ErrorInfo) -> bool:
    """Whether this failure holds the saga rather than failing it."""
    return (ctx.run.plan.on_failure == OnFailure.HOLD and error.type not in NEVER_HOLD
            and ctx.run.terminate is None)


def hold(ctx: Ctx, error: ErrorInfo) -> None:
    """A step failed for good: hold the saga (once; a sibling failing too is recorded)."""
    run = ctx.run
    if run.status == SagaStatus.HELD:
        return
    count = run.held.count + 1 if run.held is not None else 1
    run.held = Hold(error=error, since=ctx.now, count=count)
    run.status = SagaStatus.HELD
    ctx.emit("saga_held", error=error_fields(error),
             hold_timeout_ms=run.plan.hold_timeout_ms)
    timeout = run.plan.hold_timeout_ms
    if timeout is not None:
        ctx.dispatch(Dispatch(kind=Kind.WAKE, key=HOLD_KEY, attempt=count,
                              due_at=ctx.now + timedelta(milliseconds=timeout), retries=0,
                              origin=ctx.origin))


def release(ctx: Ctx) -> ErrorInfo | None:
    """Leave ``held`` (for a redrive, a rollback or a terminate): the hold's error, or None
    if the saga is not held.  Its timer, if any, finds nothing to do then."""
    run = ctx.run
    if run.status != SagaStatus.HELD or run.held is None:
        return None
    run.outbox.pop(dispatch_id(Kind.WAKE, HOLD_KEY, run.held.count), None)
    run.status = SagaStatus.RUNNING
    ctx.changed = True
    return run.held.error


def redrive(ctx: Ctx) -> str | None:
    """Run the failed steps again, each with a fresh budget; a refusal if not held."""
    run = ctx.run
    if release(ctx) is None:
        return f"saga {run.id!r} is {run.status}: only a held saga can be redriven"
    failed = [s for s in run.steps.values() if s.status == StepStatus.ERRORED]
    ctx.emit("saga_redriven", steps=[s.name for s in failed])
    for step in failed:
        last = step.attempts[-1].attempt if step.attempts else 0
        step.budget_base = last + 1
        step.status = StepStatus.PENDING
        send_attempt(ctx, Kind.STEP, step.key, step, last + 1)
    return None


def is_hold_timer(key: str, attempt: int, ctx: Ctx) -> bool:
    held = ctx.run.held
    return key == HOLD_KEY and held is not None and held.count == attempt
