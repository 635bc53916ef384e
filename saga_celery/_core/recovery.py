"""What the recovery sweep re-sends, and how it backs off (pure).

A waiting stage's ``wake`` entries are no messages: their timers fire them
(``_celery/timers.py``), and the sweep only puts back a timer that is missing.

A message recorded as due whose attempt has not started ``grace`` after its due time is
re-sent; so is a running attempt whose lease lapsed (its worker is gone).  Each re-send is
recorded, and the next one of the same message waits ``grace·2^resends`` (capped), so a
backlog that merely drains slowly is not flooded with copies on every sweep.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from saga_celery._core.attempts import budget_base, find_item, open_attempt
from saga_celery._core.events import Ctx, RecoverySwept
from saga_celery._core.model import AttemptRecord, Dispatch, Kind, SagaRun, dispatch_id

MAX_BACKOFF_DOUBLINGS = 6


def _wait(grace: timedelta, resends: int) -> timedelta:
    factor: int = 2 ** min(resends, MAX_BACKOFF_DOUBLINGS)
    return grace * factor


def overdue(run: SagaRun, now: datetime, grace: timedelta) -> list[Dispatch]:
    """Outbox entries whose attempt has not started in time (backing off per re-send)."""
    return [d for d in run.outbox.values()
            if d.kind != Kind.WAKE and d.due_at + _wait(grace, d.resends) <= now]


def stalled(run: SagaRun, now: datetime, grace: timedelta) -> list[tuple[Kind, str, int]]:
    """Running attempts old enough to be re-sent if their lease has lapsed."""
    found = []
    for step in run.steps.values():
        if run.plan.spec(step.key).wait is not None:
            continue  # a waiting stage runs no task: its timer, not a lease, ends it
        for kind, item in ((Kind.STEP, step), (Kind.ROLLBACK, step.rollback)):
            record = None if item is None else open_attempt(item)
            if record is not None and _since(record) + _wait(grace, record.resends) <= now:
                found.append((kind, step.key, record.attempt))
    return found


def _since(record: AttemptRecord) -> datetime:
    return record.resent_at or record.started_at


def sweep(ctx: Ctx, ev: RecoverySwept) -> None:
    """Re-send what is overdue and the lapsed attempts, recording each re-send."""
    grace = timedelta(milliseconds=ev.grace_ms)
    for due in overdue(ctx.run, ctx.now, grace):
        again = due.model_copy(update={"due_at": ctx.now, "resends": due.resends + 1})
        ctx.dispatch(again)
    still = set(stalled(ctx.run, ctx.now, grace))
    for kind, key, attempt in ev.lapsed:
        item = find_item(ctx, kind, key)
        record = None if item is None else open_attempt(item)
        if item is None or record is None or (kind, key, attempt) not in still:
            continue
        record.resends += 1
        record.resent_at = ctx.now
        ctx.changed = True
        ctx.dispatches.append(Dispatch(kind=kind, key=key, attempt=attempt, due_at=ctx.now,
                                       retries=attempt - budget_base(item),
                                       origin=dispatch_id(kind, key, attempt)))
