"""``FinishedSagas``: the part of ``RedisStore`` that handles sagas once they ended.

Compaction (``history.py``: the saga's records replaced by one compact value), the archive
(``archive.py``: the saga's history in PostgreSQL, a tombstone left in Redis), expansion (a
finished saga that runs again gets its full record back), deletion, and the retention of
each outcome.  The finisher thread (``finisher.py``) calls ``finish_many``; the recovery
sweep calls ``finish_pending`` for the sagas a dead process left marked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import redis
from pydantic import ValidationError
from pydantic_core import to_json

from saga_celery._core.model import FORMATS, TERMINAL_STATUSES, SagaRun
from saga_celery._errors import (
    SagaConfigError,
    SagaError,
    SagaStateError,
    SagaStoreError,
    SagaStoreUnavailableError,
)
from saga_celery._store import scripts
from saga_celery._store.archive import PostgresArchive
from saga_celery._store.durability import Durability
from saga_celery._store.encoding import encode_plan, encode_progress
from saga_celery._store.finisher import BATCH as FINISH_BATCH
from saga_celery._store.finisher import TAKEOVER_GRACE_MS, Finisher
from saga_celery._store.history import (
    COMPACTED_FORMAT,
    MARKER,
    History,
    Stored,
    compacts,
    decode_history,
    encode_history,
    encode_stored_history,
)
from saga_celery._store.keys import (
    ARCHIVED_FIELD,
    DATA_FIELD,
    DEFAULT_PREFIX,
    EVENT_FIELD,
    HISTORY_FIELD,
    JOURNAL_FIELD,
    PLAN_FIELD,
    TERMINAL_FIELD,
    VERSION_FIELD,
)
from saga_celery._store.redis_io import (
    RedisIO,
    as_str,
    as_text,
    decode_entry,
    first_line,
    queue_evalsha,
)
from saga_celery._store.retention import DEFAULT_RETENTION_MS
from saga_celery._store.topology import StoreClient


class FinishedSagas(RedisIO):
    """Compaction, archive, expansion, deletion and retention of ended sagas."""

    def __init__(
        self,
        client: StoreClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention_ms: int | Mapping[str, int | None] | None = DEFAULT_RETENTION_MS,
        durability: Durability | None = None,
        archive: PostgresArchive | None = None,
    ) -> None:
        super().__init__(client, prefix=prefix, durability=durability)
        self._retention_ms, self._retention_by = _check_retentions(retention_ms)
        self.archive = archive
        """Where finished sagas go (``archive.py``), None to keep them compacted in Redis."""
        self._compact = client.register_script(scripts.COMPACT)
        self._tombstone = client.register_script(scripts.TOMBSTONE)
        self._expand_script = client.register_script(scripts.EXPAND)
        self._delete = client.register_script(scripts.DELETE)
        self._unmark = client.register_script(_UNMARK)
        self.finisher = Finisher(self.finish_many, self._take_over)
        """This process's thread that compacts and archives ended sagas (``finisher.py``)."""

    def _retention_for(self, status: str) -> int | None:
        """How long a saga that ended with ``status`` is kept (ms), None: forever."""
        if self._retention_by is not None and status in self._retention_by:
            return self._retention_by[status]
        return self._retention_ms

    def finish(self, saga_id: str) -> bool:
        """Compact an ended saga, or archive it and leave a tombstone, then drop its marker.

        Idempotent: an archived or compacted saga is left as it is, a saga that runs again
        (``retry_rollback``) is left to the commit that ends it next.  True once nothing is
        left to do; False if the saga changed meanwhile (its marker stays for a retry)."""
        return self.finish_many([saga_id]) == 1

    def finish_many(self, saga_ids: Sequence[str]) -> int:
        """``finish`` for a batch: one round trip reads them all, one transaction archives
        them, one pipeline compacts or tombstones them.  A saga that cannot be read is
        logged and keeps its marker; the others go on.  How many are done."""
        if not saga_ids:
            return 0
        with self._errors():
            pipe = self._client.pipeline(transaction=False)
            for saga_id in saga_ids:
                pipe.zscore(self._keys.finishing, saga_id)
                pipe.hmget(self._keys.state(saga_id), [
                    VERSION_FIELD, TERMINAL_FIELD, DATA_FIELD, PLAN_FIELD, JOURNAL_FIELD,
                    HISTORY_FIELD, ARCHIVED_FIELD])
                pipe.xrange(self._keys.events(saga_id))
            replies = pipe.execute(raise_on_error=False)
        done, marks, work = 0, {}, []
        for i, saga_id in enumerate(saga_ids):
            mark, fields, stream = replies[3 * i: 3 * i + 3]
            marks[saga_id] = mark
            try:
                found, compacted = self._to_finish(saga_id, fields, stream)
            except (SagaError, redis.RedisError) as exc:
                _log_deferred(saga_id, exc)
                continue
            if found is None or (compacted and self.archive is None):
                done += 1  # nothing (more) to do
                self._drop_mark(saga_id, mark)
            else:
                work.append((saga_id, found))
        return done + self._finish_found(work, marks)

    def _finish_found(self, work: list[tuple[str, History | Stored]],
                      marks: dict[str, Any]) -> int:
        """Archive and tombstone, or compact, what ``finish_many`` read; how many are done."""
        if not work:
            return 0
        with self._errors():
            if self.archive is not None:
                self.archive.write_many([(f.run, f.version, f.events) for _, f in work
                                         if isinstance(f, History)])  # all, with an archive
        script = self._tombstone if self.archive is not None else self._compact
        calls: list[tuple[list[str], list[str | bytes]]] = []
        for saga_id, found in work:
            keys = [self._keys.state(saga_id), self._keys.events(saga_id)]
            if isinstance(found, Stored):
                args: list[str | bytes] = [str(found.version), found.value, MARKER]
            elif self.archive is not None:
                args = [str(found.version), found.run.status.value, "pg", MARKER]
            else:
                args = [str(found.version),
                        encode_history(found.run, found.version, found.events), MARKER]
            calls.append((keys, args))

        def send() -> list[Any]:  # EVALSHA as a plain command: Cluster pipelines route it
            pipe = self._client.pipeline(transaction=False)
            for keys, args in calls:
                queue_evalsha(pipe, script, keys, args)
            replies: list[Any] = pipe.execute()
            return replies

        results = self._loading(work[0][0], script, send)
        finished = [(saga_id, marks[saga_id]) for (saga_id, _), result
                    in zip(work, results, strict=True) if int(result) == 1]
        self._drop_marks(finished)
        return len(finished)

    def _to_finish(self, saga_id: str, fields: Any, stream: Any
                   ) -> tuple[History | Stored | None, bool]:
        """What ``finish_many`` read of one saga: its history (None: nothing to do) and
        whether it is compacted already."""
        for reply in (fields, stream):
            if isinstance(reply, Exception):
                raise self._translated(reply, saga_id)
        state_key, events_key = self._keys.state(saga_id), self._keys.events(saga_id)
        version, ended, data, plan, journal, history, archived = fields
        if version is None or as_text(ended) != "1" or archived is not None:
            return None, False  # gone, running again, or archived already
        if history is None and journal is None and self.archive is None:
            stored = _stored_history(saga_id, version, data, plan, stream)
            if stored is not None:
                return (stored if stored.version else None), False
        if history is not None:
            found = self._finished(saga_id, state_key, history, None)
        else:
            run, number = self._parse_state(saga_id, state_key, version, data, plan, journal)
            found = History(run, number, [
                decode_entry(saga_id, events_key, entry, self._corrupt) for entry in stream])
        if not compacts(found.run):
            return None, False
        return found, history is not None

    def finish_pending(self, older_than_ms: int = TAKEOVER_GRACE_MS, limit: int = 1000, *,
                       purge: bool = True) -> int:
        """Finish the ended sagas whose marker is older than ``older_than_ms``: their
        process died before it compacted or archived them.  With ``purge`` (the recovery
        sweep), also deletes the archive's sagas whose retention ran out.  How many were
        finished."""
        now = int(time.time() * 1000)
        with self._errors(key=self._keys.finishing):
            stale = [as_str(i) for i in cast(list[bytes | str], self._client.zrangebyscore(
                self._keys.finishing, "-inf", now - older_than_ms, start=0, num=limit))]
        if stale:
            with self._errors(key=self._keys.finishing):  # claimed: other sweeps wait a grace
                self._client.zadd(self._keys.finishing, dict.fromkeys(stale, now), xx=True)
        done, reachable = 0, True
        for start in range(0, len(stale), FINISH_BATCH):
            chunk = stale[start:start + FINISH_BATCH]
            try:
                done += self.finish_many(chunk)
            except SagaStoreUnavailableError as exc:  # the archive is down: try next sweep
                _log_deferred(",".join(chunk), exc)
                reachable = False
                break
            except SagaError as exc:
                _log_deferred(",".join(chunk), exc)
        if self.archive is not None and reachable and purge:
            try:
                self.archive.purge()
            except SagaError as exc:
                _log_deferred("", exc)
        return done

    def _take_over(self) -> int:
        return self.finish_pending(TAKEOVER_GRACE_MS, purge=False)

    def delete(self, saga_id: str) -> bool:
        """Remove an ended saga everywhere (Redis and the archive); False if unknown.
        ``SagaStateError`` while it runs."""
        keys = [self._keys.state(saga_id), self._keys.events(saga_id)]
        with self._errors(saga_id):
            reply = int(self._delete(keys=keys, args=[]))
        if reply == -1:
            raise SagaStateError(f"saga {saga_id!r} is still running: only a finished saga "
                                 "can be deleted (terminate it first)", saga_id=saga_id)
        with self._errors(saga_id):
            pipe = self._client.pipeline(transaction=False)
            pipe.zrem(self._keys.index, saga_id)
            pipe.zrem(self._keys.active, saga_id)
            pipe.zrem(self._keys.finishing, saga_id)
            pipe.execute()
        archived = self.archive.delete(saga_id) if self.archive is not None else False
        return reply == 1 or archived

    def _drop_mark(self, saga_id: str, mark: object) -> None:
        self._drop_marks([(saga_id, mark)])

    def _drop_marks(self, marks: Sequence[tuple[str, object]]) -> None:
        """Remove each saga's marker if it is still the one read (not set again since)."""
        marks = [(saga_id, mark) for saga_id, mark in marks if mark is not None]
        if not marks:
            return

        def send() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for saga_id, mark in marks:
                queue_evalsha(pipe, self._unmark, [self._keys.finishing],
                               [saga_id, repr(float(cast(float, mark)))])
            replies: list[Any] = pipe.execute()
            return replies

        self._loading(marks[0][0], self._unmark, send)

    def _finished(self, saga_id: str, key: str, history: object, archived: object
                  ) -> History:
        """A compacted saga's history, or an archived one's from the archive."""
        if history is not None:
            try:
                return decode_history(cast(bytes, history))
            except (ValueError, ValidationError) as exc:
                detail = f"{key} does not hold a readable saga history ({first_line(exc)})"
                raise self._corrupt(saga_id, detail) from exc
        archive = self._archive_of(saga_id, archived)
        found = archive.fetch(saga_id)
        if found is None:
            raise _not_archived(saga_id, archive)
        return found

    def _archived_runs(self, marked: Mapping[str, object]) -> dict[str, SagaRun]:
        """The runs of the sagas ``marked`` archived in Redis (id: marker), in one archive
        query; raises as ``_finished`` does for one the archive cannot give."""
        if not marked:
            return {}
        archive = self._archive_of(*next(iter(marked.items())))
        found = archive.fetch_runs(list(marked))
        missing = next((saga_id for saga_id in marked if saga_id not in found), None)
        if missing is not None:
            raise _not_archived(missing, archive)
        return found

    def _archive_of(self, saga_id: str, archived: object) -> PostgresArchive:
        """The archive to read saga ``saga_id`` from, marked ``archived`` in Redis."""
        if self.archive is None:
            raise SagaStoreError(
                f"saga {saga_id!r} was archived ({as_text(archived)}), and this process has no "
                "archive: give SagaApp(archive=...) the archive's URL to read it.",
                saga_id=saga_id)
        return self.archive


    def _finished_events(self, saga_id: str) -> list[tuple[str, dict[str, Any]]] | None:
        """The events of a compacted or archived saga; None if its stream is its own."""
        key = self._keys.state(saga_id)
        with self._errors(saga_id, key=key):
            history, archived = self._client.hmget(key, [HISTORY_FIELD, ARCHIVED_FIELD])
        if history is None and archived is None:
            return None
        return self._finished(saga_id, key, history, archived).events

    def _expand(self, saga_id: str, version: int) -> None:
        """Give a compacted or archived saga its full record back before a commit."""
        key = self._keys.state(saga_id)
        with self._errors(saga_id, key=key):
            history, archived = self._client.hmget(key, [HISTORY_FIELD, ARCHIVED_FIELD])
        if history is None and archived is None:
            return  # expanded meanwhile: the commit's version check decides
        found = self._finished(saga_id, key, history, archived)
        args: list[str | bytes] = [str(version), encode_progress(found.run),
                                   encode_plan(found.run.plan)]
        for stream_id, event in found.events:
            args += [stream_id, to_json(event)]
        with self._errors(saga_id):
            self._expand_script(keys=[key, self._keys.events(saga_id)], args=args)


