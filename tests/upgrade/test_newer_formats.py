"""What a newer release writes is refused with a clear error and left untouched (SPEC 9)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import fakeredis
import pytest
from celery import Celery
from celery.exceptions import Reject

from saga_celery import SagaApp, SagaFormatError
from saga_celery._celery import tasks
from saga_celery._celery.control import CONTROL_KEY, Control
from saga_celery._celery.dispatch import build_message
from saga_celery._celery.recovery import recover
from saga_celery._store import RedisStore


def newer(client: Any, key: str) -> dict[bytes, bytes]:
    """Rewrite a stored saga as a release with format 5 might have: a field this one lacks."""
    progress = json.loads(client.hget(key, "d"))
    progress.update(format=5, waits_for={"approval": None})
    client.hset(key, "d", json.dumps(progress))
    stored: dict[bytes, bytes] = client.hgetall(key)
    return stored


@pytest.fixture
def sagas() -> SagaApp:
    app = Celery("newer", broker="memory://", set_as_current=False)
    sagas = SagaApp(app, store=RedisStore(fakeredis.FakeRedis()))

    @sagas.step(name="newer.a")
    def a() -> None:
        return None

    sagas.saga("newer", [a.s()]).apply_async(saga_id="n-1")
    return sagas


def test_a_saga_in_a_newer_format_is_refused_naming_it_and_left_untouched(
        sagas: SagaApp) -> None:
    """Reading it raises ``SagaFormatError`` naming the format; the record is as it was."""
    client = sagas._store._client  # type: ignore[attr-defined]
    before = newer(client, "saga:{n-1}:state")
    with pytest.raises(SagaFormatError, match=r"format 5.*newer.*formats \[1, 2, 3, 4\]"):
        sagas.run("n-1").status()
    assert client.hgetall("saga:{n-1}:state") == before


def test_the_sweep_skips_a_newer_saga_and_does_not_move_it_aside(sagas: SagaApp) -> None:
    """A newer release's saga is not unreadable data: it stays where it is, for that release."""
    client = sagas._store._client  # type: ignore[attr-defined]
    newer(client, "saga:{n-1}:state")
    recover(sagas._engine, sagas._dispatcher, grace=timedelta(0))
    assert sagas._store.active_ids() == ["n-1"]
    assert sagas._store.corrupt_records() == []


def test_a_message_in_a_newer_format_is_handed_back_not_run_or_dropped(
        sagas: SagaApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task message whose control says format 3 is rejected with requeue, for a worker that
    reads it; its body does not run."""
    monkeypatch.setattr(tasks, "FORMAT_PAUSE_S", 0.0)
    run = sagas._store.load("n-1").run  # type: ignore[union-attr]
    message = build_message(run, next(iter(run.outbox.values())), sagas._dispatcher.clock())
    message.kwargs[CONTROL_KEY]["v"] = 3
    result = sagas.app.tasks["newer.a"].apply(args=message.args, kwargs=message.kwargs)
    assert isinstance(result.result, Reject) and result.result.requeue
    assert sagas.run("n-1").status().step("newer.a").attempts == []


def test_every_message_says_its_format_and_one_without_reads_as_0_1_0s() -> None:
    """``v`` is in every control kwarg this release writes; a control without it is format 1."""
    control = Control.parse({"saga_id": "s", "kind": "step", "key": "a#1", "step": "a",
                             "count": 1, "attempt": 1})
    assert control.as_kwarg()["v"] == 2
    assert Control.parse(control.as_kwarg()) == control
