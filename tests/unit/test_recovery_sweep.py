"""The recovery sweep (``_celery/recovery.py``) on an in-memory store: what it covers.

It pages through every active saga, however many, and moves a saga whose record it cannot
read out of the active index into the corrupt set, where ``saga-celery list --corrupt``
shows it, instead of logging it again at every sweep.  As it ends it records what it saw,
for ``saga-celery health``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from structlog.testing import capture_logs

from saga_celery import SagaApp, SagaCorruptStateError
from saga_celery._celery.app import RECOVER_TASK
from saga_celery._celery.health import waiting_since
from saga_celery._celery.recovery import recover
from saga_celery._core.model import SagaRun
from saga_celery._store.base import Snapshot, SweepRecord
from saga_celery._store.memory import MemoryStore

pytestmark = pytest.mark.timeout(60)

GRACE = timedelta(0)


def shop(sagas: SagaApp) -> Any:
    """A one-step saga definition; starting it records its first message as due."""

    @sagas.step(name="sweep.reserve", retries={"limit": 0})
    def reserve() -> str:
        return "reserved"

    return sagas.saga("sweep", [reserve.s()])


def quiet_copies(run: SagaRun, count: int) -> list[SagaRun]:
    """``count`` copies of ``run``, older than it, with nothing due: the sweep skips them."""
    return [run.model_copy(update={"id": f"old-{i:05d}", "outbox": {},
                                   "created_at": run.created_at - timedelta(days=1)})
            for i in range(count)]


def test_the_sweep_reaches_a_saga_behind_ten_thousand_older_ones(sagas: SagaApp) -> None:
    """A saga with a lost message is re-sent even when 10,000 older sagas are still active
    (the sweep once looked at the oldest 10,000 only)."""
    shop(sagas).apply_async(saga_id="newest")
    snapshot = sagas._store.load("newest")
    assert snapshot is not None
    for copy in quiet_copies(snapshot.run, 10_000):
        sagas._store.create(copy, [])

    assert sagas.recover(grace=GRACE) == 1


def test_a_sweep_pages_through_every_active_saga(sagas: SagaApp) -> None:
    """With pages of 10, one sweep re-sends the lost first message of each of 25 sagas."""
    definition = shop(sagas)
    for i in range(25):
        definition.apply_async(saga_id=f"s-{i:02d}")

    assert recover(sagas._engine, sagas._dispatcher, grace=GRACE, page_size=10) == 25


class CorruptOne(MemoryStore):
    """A memory store whose record of saga ``broken`` cannot be read, as a foreign value
    under its key in Redis."""

    def load(self, saga_id: str, *, lease: str | None = None) -> Snapshot | None:
        if saga_id == "broken":
            raise SagaCorruptStateError("saga 'broken' is not readable", saga_id=saga_id)
        return super().load(saga_id, lease=lease)


def test_an_unreadable_saga_is_moved_aside_once_and_swept_no_more(app: Celery) -> None:
    """A saga whose record cannot be read leaves the active index for the corrupt set at the
    first sweep, logged once with why; the next sweep does not look at it again."""
    sagas = SagaApp(app, store=CorruptOne())
    definition = shop(sagas)
    for saga_id in ("healthy", "broken"):
        definition.apply_async(saga_id=saga_id)

    with capture_logs() as first:
        assert sagas.recover(grace=GRACE) == 1
    with capture_logs() as second:
        sagas.recover(grace=GRACE)

    assert [line["saga_id"] for line in first if line["log_level"] == "error"] == ["broken"]
    assert [line for line in second if line["log_level"] == "error"] == []
    assert "broken" not in sagas._store.active_ids()
    assert [(r.saga_id, r.why) for r in sagas._store.corrupt_records()] == [
        ("broken", "saga 'broken' is not readable")]


def test_a_sweep_records_the_sagas_it_saw_and_the_oldest_overdue_message(
        sagas: SagaApp) -> None:
    """The sweep's record counts the unfinished sagas and their overdue messages, and names
    the one that has waited longest, its saga and since when it waited."""
    definition = shop(sagas)
    for saga_id in ("first", "second"):
        definition.apply_async(saga_id=saga_id)
    first = sagas._store.load("first")
    assert first is not None
    (due,) = first.run.outbox.values()

    recover(sagas._engine, sagas._dispatcher, grace=GRACE)

    record = sagas._store.last_sweep()
    assert record is not None
    assert (record.sagas, record.overdue) == (2, 2)
    assert (record.oldest_overdue_saga, record.oldest_overdue_message) == ("first", due.id)
    assert record.oldest_overdue_ms == int(due.due_at.timestamp() * 1000)
    assert record.swept_at_ms >= record.oldest_overdue_ms
    assert record.interval_ms is None


def test_a_sweep_with_nothing_overdue_records_none(sagas: SagaApp) -> None:
    """Sagas whose messages are not late yet are counted, with no overdue message."""
    shop(sagas).apply_async(saga_id="fresh")

    sagas.recover()  # the app's grace, 60 s

    record = sagas._store.last_sweep()
    assert record is not None
    assert record == SweepRecord(swept_at_ms=record.swept_at_ms, sagas=1)


def test_only_a_sweep_beat_started_records_beats_interval(app: Celery) -> None:
    """The task beat sends records ``recovery_interval``; a sweep run by hand (``recover``)
    keeps it."""
    sagas = SagaApp(app, store=MemoryStore(), recovery_interval="10 seconds")

    sagas.recover()
    by_hand = sagas._store.last_sweep()
    app.tasks[RECOVER_TASK].apply()
    by_beat = sagas._store.last_sweep()
    sagas.recover()
    again = sagas._store.last_sweep()

    assert by_hand is not None and by_hand.interval_ms is None
    assert by_beat is not None and by_beat.interval_ms == 10_000
    assert again is not None and again.interval_ms == 10_000


def test_a_re_sent_message_has_waited_since_before_its_re_sends(sagas: SagaApp) -> None:
    """A message re-sent twice has waited at least ``grace + 2·grace`` longer than its due
    time says (each re-send waited out its back-off), but not since before its saga began."""
    shop(sagas).apply_async(saga_id="lost")
    snapshot = sagas._store.load("lost")
    assert snapshot is not None
    run = snapshot.run
    (due,) = run.outbox.values()
    later = due.model_copy(update={"due_at": run.created_at + timedelta(hours=1), "resends": 2})
    grace = timedelta(minutes=1)

    assert waiting_since(run, later, grace) == later.due_at - 3 * grace
    assert waiting_since(run, later, timedelta(hours=1)) == run.created_at
    assert waiting_since(run, due, grace) == due.due_at
