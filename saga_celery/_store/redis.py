"""``RedisStore``: saga runs, events and leases in Redis, one round trip per operation.

What it sends goes through ``RedisIO`` (``redis_io.py``); what it does with sagas once they
ended is ``FinishedSagas`` (``redis_history.py``); the index sets, timers and sweep record
beside the sagas are ``SagaIndexes`` (``redis_indexes.py``).

Each write of one saga is one Lua script over that saga's hash-tagged keys (see
``scripts.py``), sent in one pipeline with the updates of the global index sets, which stay
out of the scripts so that Redis Cluster can run them.  The index sets are therefore only
eventually exact: ``active`` is kept a superset of the non-terminal sagas.  On one Redis,
behind Sentinel or on Redis Cluster alike (``topology.py``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import redis
from pydantic_core import PydanticSerializationError, to_json
from redis.client import Pipeline

from saga_celery._core.model import SagaRun
from saga_celery._errors import SagaConfigError, SagaStoreError
from saga_celery._store.archive import PostgresArchive
from saga_celery._store.base import (
    EventDict,
    LeaseAction,
    LeaseChange,
    Snapshot,
    Timer,
    timer_member,
)
from saga_celery._store.durability import Durability
from saga_celery._store.encoding import encode_plan, encode_progress
from saga_celery._store.history import compacts, events_after
from saga_celery._store.journal import count_entries
from saga_celery._store.keys import (
    ARCHIVED_FIELD,
    DATA_FIELD,
    DEFAULT_PREFIX,
    HISTORY_FIELD,
    JOURNAL_FIELD,
    PLAN_FIELD,
    VERSION_FIELD,
    index_score,
)
from saga_celery._store.redis_indexes import SagaIndexes, timer_scores
from saga_celery._store.redis_io import (
    as_text,
    decode_entry,
    queue_evalsha,
    reconnecting,
)
from saga_celery._store.retention import DEFAULT_RETENTION_MS

_STATE_FIELDS = (VERSION_FIELD, DATA_FIELD, PLAN_FIELD, JOURNAL_FIELD, HISTORY_FIELD,
                 ARCHIVED_FIELD)
"""The fields of a saga's state hash a load reads."""


