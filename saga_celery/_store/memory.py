"""``MemoryStore``: the in-memory twin of ``RedisStore``, for fast tests.

Same semantics, under one lock: runs are kept as their JSON (so a load round-trips exactly
as from Redis), version and lease conflicts write nothing, leases and retention expire by
an injected clock, and ``read_events(block_ms=...)`` waits on a condition.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import PydanticSerializationError, to_json

from saga_celery._core.model import Plan, SagaRun
from saga_celery._errors import SagaConfigError, SagaStateError, SagaStoreError
from saga_celery._store.base import (
    CorruptRecord,
    EventDict,
    LeaseAction,
    LeaseChange,
    Snapshot,
    SweepRecord,
    Timer,
)
from saga_celery._store.encoding import decode_run, encode_progress
from saga_celery._store.keys import index_score


@dataclass
class _Record:
    version: int
    data: str
    """The run's progress JSON (``encode_progress``): the plan is kept once, as in Redis."""
    plan: Plan
    terminal: bool = False
    events: list[tuple[tuple[int, int], str]] = field(default_factory=list)
    expires_at: float | None = None


@dataclass(frozen=True)
class _Lease:
    token: str
    expires_at: float


class MemoryStore:
    """A ``SagaStore`` in plain dicts; ``clock`` (seconds) drives leases and retention."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, retention_ms: int | None = None
    ) -> None:
        if retention_ms is not None and retention_ms <= 0:
            raise SagaConfigError(f"retention_ms must be positive or None, not {retention_ms}")
        self._clock = clock
        self._retention_ms = retention_ms
        self._changed = threading.Condition(threading.Lock())
        self._records: dict[str, _Record] = {}
        self._leases: dict[tuple[str, str], _Lease] = {}
        self._index: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._corrupt: dict[str, tuple[int, str]] = {}
        self._last_event = 0
        self._sweep: SweepRecord | None = None
        self._timers: dict[tuple[str, str], int] = {}

    def ping(self) -> None:
        return None

    def create(self, run: SagaRun, events: Sequence[EventDict],
               timers: Sequence[Timer] = ()) -> bool:
        lines = _encode_events(run.id, events)
        with self._changed:
            self._index.setdefault(run.id, index_score(run))
            self._active.setdefault(run.id, index_score(run))
            if self._record(run.id) is not None:
                return False
            record = _Record(version=1, data=encode_progress(run), plan=run.plan)
            self._records[run.id] = record
            self._append(record, lines)
            self._add_timers(timers)
            return True

    def load(self, saga_id: str, *, lease: str | None = None) -> Snapshot | None:
        with self._changed:
            record = self._record(saga_id)
            if record is None:
                return None
            holder = self._holder(saga_id, lease) if lease is not None else None
            version, data, plan = record.version, record.data, record.plan
        return Snapshot(run=decode_run(data, plan), version=version, lease_holder=holder)

    def load_runs(self, saga_ids: Sequence[str]) -> list[SagaRun | None]:
        return [None if (found := self.load(saga_id)) is None else found.run
                for saga_id in saga_ids]

    def commit(
        self,
        run: SagaRun,
        *,
        version: int,
        events: Sequence[EventDict],
        lease: LeaseChange | None = None,
        terminal: bool = False,
        journal: bytes | None = None,  # always written in full here
        timers: Sequence[Timer] = (),
    ) -> bool:
        committed = self._commit(run, version, events, lease, terminal)
        if committed:
            self.add_timers(timers)
        return committed

    def _commit(self, run: SagaRun, version: int, events: Sequence[EventDict],
                lease: LeaseChange | None, terminal: bool) -> bool:
        if lease is not None and lease.action is LeaseAction.ACQUIRE:
            _check_ttl(lease.ttl_ms)
        lines = _encode_events(run.id, events)
        with self._changed:
            record = self._record(run.id)
            if record is None or record.version != version or self._lease_taken(run.id, lease):
                # The active index stays a superset, as in Redis after a refused terminal commit.
                self._active.setdefault(run.id, index_score(run))
                return False
            record.version, record.data = version + 1, encode_progress(run)
            self._append(record, lines)
            self._apply_lease(run.id, lease)
            self._finish(run, record, terminal)
            return True

    def renew_lease(self, saga_id: str, name: str, token: str, ttl_ms: int) -> bool:
        _check_ttl(ttl_ms)
        with self._changed:
            if self._holder(saga_id, name) != token:
                return False
            self._leases[saga_id, name] = _Lease(token, self._clock() + ttl_ms / 1000)
            return True

    def release_lease(self, saga_id: str, name: str, token: str) -> bool:
        with self._changed:
            if self._holder(saga_id, name) != token:
                return False
            del self._leases[saga_id, name]
            return True

    def read_events(
        self,
        saga_id: str,
        *,
        after: str = "0",
        count: int | None = None,
        block_ms: int | None = None,
    ) -> list[tuple[str, dict[str, Any]]]:
        if count is not None and count < 1:
            raise ValueError(f"count must be positive or None, not {count}")
        start = _parse_stream_id(saga_id, after)
        timeout = max(block_ms or 0, 0) / 1000
        with self._changed:
            self._changed.wait_for(lambda: bool(self._newer(saga_id, start)), timeout)
            entries = self._newer(saga_id, start)
        if count is not None:
            entries = entries[:count]
        return [(f"{ms}-{seq}", json.loads(data)) for (ms, seq), data in entries]

    def active_ids(self, limit: int = 1000) -> list[str]:
        with self._changed:
            ranked = sorted(self._active.items(), key=lambda item: (item[1], item[0]))
        return [saga_id for saga_id, _ in ranked[: max(limit, 0)]]

    def active_page(self, after_ms: int | None = None, count: int = 1000
                    ) -> tuple[list[str], int | None]:
        _check_count(count)
        with self._changed:
            ranked = sorted((score, saga_id) for saga_id, score in self._active.items()
                            if after_ms is None or score > after_ms)
        if len(ranked) < count:
            return [saga_id for _, saga_id in ranked], None
        last = ranked[count - 1][0]
        return [saga_id for score, saga_id in ranked if score <= last], last

    def mark_corrupt(self, saga_id: str, why: str, *, at_ms: int) -> None:
        with self._changed:
            self._corrupt[saga_id] = (at_ms, why)
            self._active.pop(saga_id, None)

    def corrupt_records(self, limit: int = 100) -> list[CorruptRecord]:
        with self._changed:
            records = [CorruptRecord(saga_id, at_ms, why)
                       for saga_id, (at_ms, why) in self._corrupt.items()]
        records.sort(key=lambda record: (record.at_ms, record.saga_id), reverse=True)
        return records[: max(limit, 0)]

    def list_ids(self, limit: int = 100) -> list[str]:
        with self._changed:
            ranked = sorted(self._index.items(), key=lambda item: (item[1], item[0]), reverse=True)
        return [saga_id for saga_id, _ in ranked[: max(limit, 0)]]

    def forget_active(self, saga_id: str) -> None:
        with self._changed:
            record = self._record(saga_id)
            if record is None or record.terminal:  # a revived saga stays
                self._active.pop(saga_id, None)

    def prune_index(self, limit: int = 1000) -> int:
        with self._changed:
            oldest = sorted(self._index.items(), key=lambda item: (item[1], item[0]))[:limit]
            gone = [saga_id for saga_id, _ in oldest if self._record(saga_id) is None]
            for saga_id in gone:
                del self._index[saga_id]
        return len(gone)

    # -- timers ----------------------------------------------------------------------------

    def add_timers(self, timers: Sequence[Timer]) -> None:
        with self._changed:
            self._add_timers(timers)

    def _add_timers(self, timers: Sequence[Timer]) -> None:
        """``add_timers`` under the lock."""
        for timer in timers:
            self._timers.setdefault((timer.saga_id, timer.dispatch_id), timer.due_ms)

    def claim_timers(self, now_ms: int, hold_ms: int, limit: int = 100) -> list[Timer]:
        with self._changed:
            due = sorted((due_ms, name) for name, due_ms in self._timers.items()
                         if due_ms <= now_ms)[:max(limit, 0)]
            for _, name in due:
                self._timers[name] = now_ms + hold_ms
        return [Timer(saga_id, dispatch, due_ms) for due_ms, (saga_id, dispatch) in due]

    def drop_timer(self, timer: Timer) -> None:
        with self._changed:
            self._timers.pop((timer.saga_id, timer.dispatch_id), None)

    def timers(self) -> list[Timer]:
        """Every timer recorded, the next due first (a claimed one: when its claim lapses):
        what ``saga_celery.testing`` counts as falling due on its virtual clock."""
        with self._changed:
            due = sorted((due_ms, name) for name, due_ms in self._timers.items())
        return [Timer(saga_id, dispatch, due_ms) for due_ms, (saga_id, dispatch) in due]

    # -- finished sagas (``history.py``): kept whole here, nothing to compact -------------

    def delete(self, saga_id: str) -> bool:
        with self._changed:
            record = self._record(saga_id)
            if record is not None and not record.terminal:
                raise SagaStateError(f"saga {saga_id!r} is still running: only a finished "
                                     "saga can be deleted (terminate it first)",
                                     saga_id=saga_id)
            self._records.pop(saga_id, None)
            self._index.pop(saga_id, None)
            self._active.pop(saga_id, None)
        return record is not None

    def finish_pending(self, older_than_ms: int = 60_000, limit: int = 1000) -> int:
        return 0

    # -- helpers (called with the lock held) ----------------------------------------------

    def _record(self, saga_id: str) -> _Record | None:
        record = self._records.get(saga_id)
        expires_at = record.expires_at if record is not None else None
        if expires_at is not None and self._clock() >= expires_at:
            del self._records[saga_id]
            return None
        return record

    def _holder(self, saga_id: str, name: str) -> str | None:
        lease = self._leases.get((saga_id, name))
        if lease is None:
            return None
        if self._clock() >= lease.expires_at:
            del self._leases[saga_id, name]
            return None
        return lease.token

    def _lease_taken(self, saga_id: str, lease: LeaseChange | None) -> bool:
        if lease is None or lease.action is not LeaseAction.ACQUIRE:
            return False
        return self._holder(saga_id, lease.name) not in (None, lease.token)

    def _apply_lease(self, saga_id: str, lease: LeaseChange | None) -> None:
        if lease is None:
            return
        if lease.action is LeaseAction.ACQUIRE:
            expires_at = self._clock() + lease.ttl_ms / 1000
            self._leases[saga_id, lease.name] = _Lease(lease.token, expires_at)
        elif self._holder(saga_id, lease.name) == lease.token:
            del self._leases[saga_id, lease.name]

    def _finish(self, run: SagaRun, record: _Record, terminal: bool) -> None:
        record.terminal = terminal or run.is_terminal
        if terminal:
            self._active.pop(run.id, None)
        if record.terminal:
            if self._retention_ms is not None:
                record.expires_at = self._clock() + self._retention_ms / 1000
            return
        self._active.setdefault(run.id, index_score(run))
        record.expires_at = None

    def _append(self, record: _Record, encoded: list[str]) -> None:
        for data in encoded:
            self._last_event += 1
            record.events.append(((self._last_event, 0), data))
        if encoded:
            self._changed.notify_all()

    def _newer(self, saga_id: str, start: tuple[int, int]) -> list[tuple[tuple[int, int], str]]:
        record = self._record(saga_id)
        if record is None:
            return []
        return [entry for entry in record.events if entry[0] > start]

    # -- the recovery sweep's health record ------------------------------------------------

    def record_sweep(self, record: SweepRecord) -> None:
        with self._changed:
            if record.interval_ms is None and self._sweep is not None:
                record = record._replace(interval_ms=self._sweep.interval_ms)
            self._sweep = record

    def last_sweep(self) -> SweepRecord | None:
        with self._changed:
            return self._sweep


def _check_count(count: int) -> None:
    if count < 1:
        raise ValueError(f"count must be positive, not {count}")


def _check_ttl(ttl_ms: int) -> None:
    if ttl_ms <= 0:
        raise ValueError(f"a lease's ttl_ms must be positive, not {ttl_ms}")


def _encode_events(saga_id: str, events: Sequence[EventDict]) -> list[str]:
    try:
        return [to_json(dict(event)).decode() for event in events]
    except PydanticSerializationError as exc:
        raise SagaStoreError(f"An event is not JSON-serializable: {exc}", saga_id=saga_id) from exc


def _parse_stream_id(saga_id: str, stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError as exc:
        message = f"Invalid stream id {stream_id!r}: expected '<ms>-<seq>'"
        raise SagaStoreError(message, saga_id=saga_id) from exc
