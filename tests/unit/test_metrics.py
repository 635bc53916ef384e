"""Saga metrics: lifecycle events in, Prometheus counters, histograms and gauges out.

Sagas are driven through the engine on the in-memory store with a settable clock, so event
timestamps (and so attempt durations) are exact.  ``SagaMetrics`` is fed their events
directly; ``MetricsExporter`` finds them in the store itself.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from saga_celery._core.events import (
    AttemptFailed,
    AttemptStarted,
    AttemptSucceeded,
    RetryRollbackRequested,
    TerminateRequested,
)
from saga_celery._core.model import ErrorInfo, Kind
from saga_celery._engine import Engine
from saga_celery._errors import SagaStoreUnavailableError
from saga_celery._store.memory import MemoryStore
from saga_celery.metrics import MetricsExporter, MetricsServer, SagaMetrics
from tests.unit.sim import plan

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BOOM = ErrorInfo(type="RuntimeError", message="boom")


class Shop:
    """An engine on the in-memory store whose clock the test moves."""

    def __init__(self) -> None:
        self.now = T0
        self.store = MemoryStore()
        self.engine = Engine(self.store, clock=lambda: self.now)

    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def start(self, saga_id: str, *steps: str, name: str = "order") -> None:
        self.engine.submit(saga_id=saga_id, name=name, plan=plan(*steps), params={})

    def run(self, saga_id: str, step: str, seconds: float, *, ok: bool = True,
            kind: Kind = Kind.STEP, attempt: int = 1) -> None:
        """One attempt of ``step`` that takes ``seconds`` and succeeds or fails for good."""
        key = f"{step}#1"
        self.engine.handle(saga_id, AttemptStarted(kind=kind, key=key, attempt=attempt))
        self.tick(seconds)
        end = (AttemptSucceeded(kind=kind, key=key, attempt=attempt) if ok else
               AttemptFailed(kind=kind, key=key, attempt=attempt, error=BOOM, retryable=False))
        self.engine.handle(saga_id, end)

    def events(self, saga_id: str) -> list[dict[str, Any]]:
        return [event for _, event in self.store.read_events(saga_id)]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def fed(shop: Shop, *saga_ids: str, since: datetime | None = None
        ) -> tuple[CollectorRegistry, SagaMetrics]:
    registry = CollectorRegistry()
    metrics = SagaMetrics(registry, since=since)
    for saga_id in saga_ids:
        for event in shop.events(saga_id):
            metrics.observe("order", event)
    return registry, metrics


def _failed_order(shop: Shop, saga_id: str, *, release_ok: bool = True) -> None:
    """reserve ok (1 s), charge fails (2 s); refund ok (0.5 s), release ok or not (0.25 s)."""
    shop.start(saga_id, "reserve", "charge")
    shop.run(saga_id, "reserve", 1.0)
    shop.run(saga_id, "charge", 2.0, ok=False)
    shop.run(saga_id, "charge", 0.5, kind=Kind.ROLLBACK)
    shop.run(saga_id, "reserve", 0.25, kind=Kind.ROLLBACK, ok=release_ok)


# --- SagaMetrics --------------------------------------------------------------------------


def test_a_completed_saga_counts_started_completed_and_step_durations() -> None:
    """A saga that completes: started and completed once, each attempt's duration observed."""
    shop = Shop()
    shop.start("o-1", "reserve", "charge")
    shop.run("o-1", "reserve", 1.5)
    shop.run("o-1", "charge", 0.25)

    registry, _ = fed(shop, "o-1")

    assert sample(registry, "saga_started_total", saga="order") == 1
    assert sample(registry, "saga_completed_total", saga="order") == 1
    assert sample(registry, "saga_errored_total", saga="order") == 0
    step = "saga_step_attempt_duration_seconds"
    assert sample(registry, f"{step}_count", step="reserve", outcome="success") == 1
    assert sample(registry, f"{step}_sum", step="reserve", outcome="success") == 1.5
    assert sample(registry, f"{step}_sum", step="charge", outcome="success") == 0.25
    assert sample(registry, f"{step}_bucket", step="charge", outcome="success", le="0.25") == 1
    assert sample(registry, f"{step}_bucket", step="charge", outcome="success", le="0.1") == 0


def test_a_failed_saga_counts_errored_a_complete_rollback_and_rollback_durations() -> None:
    """A saga that fails and rolls back: errored, rollback complete, failure and rollback
    attempt durations by step and outcome."""
    shop = Shop()
    _failed_order(shop, "o-2")

    registry, _ = fed(shop, "o-2")

    assert sample(registry, "saga_errored_total", saga="order") == 1
    assert sample(registry, "saga_completed_total", saga="order") == 0
    assert sample(registry, "saga_rollbacks_total", saga="order", outcome="complete") == 1
    assert sample(registry, "saga_rollbacks_total", saga="order", outcome="failed") == 0
    step, rollback = "saga_step_attempt_duration_seconds", "saga_rollback_attempt_duration_seconds"
    assert sample(registry, f"{step}_sum", step="charge", outcome="failure") == 2.0
    assert sample(registry, f"{rollback}_sum", step="charge", outcome="success") == 0.5
    assert sample(registry, f"{rollback}_sum", step="reserve", outcome="success") == 0.25