def _check_retention(retention_ms: int | None) -> int | None:
    if retention_ms is not None and retention_ms <= 0:
        raise SagaConfigError(f"retention_ms must be positive or None, not {retention_ms}")
    return retention_ms


def _check_retentions(retention: int | Mapping[str, int | None] | None
                      ) -> tuple[int | None, dict[str, int | None] | None]:
    """One retention for every outcome, or one per outcome (the rest: the default)."""
    if not isinstance(retention, Mapping):
        return _check_retention(retention), None
    outcomes = {s.value for s in TERMINAL_STATUSES}
    unknown = sorted(set(retention) - outcomes)
    if unknown:
        raise SagaConfigError(f"retention by outcome takes {sorted(outcomes)}, not {unknown}")
    return DEFAULT_RETENTION_MS, {k: _check_retention(v) for k, v in retention.items()}

def _not_archived(saga_id: str, archive: PostgresArchive) -> SagaStoreError:
    return SagaStoreError(
        f"saga {saga_id!r} is marked archived in Redis, but the archive at {archive.where} "
        "does not hold it (deleted, or its retention ran out).", saga_id=saga_id)


def _log_deferred(saga_id: str, exc: Exception) -> None:
    import structlog

    structlog.get_logger("saga_celery").warning("saga.finish_deferred", saga_id=saga_id,
                                                error=str(exc))

