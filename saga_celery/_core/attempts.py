"""Bookkeeping shared by forward steps and rollback handlers: attempts and their messages."""

from __future__ import annotations

from datetime import timedelta

from saga_celery._core.events import Ctx
from saga_celery._core.model import (
    AttemptRecord,
    Dispatch,
    Kind,
    Policy,
    RollbackRun,
    StepRun,
    dispatch_id,
)

Item = StepRun | RollbackRun


def find_item(ctx: Ctx, kind: Kind, key: str) -> Item | None:
    step = ctx.run.steps.get(key)
    if step is None or kind == Kind.STEP:
        return step
    return step.rollback


def find_attempt(item: Item, attempt: int) -> AttemptRecord | None:
    for record in reversed(item.attempts):
        if record.attempt == attempt:
            return record
    return None


def open_attempt(item: Item) -> AttemptRecord | None:
    """The attempt that started and has not ended, if any."""
    last = item.attempts[-1] if item.attempts else None
    return last if last is not None and last.ended_at is None else None


def budget_base(item: Item) -> int:
    return item.budget_base


def policy_of(ctx: Ctx, kind: Kind, key: str) -> Policy:
    spec = ctx.run.plan.spec(key)
    if kind == Kind.ROLLBACK and spec.rollback_policy is not None:
        return spec.rollback_policy
    return spec.policy


def send_attempt(
    ctx: Ctx, kind: Kind, key: str, item: Item, attempt: int, *,
    delay_ms: float = 0.0, via_retry: bool = False,
) -> None:
    """Record that ``attempt`` is due and put its message in the outbox."""
    item.next_attempt = attempt
    ctx.dispatch(
        Dispatch(
            kind=kind,
            key=key,
            attempt=attempt,
            due_at=ctx.now + timedelta(milliseconds=delay_ms),
            retries=attempt - budget_base(item),
            origin=ctx.origin,
            via_retry=via_retry,
        )
    )


def withdraw(ctx: Ctx, kind: Kind, key: str, item: Item) -> None:
    """Cancel a message that is due but has not started: it will be dropped on arrival."""
    if item.next_attempt is not None:
        ctx.run.outbox.pop(dispatch_id(kind, key, item.next_attempt), None)
        item.next_attempt = None
        ctx.changed = True


def resend_from(ctx: Ctx, origin: str) -> None:
    """Queue again what ``origin`` sent and has not started: a redelivery's duty."""
    ctx.dispatches.extend(d for d in ctx.run.outbox.values() if d.origin == origin)


def origin_of(kind: Kind, key: str, attempt: int) -> str:
    return dispatch_id(kind, key, attempt)