def test_a_resumed_rollback_counts_both_rollbacks_but_the_saga_errored_once() -> None:
    """``retry_rollback`` after a failed rollback: rollbacks failed 1 and complete 1, and the
    saga, errored again at the end, is still counted as errored once."""
    shop = Shop()
    _failed_order(shop, "o-3", release_ok=False)
    shop.engine.handle("o-3", RetryRollbackRequested())
    shop.run("o-3", "reserve", 0.1, kind=Kind.ROLLBACK, attempt=2)

    registry, metrics = fed(shop, "o-3")

    assert sample(registry, "saga_rollbacks_total", saga="order", outcome="failed") == 1
    assert sample(registry, "saga_rollbacks_total", saga="order", outcome="complete") == 1
    assert sample(registry, "saga_errored_total", saga="order") == 1
    rollback = "saga_rollback_attempt_duration_seconds"
    assert sample(registry, f"{rollback}_count", step="reserve", outcome="failure") == 1
    assert sample(registry, f"{rollback}_count", step="reserve", outcome="success") == 1
    assert not metrics.tracks("o-3")


def test_a_terminated_saga_counts_terminated() -> None:
    """``terminate(rollback=True)``: terminated once, and its rollback counted."""
    shop = Shop()
    shop.start("o-4", "reserve", "charge")
    shop.run("o-4", "reserve", 1.0)
    shop.engine.handle("o-4", TerminateRequested(rollback=True))
    shop.run("o-4", "reserve", 0.5, kind=Kind.ROLLBACK)

    registry, _ = fed(shop, "o-4")

    assert sample(registry, "saga_terminated_total", saga="order") == 1
    assert sample(registry, "saga_errored_total", saga="order") == 0
    assert sample(registry, "saga_rollbacks_total", saga="order", outcome="complete") == 1


def test_the_active_gauge_counts_sagas_seen_and_not_ended() -> None:
    """``saga_active`` rises when a saga is first seen and falls at its terminal event."""
    shop = Shop()
    shop.start("o-5", "reserve")
    registry, metrics = fed(shop, "o-5")
    assert sample(registry, "saga_active", saga="order") == 1
    assert metrics.tracks("o-5")

    shop.run("o-5", "reserve", 1.0)
    for event in shop.events("o-5")[1:]:
        metrics.observe("order", event)

    assert sample(registry, "saga_active", saga="order") == 0
    assert not metrics.tracks("o-5")


def test_events_before_since_are_not_counted_but_time_attempts_that_end_after() -> None:
    """Events stamped before ``since`` count nothing, yet an attempt that started before it
    and ends after it is observed with its whole duration."""
    shop = Shop()
    shop.start("o-6", "reserve")
    shop.engine.handle("o-6", AttemptStarted(kind=Kind.STEP, key="reserve#1", attempt=1))
    since = shop.now + timedelta(seconds=1)
    shop.tick(3)
    shop.engine.handle("o-6", AttemptSucceeded(kind=Kind.STEP, key="reserve#1", attempt=1))

    registry, _ = fed(shop, "o-6", since=since)

    assert sample(registry, "saga_started_total", saga="order") == 0
    assert sample(registry, "saga_completed_total", saga="order") == 1
    assert sample(registry, "saga_step_attempt_duration_seconds_sum", step="reserve",
                  outcome="success") == 3.0


def test_a_duration_across_skewed_clocks_is_never_negative() -> None:
    """An end stamped before its start (two workers' clocks) is observed as 0 seconds."""
    registry = CollectorRegistry()
    metrics = SagaMetrics(registry)
    ids = {"saga_id": "x", "step": "reserve", "count": 1, "attempt": 1}
    metrics.observe("order", {**ids, "type": "attempt_started",
                              "timestamp": "2026-01-01T00:00:02+00:00"})
    metrics.observe("order", {**ids, "type": "attempt_completed",
                              "timestamp": "2026-01-01T00:00:01+00:00"})

    assert sample(registry, "saga_step_attempt_duration_seconds_count", step="reserve",
                  outcome="success") == 1
    assert sample(registry, "saga_step_attempt_duration_seconds_sum", step="reserve",
                  outcome="success") == 0


# --- MetricsExporter ------------------------------------------------------------------------


def exporter(shop: Shop, *, since: datetime | None = None, **options: Any
             ) -> tuple[CollectorRegistry, MetricsExporter]:
    registry = CollectorRegistry()
    return registry, MetricsExporter(shop.store, SagaMetrics(registry, since=since), **options)


