"""The recovery sweep: send again what an unfinished saga is waiting for and never got.

The rule, per unfinished saga (``saga_celery._core.recovery``):

- an outbox entry (a message recorded as due) that has not started ``grace`` after it was
  due is sent again: the broker lost it, or a crash fell between the transition and the send;
- an attempt that started and has not ended, whose lease has lapsed (its holder stopped
  renewing it: the worker died, and its message is lost or still waiting out the broker's
  visibility timeout) and that started more than ``grace`` ago, is sent again with the same
  attempt number: the receiver counts a worker loss and runs it again.

Each re-send is committed before it is sent, and the same message is not re-sent again
until ``grace·2^resends`` has passed, so a slow backlog is not flooded with copies.  A
receiver drops a message for an attempt that already ended, and waits while another
delivery holds the attempt's lease.  Run by beat (``saga_celery.recover``) and by
``saga-celery recover``.
"""

from __future__ import annotations

from datetime import timedelta

import structlog

from saga_celery._celery.dispatch import Dispatcher
from saga_celery._core.events import RecoverySwept
from saga_celery._core.model import Kind, SagaRun
from saga_celery._core.recovery import overdue, stalled
from saga_celery._engine import Engine, lease_name
from saga_celery._errors import SagaCorruptStateError, SagaNotFoundError

log = structlog.get_logger("saga_celery")


def recover(engine: Engine, dispatcher: Dispatcher, *, grace: timedelta,
            limit: int = 10_000) -> int:
    """Sweep the active sagas once; returns how many messages were sent again."""
    sent = 0
    engine.store.prune_index(limit)  # ids whose retention ran out: `list` has nothing to show
    for saga_id in engine.store.active_ids(limit):
        try:
            sent += _sweep_one(engine, dispatcher, saga_id, grace)
        except (SagaCorruptStateError, SagaNotFoundError) as exc:  # one bad record must
            log.error("saga.recovery_skipped", saga_id=saga_id, error=str(exc))  # not stop it
    return sent


def _sweep_one(engine: Engine, dispatcher: Dispatcher, saga_id: str, grace: timedelta) -> int:
    snapshot = engine.store.load(saga_id)
    if snapshot is None or snapshot.run.is_terminal:
        engine.store.forget_active(saga_id)
        return 0
    now = engine.clock()
    lapsed = _lapsed(engine, snapshot.run, stalled(snapshot.run, now, grace))
    if not lapsed and not overdue(snapshot.run, now, grace):
        return 0
    grace_ms = grace.total_seconds() * 1000
    transition = engine.handle(saga_id, RecoverySwept(grace_ms=grace_ms, lapsed=lapsed))
    if transition.dispatches:
        log.warning("saga.recovered", saga_id=saga_id,
                    messages=[d.id for d in transition.dispatches])
        dispatcher.send(transition.run, transition.dispatches)
    return len(transition.dispatches)


def _lapsed(engine: Engine, run: SagaRun, candidates: list[tuple[Kind, str, int]]
            ) -> list[tuple[Kind, str, int]]:
    """The candidates whose lease nobody holds any more."""
    found = []
    for kind, key, attempt in candidates:
        snapshot = engine.store.load(run.id, lease=lease_name(key))
        if snapshot is not None and snapshot.lease_holder is None:
            found.append((kind, key, attempt))
    return found
