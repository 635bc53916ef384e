"""Worker start (SPEC section 1): settings assigned after ``SagaApp()`` are in force by then, so
the worker puts the unacked-restore options back and checks every saga task against the
visibility timeout again, refusing to start when one breaks it.

Each test builds a ``WorkController`` in this process, as ``celery worker`` does before it
connects to the broker; nothing connects and nothing starts.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery
from kombu.transport import redis as kombu_redis
from structlog.testing import capture_logs

from saga_celery import RollbackContext, SagaApp, SagaConfigError
from saga_celery._celery.routing import RESTORE_DEFAULTS
from saga_celery._store.memory import MemoryStore

BROKER = "redis://127.0.0.1:1/0"
"""A Redis broker URL nothing listens on: a worker that tried to connect would fail."""


@pytest.fixture
def redis_app() -> Iterator[Celery]:
    app = Celery("t", broker=BROKER, set_as_current=False)
    yield app
    app.close()


def build_worker(app: Celery) -> None:
    """What ``celery worker`` does up to its first connection to the broker."""
    app.WorkController(pool_cls="solo", concurrency=1, hostname="unit@test")


def noop(ctx: RollbackContext) -> None:
    return None


def test_restore_options_replaced_after_saga_app_are_merged_back(redis_app: Celery) -> None:
    """``broker_transport_options`` assigned after ``SagaApp()`` lose the restore options; the
    worker puts them back, keeping what the user set."""
    SagaApp(redis_app, store=MemoryStore())
    redis_app.conf.broker_transport_options = {"visibility_timeout": 600,
                                               "unacked_restore_interval": 7}
    build_worker(redis_app)
    assert redis_app.conf.broker_transport_options == {
        **RESTORE_DEFAULTS, "visibility_timeout": 600, "unacked_restore_interval": 7}


def test_step_over_a_visibility_timeout_set_after_decoration_refuses_the_worker(
        redis_app: Celery) -> None:
    """A step that fitted Celery's default visibility timeout when decorated, but not the one
    set afterwards, stops the worker from starting, naming the step and the timeout."""
    sagas = SagaApp(redis_app, store=MemoryStore())
    sagas.step(name="late.slow", retries={"limit": 0}, timeout="50 seconds")(noop)
    redis_app.conf.broker_transport_options = {"visibility_timeout": 30}
    with pytest.raises(SagaConfigError, match=r"'late\.slow'.*visibility_timeout \(30 s\)") as info:
        build_worker(redis_app)
    assert info.value.step == "late.slow"
    assert "worker" in str(info.value)


def test_rollback_over_a_visibility_timeout_set_after_decoration_refuses_the_worker(
        redis_app: Celery) -> None:
    """A rollback handler is checked at worker start too."""
    sagas = SagaApp(redis_app, store=MemoryStore())
    step = sagas.step(name="late.quick", retries={"limit": 0}, timeout="5 seconds")(noop)
    step.rollback(retries={"limit": 0}, timeout="50 seconds")(noop)
    redis_app.conf.broker_transport_options = {"visibility_timeout": 30}
    with pytest.raises(SagaConfigError, match=r"'rollback of late\.quick'.*visibility_timeout"):
        build_worker(redis_app)


def test_worker_starts_when_every_saga_task_fits(redis_app: Celery) -> None:
    """Steps and rollbacks that fit the visibility timeout in force let the worker start."""
    sagas = SagaApp(redis_app, store=MemoryStore())
    step = sagas.step(name="late.quick", retries={"limit": 0}, timeout="5 seconds")(noop)
    step.rollback(retries={"limit": 0}, timeout="5 seconds")(noop)
    redis_app.conf.broker_transport_options = {"visibility_timeout": 30}
    build_worker(redis_app)


def test_another_apps_worker_is_not_checked(redis_app: Celery) -> None:
    """The check belongs to the app the SagaApp was built on: another app's worker starts."""
    sagas = SagaApp(redis_app, store=MemoryStore())
    sagas.step(name="late.slow", retries={"limit": 0}, timeout="50 seconds")(noop)
    redis_app.conf.broker_transport_options = {"visibility_timeout": 30}
    other = Celery("other", broker=BROKER, set_as_current=False)
    other.conf.broker_transport_options = {"visibility_timeout": 30}
    build_worker(other)
    assert "unacked_restore_interval" not in other.conf.broker_transport_options
    other.close()


def test_a_kombu_that_ignores_the_restore_options_is_named_at_worker_start(
        redis_app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu before 5.7 ignores ``unacked_restore_interval`` and ``unacked_restore_throttle``:
    the worker says so in one warning line, with what it costs and what to do."""
    monkeypatch.delattr(kombu_redis.Channel, "unacked_restore_interval", raising=False)
    SagaApp(redis_app, store=MemoryStore())
    with capture_logs() as logs:
        build_worker(redis_app)
    [line] = [e for e in logs if e["event"] == "saga.restore_period_fixed"]
    assert line["log_level"] == "warning"
    assert "~100 s after the visibility timeout" in line["reason"]
    assert "upgrade kombu to 5.7" in line["reason"]


def test_a_kombu_that_reads_the_restore_options_starts_without_that_warning(
        redis_app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu 5.7 and later read the restore options: no warning."""
    monkeypatch.setattr(kombu_redis.Channel, "unacked_restore_interval", 10, raising=False)
    SagaApp(redis_app, store=MemoryStore())
    with capture_logs() as logs:
        build_worker(redis_app)
    assert [e for e in logs if e["event"] == "saga.restore_period_fixed"] == []
