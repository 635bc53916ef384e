"""The recovery sweep: send again what an unfinished saga is waiting for and never got.

The rule, per unfinished saga:

- an outbox entry (a message recorded as due) that has not started ``grace`` after it was
  due is sent again: the broker lost it, or a crash fell between the transition and the send;
- an attempt that started and has not ended, whose lease has expired (its holder stopped
  renewing it: the worker died, and its message is lost or still waiting out the broker's
  visibility timeout) and that started more than ``grace`` ago, is sent again with the same
  attempt number: the receiver counts a worker loss and runs it again.

Re-sending is always safe: a receiver drops a message for an attempt that already ended, and
waits while another delivery holds the attempt's lease.  Run by beat (``saga_celery.recover``)
and by ``saga-celery recover``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog

from saga_celery._celery.dispatch import Dispatcher
from saga_celery._core.attempts import budget_base, open_attempt
from saga_celery._core.model import Dispatch, Kind, SagaRun, dispatch_id
from saga_celery._engine import Engine, lease_name
from saga_celery._errors import SagaCorruptStateError

log = structlog.get_logger("saga_celery")


def recover(engine: Engine, dispatcher: Dispatcher, *, grace: timedelta,
            limit: int = 10_000) -> int:
    """Sweep the active sagas once; returns how many messages were sent again."""
    sent = 0
    now = engine.clock()
    engine.store.prune_index(limit)  # ids whose retention ran out: `list` has nothing to show
    for saga_id in engine.store.active_ids(limit):
        try:
            snapshot = engine.store.load(saga_id)
        except SagaCorruptStateError as exc:  # one bad record must not stop the sweep
            log.error("saga.recovery_skipped_corrupt", saga_id=saga_id, error=str(exc))
            continue
        if snapshot is None or snapshot.run.is_terminal:
            engine.store.forget_active(saga_id)
            continue
        due = overdue(snapshot.run, now, grace) + orphaned(engine, snapshot.run, now, grace)
        if due:
            log.warning("saga.recovered", saga_id=saga_id, messages=[d.id for d in due])
            dispatcher.send(snapshot.run, due)
            sent += len(due)
    return sent


def overdue(run: SagaRun, now: datetime, grace: timedelta) -> list[Dispatch]:
    """Outbox entries due for longer than ``grace`` whose attempt has not started."""
    return [d for d in run.outbox.values() if d.due_at + grace <= now]


def orphaned(engine: Engine, run: SagaRun, now: datetime, grace: timedelta) -> list[Dispatch]:
    """Running attempts whose lease has lapsed: their worker is gone."""
    found = []
    for step in run.steps.values():
        for kind, item in ((Kind.STEP, step), (Kind.ROLLBACK, step.rollback)):
            record = None if item is None else open_attempt(item)
            if item is None or record is None or record.started_at + grace > now:
                continue
            snapshot = engine.store.load(run.id, lease=lease_name(kind, step.key))
            if snapshot is None or snapshot.lease_holder is not None:
                continue
            found.append(Dispatch(kind=kind, key=step.key, attempt=record.attempt, due_at=now,
                                  retries=record.attempt - budget_base(item),
                                  origin=dispatch_id(kind, step.key, record.attempt)))
    return found
