"""The recovery sweep: send again what an unfinished saga is waiting for and never got."""

from __future__ import annotations

from datetime import timedelta

import structlog

from saga_celery._celery.dispatch import Dispatcher
from saga_celery._engine import Engine

log = structlog.get_logger("saga_celery")


def recover(engine: Engine, dispatcher: Dispatcher, *, grace: timedelta) -> int:
    """Re-send outbox entries due for longer than ``grace`` whose attempt has not started.

    Safe to run at any time and on many processes: a duplicate message is dropped by the
    receiving task.  Terminal sagas found in the active index are dropped from it.
    Returns how many messages were sent.
    """
    sent = 0
    now = engine.clock()
    for saga_id in engine.store.active_ids():
        snapshot = engine.store.load(saga_id)
        if snapshot is None or snapshot.run.is_terminal:
            engine.store.forget_active(saga_id)
            continue
        overdue = [d for d in snapshot.run.outbox.values() if d.due_at + grace <= now]
        if overdue:
            log.warning("saga.recovered", saga_id=saga_id, messages=[d.id for d in overdue])
            dispatcher.send(snapshot.run, overdue)
            sent += len(overdue)
    return sent
