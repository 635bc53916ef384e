"""The recovery sweep: send again what an unfinished saga is waiting for and never got.

The rule, per unfinished saga (``saga_celery._core.recovery``):

- an outbox entry (a message recorded as due) that has not started ``grace`` after it was
  due is sent again: the broker lost it, or a crash fell between the transition and the send;
- an attempt that started and has not ended, whose lease has lapsed (its holder stopped
  renewing it: the worker died, and its message is lost or still waiting out the broker's
  visibility timeout) and that started more than ``grace`` ago, is sent again with the same
  attempt number: the receiver counts a worker loss and runs it again.

A message waiting out a long delay as a timer (SPEC section 8) has its timer recorded again
if it is missing (a Redis Cluster commit writes it beside the commit), and is sent again
like any other once overdue.  Each re-send is committed before it is sent, and the same
message is not re-sent again until ``grace·2^resends`` has passed, so a slow backlog is not
flooded with copies.  A receiver drops a message for an attempt that already ended, and
waits while another delivery holds the attempt's lease.  Run by beat
(``saga_celery.recover``) and by ``saga-celery recover``.

One sweep pages through the whole active index, however many sagas it holds.  A saga whose
record cannot be read (``SagaCorruptStateError``) is logged once and moved out of the active
index into the corrupt records, where ``saga-celery list --corrupt`` lists it: later sweeps
no longer trip over it.

As it ends, a sweep records what it saw (``SweepRecord``: when, how many sagas, the overdue
messages and the oldest of them, ``_celery/health.py``) for ``saga-celery health``; a sweep
that beat started records beat's interval too.
"""

from __future__ import annotations

from datetime import timedelta

import structlog

from saga_celery._celery.dispatch import Dispatcher
from saga_celery._celery.health import SweepTally
from saga_celery._core.events import RecoverySwept
from saga_celery._core.model import Kind, SagaRun
from saga_celery._core.recovery import overdue, stalled
from saga_celery._engine import Engine, lease_name
from saga_celery._errors import SagaCorruptStateError, SagaFormatError, SagaNotFoundError
from saga_celery._store.base import active_pages

log = structlog.get_logger("saga_celery")

PAGE_SIZE = 1000
"""Active saga ids read per round trip of a sweep."""
PRUNE_PER_SWEEP = 10_000
"""Oldest index entries a sweep checks for an expired saga (``list`` has nothing to show)."""


def recover(engine: Engine, dispatcher: Dispatcher, *, grace: timedelta,
            page_size: int = PAGE_SIZE, interval: timedelta | None = None) -> int:
    """Sweep every active saga once, ``page_size`` ids a page, and record what it saw; how
    many messages were sent again.  ``interval``: how often beat runs the sweep, when beat
    started this one (None keeps the recorded interval)."""
    sent = 0
    tally = SweepTally()
    engine.store.prune_index(PRUNE_PER_SWEEP)  # ids whose retention ran out
    # Ended sagas a dead process did not compact or archive (``_store/finisher.py``).
    engine.store.finish_pending(int(grace.total_seconds() * 1000))
    for page in active_pages(engine.store, page_size):
        for saga_id in page:
            sent += _sweep_safely(engine, dispatcher, saga_id, grace, tally)
    engine.store.record_sweep(tally.record(engine.clock(), interval))
    return sent


def _sweep_safely(engine: Engine, dispatcher: Dispatcher, saga_id: str,
                  grace: timedelta, tally: SweepTally) -> int:
    """``_sweep_one``; a record it cannot read is moved aside, not allowed to stop the sweep."""
    try:
        return _sweep_one(engine, dispatcher, saga_id, grace, tally)
    except SagaCorruptStateError as exc:
        log.error("saga.recovery_moved_aside", saga_id=saga_id, error=str(exc))
        at_ms = int(engine.clock().timestamp() * 1000)
        engine.store.mark_corrupt(saga_id, str(exc), at_ms=at_ms)
    except (SagaNotFoundError, SagaFormatError) as exc:  # vanished mid-sweep, or a newer
        log.error("saga.recovery_skipped", saga_id=saga_id, error=str(exc))  # release's
    return 0


def _sweep_one(engine: Engine, dispatcher: Dispatcher, saga_id: str, grace: timedelta,
               tally: SweepTally) -> int:
    snapshot = engine.store.load(saga_id)
    if snapshot is None or snapshot.run.is_terminal:
        engine.store.forget_active(saga_id)
        return 0
    now = engine.clock()
    tally.count(snapshot.run, now, grace)
    engine.repair_timers(snapshot.run)
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
        snapshot = engine.store.load(run.id, lease=lease_name(kind, key, run.format))
        if snapshot is not None and snapshot.lease_holder is None:
            found.append((kind, key, attempt))
    return found