class RedisStore(SagaIndexes):
    """The production ``SagaStore``; works with ``fakeredis.FakeRedis`` clients too.

    ``client`` is a ``redis.Redis``, a Sentinel master client or a ``RedisCluster``
    (``topology.py``).  ``durability`` makes every saga write wait until that many replicas
    have it (``durability.py``; not on Redis Cluster)."""

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention_ms: int | Mapping[str, int | None] | None = DEFAULT_RETENTION_MS,
        socket_timeout: float = 5.0,
        durability: Durability | None = None,
        archive: PostgresArchive | None = None,
    ) -> RedisStore:
        """A store on a new client for ``url`` (``redis://``, ``rediss://``, ``unix://``)."""
        try:
            client = redis.Redis.from_url(
                url,
                socket_connect_timeout=socket_timeout,
                socket_timeout=socket_timeout,
                health_check_interval=30,
                retry=reconnecting(),
            )
        except ValueError as exc:
            raise SagaConfigError(f"Invalid Redis URL for the saga store: {exc}") from exc
        return cls(client, prefix=prefix, retention_ms=retention_ms, durability=durability,
                   archive=archive)

    def ping(self) -> None:
        with self._errors():
            self._client.ping()

    def create(self, run: SagaRun, events: Sequence[EventDict],
               timers: Sequence[Timer] = ()) -> bool:
        keys = [self._keys.state(run.id), self._keys.events(run.id)]
        args: list[str | bytes] = [encode_progress(run), encode_plan(run.plan)]
        in_script = self._raw and bool(timers)  # Cluster: another slot, see ``keys.py``
        if in_script:
            keys.append(self._keys.timers)
            args.append(str(len(timers)))
        args += _encode_events(run.id, events)
        if in_script:
            args += _timer_args(timers)
        score = {run.id: index_score(run)}

        def queue(pipe: Pipeline) -> None:
            queue_evalsha(pipe, self._create, keys, args)
            pipe.zadd(self._keys.index, score, nx=True)
            pipe.zadd(self._keys.active, score, nx=True)
            if timers and not in_script:  # beside the creation, in its pipeline
                pipe.zadd(self._keys.timers, timer_scores(timers), nx=True)

        return int(self._pipeline(run.id, self._create, queue)[0]) == 1

    def load(self, saga_id: str, *, lease: str | None = None) -> Snapshot | None:
        keys = [self._keys.state(saga_id)]
        commands: list[tuple[str | bytes, ...]] = [("HMGET", keys[0], *_STATE_FIELDS)]
        if lease is not None:
            keys.append(self._keys.lease(saga_id, lease))
            commands.append(("GET", keys[1]))
        try:  # ``_errors``, without a context manager on the hot path
            replies = self._send(commands)
        except Exception as exc:
            self._reraise(exc, saga_id)
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, redis.ResponseError):
                with self._errors(saga_id, key=key):
                    raise reply
        version, data, plan, journal, history, archived = replies[0]
        if version is None and data is None:
            return None
        holder = as_text(replies[1]) if lease is not None else None
        if history is not None or archived is not None:
            found = self._finished(saga_id, keys[0], history, archived)
            # Redis's version: the one a commit compares against (the same, as written).
            return Snapshot(run=found.run, version=int(cast(str, version)),
                            lease_holder=holder)
        run, number = self._parse_state(saga_id, keys[0], version, data, plan, journal)
        return Snapshot(run=run, version=number, lease_holder=holder,
                        journal=count_entries(journal))

    def load_runs(self, saga_ids: Sequence[str]) -> list[SagaRun | None]:
        keys = [self._keys.state(saga_id) for saga_id in saga_ids]
        if not keys:
            return []
        try:
            replies = self._send([("HMGET", key, *_STATE_FIELDS) for key in keys])
        except Exception as exc:
            self._reraise(exc, None)
        runs: list[SagaRun | None] = []
        archived: dict[str, object] = {}  # read from the archive together, below
        for saga_id, key, reply in zip(saga_ids, keys, replies, strict=True):
            if isinstance(reply, redis.ResponseError):
                with self._errors(saga_id, key=key):
                    raise reply
            version, data, plan, journal, history, marker = reply
            if version is None and data is None:
                runs.append(None)
            elif history is None and marker is not None:
                archived[saga_id] = marker
                runs.append(None)
            elif history is not None:
                runs.append(self._finished(saga_id, key, history, None).run)
            else:
                runs.append(self._parse_state(saga_id, key, version, data, plan, journal)[0])
        found = self._archived_runs(archived)
        return [found.get(saga_id, run) for saga_id, run in zip(saga_ids, runs, strict=True)]

    def commit(
        self,
        run: SagaRun,
        *,
        version: int,
        events: Sequence[EventDict],
        lease: LeaseChange | None = None,
        terminal: bool = False,
        journal: bytes | None = None,
        timers: Sequence[Timer] = (),
    ) -> bool:
        self.finisher.activity()  # finished sagas wait while this process works on sagas
        keys = [self._keys.state(run.id), self._keys.events(run.id)]
        if lease is not None:
            keys.append(self._keys.lease(run.id, lease.name))
        in_script = self._raw and bool(timers)  # Cluster: another slot, see ``keys.py``
        if in_script:
            keys.append(self._keys.timers)
        ends = terminal or run.is_terminal  # stays terminal: keep the retention clock
        data: str | bytes
        if journal is not None and not ends:
            data, mode = journal, "j"
        else:
            data, mode = encode_progress(run), "d"
        if lease is None:
            action, token, ttl = "", "", ""
        else:
            if lease.action is LeaseAction.ACQUIRE:
                _check_ttl(lease.ttl_ms)
            action, token, ttl = lease.action.value, lease.token, str(lease.ttl_ms)
        kept = self._retention_for(run.status.value)
        retention = "" if not ends or kept is None else str(kept)
        args: list[str | bytes] = [
            f"{version}|{version + 1}|{action}|{ttl}|{'1' if ends else '0'}|{retention}|{mode}"
            + (f"|{len(timers)}" if in_script else ""),
            token,
            data,
            *_encode_events(run.id, events),
            *(_timer_args(timers) if in_script else ()),
        ]
        if timers and not in_script:
            return self._commit_beside(run, keys, args, timers, terminal)
        if not terminal:
            # One command: the saga is already in the active index, unless this commit
            # revived it (the script says so), which is rare enough for a second trip.
            reply = int(self._script(run.id, self._commit, keys, args))
            if reply == 3:  # compacted or archived: its full record back, then again
                self._expand(run.id, version)
                return self.commit(run, version=version, events=events, lease=lease,
                                   terminal=terminal, journal=journal)
            if reply == 2:
                self._restore_active(run.id, {run.id: index_score(run)})
            return reply != 0
        reply = self._commit_terminal(run, keys, args)
        if reply == 3:
            self._expand(run.id, version)
            return self.commit(run, version=version, events=events, lease=lease,
                               terminal=terminal, journal=journal)
        return reply != 0

    def _commit_terminal(self, run: SagaRun, keys: list[str], args: list[str | bytes]
                         ) -> int:
        """The commit that ends a saga, with its index updates and, for a saga compacted
        when it ends, the durable marker and the hand-over to the finisher thread."""
        score = {run.id: index_score(run)}
        marks = compacts(run)

        def queue(pipe: Pipeline) -> None:
            queue_evalsha(pipe, self._commit, keys, args)
            pipe.zrem(self._keys.active, run.id)
            if marks:  # the durable "to compact / archive" marker (``finisher.py``)
                pipe.zadd(self._keys.finishing, {run.id: int(time.time() * 1000)})

        try:
            reply = int(self._pipeline(run.id, self._commit, queue)[0])
        except SagaStoreError:
            self._restore_active(run.id, score)
            raise
        if reply not in (1, 2):
            self._restore_active(run.id, score)
        elif marks:
            self.finisher.submit(run.id)
        return reply

    def _commit_beside(self, run: SagaRun, keys: list[str], args: list[str | bytes],
                       timers: Sequence[Timer], terminal: bool) -> bool:
        """A commit with timers on Redis Cluster: the timers set is in another slot, so it
        is written in the commit's pipeline, just after it (the recovery sweep puts back a
        timer this leaves out: ``add_timers``).  A commit refused leaves a timer that finds
        no outbox entry when it fires, and is dropped then."""
        score = {run.id: index_score(run)}

        def queue(pipe: Pipeline) -> None:
            queue_evalsha(pipe, self._commit, keys, args)
            pipe.zadd(self._keys.timers, timer_scores(timers), nx=True)
            if terminal:
                pipe.zrem(self._keys.active, run.id)

        reply = int(self._pipeline(run.id, self._commit, queue)[0])
        if reply == 2 or (terminal and reply == 0):
            self._restore_active(run.id, score)
        return reply != 0

    def _restore_active(self, saga_id: str, score: Mapping[str, float]) -> None:
        """Put a live saga back in the active index: a terminal commit's ZREM ran although
        the commit did not, or a commit revived a terminal saga."""
        try:
            with self._errors(saga_id):
                self._client.zadd(self._keys.active, score, nx=True)
        except SagaStoreError:
            pass  # the sweep only misses it until the next commit re-adds it

    def renew_lease(self, saga_id: str, name: str, token: str, ttl_ms: int) -> bool:
        _check_ttl(ttl_ms)
        key = self._keys.lease(saga_id, name)
        with self._errors(saga_id):
            return int(self._renew(keys=[key], args=[token, ttl_ms])) == 1

    def release_lease(self, saga_id: str, name: str, token: str) -> bool:
        key = self._keys.lease(saga_id, name)
        with self._errors(saga_id):
            return int(self._release(keys=[key], args=[token])) == 1

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
        key = self._keys.events(saga_id)
        deadline = time.monotonic() + max(block_ms or 0, 0) / 1000
        while True:
            wait_ms = self._block_slice(deadline)
            with self._errors(saga_id, key=key):
                reply = self._client.xread({key: after}, count=count, block=wait_ms)
            entries = _stream_entries(reply)
            if not entries:
                finished = self._finished_events(saga_id)
                if finished is not None:
                    return events_after(finished, after, count)
            if entries or wait_ms is None or time.monotonic() >= deadline:
                return [decode_entry(saga_id, key, entry, self._corrupt) for entry in entries]


def _check_ttl(ttl_ms: int) -> None:
    if ttl_ms <= 0:
        raise ValueError(f"a lease's ttl_ms must be positive, not {ttl_ms}")


def _timer_args(timers: Sequence[Timer]) -> list[str]:
    """A commit's timers as its script takes them: due time, member, due time, ..."""
    return [part for timer in timers for part in (str(timer.due_ms), timer_member(timer))]


def _encode_events(saga_id: str, events: Sequence[EventDict]) -> list[bytes]:
    try:
        return [to_json(event) for event in events]
    except PydanticSerializationError as exc:
        raise SagaStoreError(f"An event is not JSON-serializable: {exc}", saga_id=saga_id) from exc


def _stream_entries(reply: object) -> list[Any]:
    """The entries of a one-stream XREAD reply, in RESP2 (a list) or RESP3 (a dict) shape."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, Mapping) else [e for _, e in cast(Any, reply)]
    found: list[Any] = []
    for entries in streams:
        # redis-py 8 nests a stream's entries (tuples) in one more list under RESP3.
        found.extend(entries[0] if entries and isinstance(entries[0], list) else entries)
    return found
