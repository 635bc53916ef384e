"""The recovery sweep (``_celery/recovery.py``) on an in-memory store: what it covers.

It pages through every active saga, however many, and moves a saga whose record it cannot
read out of the active index into the corrupt set, where ``saga-celery list --corrupt``
shows it, instead of logging it again at every sweep.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from structlog.testing import capture_logs

from saga_celery import SagaApp, SagaCorruptStateError
from saga_celery._celery.recovery import recover
from saga_celery._core.model import SagaRun
from saga_celery._store.base import Snapshot
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