_UNMARK = """
-- Drop a finished saga's marker, unless it was set again since it was read.
-- KEYS[1]  <prefix>finishing   ARGV[1] saga id   ARGV[2] the score read
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

def _stored_history(saga_id: str, version: object, data: object, plan: object,
                    stream: Any) -> Stored | None:
    """A finished saga's compacted value made from its records as stored, without parsing
    them into a run (the finisher's path for every saga that ended with its progress whole);
    version 0: not a saga of a compacted format.  None where anything looks unusual: the
    full path then reads it, and names what is wrong."""
    try:
        progress = json.loads(cast(bytes, data))
        number = int(cast(bytes, version))
    except (TypeError, ValueError):
        return None
    if (not isinstance(progress, dict) or progress.get("id") != saga_id
            or not isinstance(plan, bytes) or number < 1):
        return None
    written = progress.get("format", 1)
    if not isinstance(written, int) or written not in FORMATS:
        return None
    if written < COMPACTED_FORMAT:
        return Stored(0, b"")
    events = []
    for stream_id, fields in stream:
        value = fields.get(EVENT_FIELD.encode())
        if not isinstance(value, bytes) or value[:1] != b"{" or value[-1:] != b"}":
            return None
        events.append((stream_id if isinstance(stream_id, bytes) else stream_id.encode(),
                       value))
    return Stored(number, encode_stored_history(number, cast(bytes, data), plan, events))
