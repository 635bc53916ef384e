"""Waiting stages (SPEC section 8): a sleep, or a wait for an event sent to the saga.

A waiting stage runs no task.  It is recorded like a step (a ``StepRun`` with one attempt,
from when the wait began to when it ended) and its end is either a ``wake`` timer firing
(the sleep is over, or the wait timed out) or an event delivered by ``send_event``.  An event
that no wait takes yet is kept in the saga's inbox, per type, oldest first; the same
``event_id`` twice counts once.  Pure, like the rest of the core: the state machine
(``machine.py``) calls these and advances the saga when a wait ends.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import JsonValue

from saga_celery._core.attempts import open_attempt
from saga_celery._core.events import Ctx, EventSent, WakeUp, error_fields
from saga_celery._core.model import (
    AttemptRecord,
    Dispatch,
    ErrorInfo,
    Kind,
    StepRun,
    StepStatus,
    WaitKind,
    WaitSpec,
    dispatch_id,
)

WAKE_ATTEMPT = 1
"""A waiting stage has one attempt: waits are not retried."""


def wait_of(ctx: Ctx, key: str) -> WaitSpec | None:
    spec = ctx.run.plan.specs_by_key.get(key)
    return None if spec is None else spec.wait


def begin_wait(ctx: Ctx, step: StepRun, wait: WaitSpec, previous: JsonValue) -> bool:
    """Start a waiting stage; True if it ended at once (an event was already kept for it).
    ``previous``: the previous stage's output, which a sleep passes on."""
    step.status = StepStatus.RUNNING
    step.attempts.append(AttemptRecord(attempt=WAKE_ATTEMPT, started_at=ctx.now))
    if wait.kind == WaitKind.SLEEP:
        step.output = previous
        ctx.emit("sleep_started", step=step.name, count=step.count,
                 duration_ms=wait.duration_ms)
        _set_timer(ctx, step, wait.duration_ms or 0.0)
        return False
    ctx.emit("wait_started", step=step.name, count=step.count, event_type=wait.event_type,
             timeout_ms=wait.duration_ms)
    kept = ctx.run.inbox.get(wait.event_type or "")
    if kept:
        payload = kept.pop(0)
        if not kept:
            del ctx.run.inbox[wait.event_type or ""]
        _end(ctx, step, payload)
        ctx.emit("wait_completed", step=step.name, count=step.count,
                 event_type=wait.event_type)
        return True
    if wait.duration_ms is not None:
        _set_timer(ctx, step, wait.duration_ms)
    return False


def wake(ctx: Ctx, ev: WakeUp) -> tuple[StepRun, ErrorInfo | None] | None:
    """A wake timer fired: the sleep ends, or the wait times out (with its error).  None when
    the timer is stale (the wait ended otherwise, or was cancelled)."""
    if ctx.run.outbox.pop(dispatch_id(Kind.WAKE, ev.key, ev.attempt), None) is None:
        return None
    step, wait = ctx.run.steps[ev.key], wait_of(ctx, ev.key)
    assert wait is not None, f"step {ev.key} does not wait"
    ctx.changed = True
    if wait.kind == WaitKind.SLEEP:
        _end(ctx, step, step.output)
        ctx.emit("sleep_completed", step=step.name, count=step.count)
        return step, None
    seconds = (wait.duration_ms or 0.0) / 1000
    error = ErrorInfo(type="EventTimeoutError",
                      message=f"no {wait.event_type!r} event came within {seconds:g} s",
                      step=step.name)
    _end(ctx, step, None, error)
    ctx.emit("wait_timed_out", step=step.name, count=step.count, event_type=wait.event_type,
             error=error_fields(error))
    return step, error


def deliver(ctx: Ctx, ev: EventSent) -> StepRun | None:
    """Take an event: the running wait for its type ends with it (returned), or the inbox
    keeps it.  An ``event_id`` taken before changes nothing."""
    run = ctx.run
    if ev.event_id is not None:
        if ev.event_id in run.event_ids:
            return None
        run.event_ids.append(ev.event_id)
    ctx.emit("event_received", event_type=ev.event_type, event_id=ev.event_id)
    step = _waiting_for(ctx, ev.event_type)
    if step is None:
        run.inbox.setdefault(ev.event_type, []).append(ev.payload)
        return None
    run.outbox.pop(dispatch_id(Kind.WAKE, step.key, WAKE_ATTEMPT), None)
    _end(ctx, step, ev.payload)
    ctx.emit("wait_completed", step=step.name, count=step.count, event_type=ev.event_type)
    return step


def cancel_wait(ctx: Ctx, step: StepRun) -> bool:
    """The saga fails or is terminated while ``step`` waits: the wait ends, cancelled (its
    timer, if any, finds nothing to do).  False if ``step`` is not a running wait."""
    record = open_attempt(step)
    if wait_of(ctx, step.key) is None or record is None:
        return False
    ctx.run.outbox.pop(dispatch_id(Kind.WAKE, step.key, record.attempt), None)
    record.ended_at = ctx.now
    record.success = False
    step.status = StepStatus.CANCELLED
    ctx.changed = True
    return True


def _waiting_for(ctx: Ctx, event_type: str) -> StepRun | None:
    if ctx.run.failing:
        return None
    for step in ctx.run.steps.values():
        wait = wait_of(ctx, step.key)
        if (wait is not None and wait.kind == WaitKind.WAIT and wait.event_type == event_type
                and open_attempt(step) is not None):
            return step
    return None


def _set_timer(ctx: Ctx, step: StepRun, delay_ms: float) -> None:
    ctx.dispatch(Dispatch(kind=Kind.WAKE, key=step.key, attempt=WAKE_ATTEMPT,
                          due_at=ctx.now + timedelta(milliseconds=delay_ms), retries=0,
                          origin=ctx.origin))


def _end(ctx: Ctx, step: StepRun, output: JsonValue, error: ErrorInfo | None = None) -> None:
    record = open_attempt(step)
    assert record is not None, f"step {step.key} is not waiting"
    record.ended_at = ctx.now
    record.success = error is None
    record.error = error
    step.status = StepStatus.COMPLETE if error is None else StepStatus.ERRORED
    step.output = output if error is None else None
    ctx.changed = True
