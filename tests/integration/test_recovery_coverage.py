"""The recovery sweep against a real Redis: every active saga, and none it cannot read twice.

No worker runs: messages go to Celery's in-memory broker, and what the sweep re-sends is
counted from its return value.  ``saga-celery`` runs as a real subprocess.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from structlog.testing import capture_logs

from saga_celery import SagaApp, SagaCorruptStateError
from saga_celery._celery.recovery import recover
from tests.integration.test_cli import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def sagas(redis_url: str, prefix: str) -> Iterator[SagaApp]:
    """A ``SagaApp`` on the real saga store and Celery's in-memory broker."""
    celery = Celery("sweep", broker="memory://", set_as_current=False)
    yield SagaApp(celery, redis_url=redis_url, prefix=prefix)
    celery.close()


def one_step(sagas: SagaApp) -> Any:
    """A one-step saga definition; starting it records its first message as due."""

    @sagas.step(name="sweep.reserve", retries={"limit": 0})
    def reserve() -> str:
        return "reserved"

    return sagas.saga("sweep", [reserve.s()])


def test_one_sweep_pages_through_every_active_saga(sagas: SagaApp) -> None:
    """With pages of 10, one sweep re-sends the lost first message of each of 25 sagas."""
    definition = one_step(sagas)
    for i in range(25):
        definition.apply_async(saga_id=f"s-{i:02d}")

    assert recover(sagas._engine, sagas._dispatcher, grace=timedelta(0),
                   page_size=10) == 25


def test_a_foreign_record_is_moved_aside_once_and_listed(
    sagas: SagaApp, redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    """A saga whose state key holds a foreign value leaves the active index at the first
    sweep (logged once), is not swept again, and ``saga-celery list --corrupt`` names it."""
    definition = one_step(sagas)
    definition.apply_async(saga_id="healthy")
    redis_client.set(f"{prefix}{{broken}}:state", "foreign")
    with pytest.raises(SagaCorruptStateError):
        definition.apply_async(saga_id="broken")  # in the active index, as any commit puts it

    with capture_logs() as first:
        assert sagas.recover(grace=0) == 1
    with capture_logs() as second:
        sagas.recover(grace=0)
    listed = run_cli("--redis-url", redis_url, "--prefix", prefix, "list", "--corrupt")

    assert [e["saga_id"] for e in first if e["log_level"] == "error"] == ["broken"]
    assert [e for e in second if e["log_level"] == "error"] == []
    assert "broken" not in sagas._store.active_ids()
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert rows[0].split() == ["id", "moved_at", "why"]
    assert rows[1].startswith("broken  20")
    assert f"{prefix}{{broken}}:state holds the wrong Redis type" in rows[1]
    assert len(rows) == 2