def test_the_exporter_tails_new_sagas_and_drops_them_once_ended() -> None:
    """Sagas created after the first poll are found in the index, read as they go, and no
    longer tailed after their terminal event."""
    shop = Shop()
    registry, export = exporter(shop)
    export.poll()
    shop.start("n-1", "reserve")
    shop.start("n-2", "reserve", "charge")
    shop.run("n-1", "reserve", 1.0)

    export.poll()
    assert sorted(export.tracked) == ["n-2"]
    for step in ("reserve", "charge"):
        shop.run("n-2", step, 0.5)
    export.poll()

    assert export.tracked == []
    assert sample(registry, "saga_completed_total", saga="order") == 2
    assert sample(registry, "saga_started_total", saga="order") == 2
    assert export.poll() == 0


def test_the_exporter_picks_up_running_sagas_without_counting_their_past() -> None:
    """A saga already running when the exporter starts is tailed from its first event, but
    only what happens after ``since`` is counted."""
    shop = Shop()
    shop.start("p-1", "reserve", "charge")
    shop.run("p-1", "reserve", 1.0)
    shop.tick(1)
    registry, export = exporter(shop, since=shop.now)

    export.poll()
    assert export.tracked == ["p-1"]
    shop.run("p-1", "charge", 2.0)
    export.poll()

    assert sample(registry, "saga_started_total", saga="order") == 0
    assert sample(registry, "saga_completed_total", saga="order") == 1
    assert sample(registry, "saga_step_attempt_duration_seconds_count", step="reserve",
                  outcome="success") == 0
    assert sample(registry, "saga_step_attempt_duration_seconds_sum", step="charge",
                  outcome="success") == 2.0


def test_the_exporter_counts_sagas_created_before_its_first_poll() -> None:
    """A saga created after ``since`` but ended before the first poll is still counted."""
    shop = Shop()
    registry, export = exporter(shop, since=shop.now)
    shop.start("f-1", "reserve")
    shop.run("f-1", "reserve", 1.0)

    export.poll()

    assert sample(registry, "saga_completed_total", saga="order") == 1


def test_the_exporter_resumes_an_ended_saga_whose_rollback_is_retried() -> None:
    """An errored saga whose rollback is retried becomes active again: the exporter reads on
    from where it stopped, counting the resumed rollback once."""
    shop = Shop()
    registry, export = exporter(shop)
    export.poll()
    _failed_order(shop, "r-1", release_ok=False)
    export.poll()
    assert export.tracked == []

    shop.engine.handle("r-1", RetryRollbackRequested())
    export.poll()
    assert export.tracked == ["r-1"]
    shop.run("r-1", "reserve", 0.1, kind=Kind.ROLLBACK, attempt=2)
    export.poll()

    assert export.tracked == []
    assert sample(registry, "saga_rollbacks_total", saga="order", outcome="failed") == 1
    assert sample(registry, "saga_rollbacks_total", saga="order", outcome="complete") == 1
    assert sample(registry, "saga_errored_total", saga="order") == 1


def test_the_exporter_widens_its_scan_when_every_new_id_is_new() -> None:
    """More sagas created between two polls than one page holds are all found."""
    shop = Shop()
    registry, export = exporter(shop, page=2)
    export.poll()
    for i in range(7):
        shop.tick(0.01)
        shop.start(f"w-{i}", "reserve")
        shop.run(f"w-{i}", "reserve", 0.01)

    export.poll()

    assert sample(registry, "saga_completed_total", saga="order") == 7


# --- MetricsServer ----------------------------------------------------------------------------


class _DownStore(MemoryStore):
    def list_ids(self, limit: int = 100) -> list[str]:
        raise SagaStoreUnavailableError("Redis at h:1/0 cannot be reached")


def test_a_poll_that_cannot_read_the_store_reports_and_sets_up_to_zero() -> None:
    """A store failure during a poll is reported through ``on_error``, not raised, and
    ``saga_exporter_up`` says 0 until a poll succeeds."""
    registry = CollectorRegistry()
    store = _DownStore()
    errors: list[str] = []
    server = MetricsServer(MetricsExporter(store, SagaMetrics(registry)), registry,
                           on_error=errors.append)

    server.poll()

    assert errors == ["Redis at h:1/0 cannot be reached"]
    assert sample(registry, "saga_exporter_up") == 0


def test_the_server_serves_on_a_free_port_and_closes() -> None:
    """``start(0)`` serves on a free port it returns; ``close()`` stops serving."""
    registry = CollectorRegistry()
    server = MetricsServer(MetricsExporter(MemoryStore(), SagaMetrics(registry)), registry)
    bound = server.start(0, "127.0.0.1")
    server.poll()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{bound}/metrics", timeout=5) as reply:
            assert "saga_exporter_up 1.0" in reply.read().decode()
    finally:
        server.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{bound}/metrics", timeout=2)
