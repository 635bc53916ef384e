"""Saga metrics in Prometheus format, served by ``saga-celery metrics --port P``.

Needs prometheus-client, from the ``saga-celery[metrics]`` extra.

Three parts, from pure to I/O:

- ``SagaMetrics`` turns lifecycle events into counters, histograms and a gauge on a
  ``CollectorRegistry`` of its own.  It does no I/O and reads no clock: an event counts when
  its own timestamp is at or after ``since`` (the exporter's start); earlier events only
  teach it what is in flight, so an attempt that started before the exporter still gets its
  full duration, and history is never counted twice by a restarted exporter.
- ``MetricsExporter`` finds sagas through the store's index (those created since its last
  poll, and every active one) and tails each one's event stream, from its first event,
  until the saga's terminal event.
- ``MetricsServer`` serves the registry on ``/metrics`` and polls the exporter every
  interval until told to stop.

Exported (``saga`` is the saga's name, ``step`` a step's name: both bounded by the code)::

    saga_started_total{saga}                        saga_started events
    saga_completed_total{saga}                      saga_completed
    saga_errored_total{saga}                        saga_errored (first time only)
    saga_terminated_total{saga}                     saga_terminated (first time only)
    saga_rollbacks_total{saga,outcome}              rollback_completed / rollback_errored
    saga_step_attempt_duration_seconds{step,outcome}      attempt_started -> completed/errored
    saga_rollback_attempt_duration_seconds{step,outcome}  the same for rollback attempts
    saga_active{saga}                               sagas seen and not yet ended
    saga_exporter_up                                1 if the last poll read the store
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from saga_celery._errors import SagaCorruptStateError, SagaError
from saga_celery._extras import MissingExtraError
from saga_celery._store.base import SagaStore

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
except ImportError as exc:
    raise MissingExtraError("metrics", "prometheus-client",
                            needed_by="saga_celery.metrics") from exc

__all__ = ["DURATION_BUCKETS", "MetricsExporter", "MetricsServer", "SagaMetrics"]

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                    300.0, 600.0, 1800.0)
"""Seconds: from sub-second steps up to past the default 10 minute attempt timeout."""

_ATTEMPT_STARTS = {"attempt_started": "step", "rollback_attempt_started": "rollback"}
_ATTEMPT_ENDS = {
    "attempt_completed": ("step", "success"),
    "attempt_errored": ("step", "failure"),
    "rollback_attempt_completed": ("rollback", "success"),
    "rollback_attempt_errored": ("rollback", "failure"),
}
_ROLLBACK_ENDS = {"rollback_completed": "complete", "rollback_errored": "failed"}
_SAGA_ENDS = ("saga_completed", "saga_errored", "saga_terminated")

AttemptKey = tuple[str, str, int, int]
"""(kind, step, count, attempt): one attempt of one step of a saga."""


@dataclass
class _Tracked:
    """What ``SagaMetrics`` remembers of a saga between its events."""

    name: str
    starts: dict[AttemptKey, datetime] = field(default_factory=dict)
    resumed: bool = False
    """A resumed rollback (``retry_rollback``) runs: its saga was counted as ended once."""


class SagaMetrics:
    """Lifecycle events in, Prometheus metrics out.  Pure: no I/O, no clock."""

    def __init__(self, registry: CollectorRegistry, *, since: datetime | None = None) -> None:
        self.since = since
        """Events stamped earlier are not counted (None: every event counts)."""
        self._sagas: dict[str, _Tracked] = {}

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, ("step", "outcome"), buckets=DURATION_BUCKETS,
                             registry=registry)

        self.started = counter("saga_started", "Sagas whose first step started.", "saga")
        self.completed = counter("saga_completed", "Sagas that completed.", "saga")
        self.errored = counter("saga_errored", "Sagas that failed and ended.", "saga")
        self.terminated = counter("saga_terminated", "Sagas terminated by request.", "saga")
        self.rollbacks = counter("saga_rollbacks", "Rollbacks that ended, by outcome "
                                 "(complete or failed).", "saga", "outcome")
        self.step_duration = histogram("saga_step_attempt_duration_seconds",
                                       "Duration of step attempts, by outcome.")
        self.rollback_duration = histogram("saga_rollback_attempt_duration_seconds",
                                           "Duration of rollback attempts, by outcome.")
        self.active = Gauge("saga_active", "Sagas seen and not yet ended.", ("saga",),
                            registry=registry)

    def tracks(self, saga_id: str) -> bool:
        """Whether the saga has been seen and has not ended."""
        return saga_id in self._sagas

    def observe(self, name: str, event: Mapping[str, Any]) -> bool:
        """Apply one event of a saga called ``name``; True if the saga ended with it."""
        saga_id = str(event["saga_id"])
        tracked = self._sagas.get(saga_id)
        if tracked is None:
            tracked = self._sagas[saga_id] = _Tracked(name)
            self.active.labels(name).inc()
        kind = str(event["type"])
        at = datetime.fromisoformat(str(event["timestamp"]))
        counts = self.since is None or at >= self.since
        if kind in _ATTEMPT_STARTS:
            tracked.starts.setdefault(_attempt_key(_ATTEMPT_STARTS[kind], event), at)
        elif kind in _ATTEMPT_ENDS:
            self._attempt_ended(tracked, kind, event, at, counts)
        elif kind == "rollback_started":
            tracked.resumed = tracked.resumed or bool(event.get("resumed"))
        elif counts and kind == "saga_started":
            self.started.labels(name).inc()
        elif counts and kind in _ROLLBACK_ENDS:
            self.rollbacks.labels(name, _ROLLBACK_ENDS[kind]).inc()
        if kind in _SAGA_ENDS:
            self._saga_ended(saga_id, tracked, kind, counts)
            return True
        return False

    def forget(self, saga_id: str) -> None:
        """Stop tracking a saga that will send no more events (its record is gone)."""
        tracked = self._sagas.pop(saga_id, None)
        if tracked is not None:
            self.active.labels(tracked.name).dec()

    def _attempt_ended(self, tracked: _Tracked, kind: str, event: Mapping[str, Any],
                       at: datetime, counts: bool) -> None:
        which, outcome = _ATTEMPT_ENDS[kind]
        started = tracked.starts.pop(_attempt_key(which, event), None)
        if started is None or not counts:
            return
        histogram = self.step_duration if which == "step" else self.rollback_duration
        # Start and end may be stamped by two workers' clocks: never a negative duration.
        seconds = max((at - started).total_seconds(), 0.0)
        histogram.labels(str(event["step"]), outcome).observe(seconds)

    def _saga_ended(self, saga_id: str, tracked: _Tracked, kind: str, counts: bool) -> None:
        del self._sagas[saga_id]
        self.active.labels(tracked.name).dec()
        if not counts:
            return
        if kind == "saga_completed":
            self.completed.labels(tracked.name).inc()
        elif not tracked.resumed:
            ended = self.errored if kind == "saga_errored" else self.terminated
            ended.labels(tracked.name).inc()


def _attempt_key(kind: str, event: Mapping[str, Any]) -> AttemptKey:
    return (kind, str(event["step"]), int(event["count"]), int(event["attempt"]))


@dataclass
class _Cursor:
    name: str
    last: str = "0"
    """Stream id of the last event fed to ``SagaMetrics``."""


class MetricsExporter:
    """Finds sagas in the store and feeds their new events to ``SagaMetrics`` on each poll.

    Sagas are found among the newest ids of the index (``list_ids``: the newest ``page`` on
    the first poll, then those created since the previous poll; the scan widens, up to
    ``max_scan`` ids, while every id it sees is new) and the active ids (sagas already
    running when the exporter started, and ended sagas resumed by ``retry_rollback``).  A
    saga is read from its first event and dropped after its terminal event; the last
    ``remember`` dropped ones keep their stream position, so that a resumed rollback is read
    on from where it stopped.
    """

    def __init__(self, store: SagaStore, metrics: SagaMetrics, *, page: int = 100,
                 max_scan: int = 10_000, max_active: int = 10_000,
                 remember: int = 10_000) -> None:
        self.store = store
        self.metrics = metrics
        self.page, self.max_scan, self.max_active = page, max_scan, max_active
        self.remember = remember
        self._cursors: dict[str, _Cursor] = {}
        self._ended: OrderedDict[str, _Cursor] = OrderedDict()
        self._recent: set[str] | None = None

    @property
    def tracked(self) -> list[str]:
        """Ids of the sagas being tailed."""
        return list(self._cursors)

    def poll(self) -> int:
        """Find new and active sagas, feed every new event; returns how many were fed."""
        for saga_id in self._discover():
            self._track(saga_id)
        return sum(self._tail(saga_id) for saga_id in list(self._cursors))

    def _discover(self) -> list[str]:
        newest = self._newest()
        # The first poll reads the newest page whole: sagas created between the exporter's
        # start and this poll count, and the older ones' events are before ``since``.
        fresh = newest if self._recent is None else [i for i in newest if i not in self._recent]
        self._recent = set(newest)
        return [*fresh, *self.store.active_ids(self.max_active)]

    def _newest(self) -> list[str]:
        limit = self.page
        while True:
            ids = self.store.list_ids(limit)
            widen = (self._recent is not None and len(ids) == limit and limit < self.max_scan
                     and not any(i in self._recent for i in ids))
            if not widen:
                return ids
            limit = min(limit * 4, self.max_scan)

    def _track(self, saga_id: str) -> None:
        if saga_id in self._cursors:
            return
        cursor = self._ended.pop(saga_id, None)
        if cursor is None:
            try:
                snapshot = self.store.load(saga_id)
            except SagaCorruptStateError:
                return  # not a saga this version can read: nothing to measure
            if snapshot is None:
                return
            cursor = _Cursor(snapshot.run.name)
        self._cursors[saga_id] = cursor

    def _tail(self, saga_id: str) -> int:
        cursor = self._cursors[saga_id]
        events = self.store.read_events(saga_id, after=cursor.last)
        for stream_id, event in events:
            cursor.last = stream_id
            self.metrics.observe(cursor.name, event)
        if not self.metrics.tracks(saga_id):
            self._end(saga_id)
        return len(events)

    def _end(self, saga_id: str) -> None:
        self._ended[saga_id] = self._cursors.pop(saga_id)
        while len(self._ended) > self.remember:
            self._ended.popitem(last=False)


class MetricsServer:
    """``/metrics`` over HTTP, and the exporter polled every ``interval`` seconds."""

    def __init__(self, exporter: MetricsExporter, registry: CollectorRegistry, *,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.exporter = exporter
        self.registry = registry
        self.on_error = on_error
        self.up = Gauge("saga_exporter_up", "1 if the exporter's last poll read the store.",
                        registry=registry)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @classmethod
    def for_store(cls, store: SagaStore, *, since: datetime | None = None,
                  on_error: Callable[[str], None] | None = None) -> MetricsServer:
        """A server of ``store``'s metrics on a registry of its own (``since``: as
        ``SagaMetrics``)."""
        registry = CollectorRegistry()
        exporter = MetricsExporter(store, SagaMetrics(registry, since=since))
        return cls(exporter, registry, on_error=on_error)

    def start(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` in a daemon thread; returns the port (``port=0``: a free one)."""
        self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        return int(self._server.server_port)

    def poll(self) -> None:
        """One poll; a store failure sets ``saga_exporter_up`` to 0 and is reported, not raised."""
        try:
            self.exporter.poll()
        except SagaError as exc:
            self.up.set(0)
            if self.on_error is not None:
                self.on_error(str(exc))
        else:
            self.up.set(1)

    def run(self, interval: float, stop: threading.Event) -> None:
        """Poll every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            self.poll()
            stop.wait(interval)

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
