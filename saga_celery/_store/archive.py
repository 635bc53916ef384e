"""``PostgresArchive``: every finished saga's full state and events, in PostgreSQL.

``SagaApp(app, archive="postgresql://...")`` (extra ``saga-celery[archive]``: psycopg 3).
The process that ends a saga writes it here off the step's path (``finisher.py``), then
leaves Redis only a tombstone.  Writes are idempotent: a saga written twice (a process
killed between writing and tombstoning, two processes finishing the same backlog) is one
row, and an older version never replaces a newer one.

The library creates and migrates its tables; the layout (README, "History: compaction,
archive, retention")::

    saga_celery_schema   version int primary key, applied_at timestamptz
                         (one row per migration applied)
    saga_celery_sagas    id text primary key, name text, status text, format int,
                         version int (the Redis record's version when it was archived),
                         created_at, ended_at, archived_at, expires_at timestamptz
                         (expires_at null: kept forever),
                         progress jsonb (the run without its plan), plan jsonb,
                         events jsonb (a list of [stream id, event] pairs, oldest first)
                         indexes: (status, ended_at desc, id), (name, ended_at desc, id),
                         (ended_at desc, id), (expires_at)
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, TypeVar

from saga_celery._core.model import SagaRun
from saga_celery._errors import SagaConfigError, SagaStoreError, SagaStoreUnavailableError
from saga_celery._store.encoding import encode_progress
from saga_celery._store.history import History, history_of

T = TypeVar("T")

SCHEMA_VERSION = 1
"""The newest table layout this release creates (``saga_celery_schema``)."""

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE IF NOT EXISTS saga_celery_sagas (
            id text PRIMARY KEY,
            name text NOT NULL,
            status text NOT NULL,
            format integer NOT NULL,
            version integer NOT NULL,
            created_at timestamptz NOT NULL,
            ended_at timestamptz,
            archived_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz,
            progress jsonb NOT NULL,
            plan jsonb NOT NULL,
            events jsonb NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS saga_celery_sagas_status "
        "ON saga_celery_sagas (status, ended_at DESC, id)",
        "CREATE INDEX IF NOT EXISTS saga_celery_sagas_name "
        "ON saga_celery_sagas (name, ended_at DESC, id)",
        "CREATE INDEX IF NOT EXISTS saga_celery_sagas_ended "
        "ON saga_celery_sagas (ended_at DESC, id)",
        "CREATE INDEX IF NOT EXISTS saga_celery_sagas_expires "
        "ON saga_celery_sagas (expires_at) WHERE expires_at IS NOT NULL",
    ],
}

_LOCK_KEY = 0x5A6A_C31E
"""The advisory lock two processes migrating at once take turns on."""


_UPSERT = """INSERT INTO saga_celery_sagas (id, name, status, format, version, created_at,
        ended_at, expires_at, progress, plan, events)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s::jsonb)
    ON CONFLICT (id) DO UPDATE SET name = excluded.name, status = excluded.status,
        format = excluded.format, version = excluded.version,
        created_at = excluded.created_at, ended_at = excluded.ended_at,
        expires_at = excluded.expires_at, progress = excluded.progress,
        plan = excluded.plan, events = excluded.events, archived_at = now()
    WHERE saga_celery_sagas.version < excluded.version"""
"""Idempotent: a second write of a version, or an older one, changes nothing."""


class ArchivedSaga(NamedTuple):
    """One row of ``list`` on the archive."""

    id: str
    name: str
    status: str
    created_at: datetime
    ended_at: datetime | None


class ArchivePage(NamedTuple):
    """A page of archived sagas, newest ended first, and the cursor of the next page."""

    sagas: list[ArchivedSaga]
    next: str | None
    """Give it as ``after`` for the next page; None when no page follows."""


class PostgresArchive:
    """Finished sagas in PostgreSQL, through psycopg 3; one connection per process."""

    def __init__(self, url: str, *,
                 retention_ms: Mapping[str, int | None] | None = None,
                 connect_timeout: float = 5.0) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise SagaConfigError(
                f"SagaApp(archive=...) takes a postgresql:// URL, not {_safe(url)!r}")
        try:
            import psycopg  # noqa: F401  (the extra is checked here, not at first use)
        except ImportError as exc:
            from saga_celery._extras import MissingExtraError
            raise MissingExtraError("archive", "psycopg", needed_by="SagaApp(archive=...)"
                                    ) from exc
        self._url = url
        self._retention = dict(retention_ms or {})
        self._timeout = connect_timeout
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = 0
        self._migrated = False

    @property
    def where(self) -> str:
        return _safe(self._url)

    # -- writing ----------------------------------------------------------------------

    def write(self, run: SagaRun, version: int,
              events: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Archive a finished saga; a second write of one version or an older one is a no-op."""
        self.write_many([(run, version, events)])

    def write_many(self, sagas: Sequence[tuple[SagaRun, int,
                                               Sequence[tuple[str, dict[str, Any]]]]]) -> None:
        """Archive finished sagas in one transaction (one commit, one flush of the WAL)."""
        rows = [self._row(run, version, events) for run, version, events in sagas]

        def act(cur: Any) -> None:
            with cur.connection.transaction():
                cur.executemany(_UPSERT, rows)
        self._run(act)

    def _row(self, run: SagaRun, version: int,
             events: Sequence[tuple[str, dict[str, Any]]]) -> tuple[Any, ...]:
        keep = self._retention.get(run.status.value) if self._retention else None
        ended = run.ended_at or datetime.now(UTC)
        expires = None if keep is None else ended + timedelta(milliseconds=keep)
        return (run.id, run.name, run.status.value, run.format, version, run.created_at,
                run.ended_at, expires, encode_progress(run), run.plan.model_dump_json(),
                json.dumps([[i, e] for i, e in events], separators=(",", ":")))

    # -- reading ----------------------------------------------------------------------

    def fetch(self, saga_id: str) -> History | None:
        """The archived saga (its run, version and events), None if not archived."""
        def read(cur: Any) -> Any:
            cur.execute("SELECT progress::text, plan::text, events::text, version "
                        "FROM saga_celery_sagas WHERE id = %s", (saga_id,))
            return cur.fetchone()
        found = self._run(read)
        if found is None:
            return None
        progress, plan, events, version = found
        return _history(progress, plan, events, version)

    def fetch_runs(self, saga_ids: Sequence[str]) -> dict[str, SagaRun]:
        """The runs of those of ``saga_ids`` that are archived, by id, in one query and
        without their events: what a list of sagas shows."""
        if not saga_ids:
            return {}

        def read(cur: Any) -> Any:
            cur.execute("SELECT id, progress::text, plan::text, version "
                        "FROM saga_celery_sagas WHERE id = ANY(%s)", (list(saga_ids),))
            return cur.fetchall()

        return {saga_id: _history(progress, plan, "[]", version).run
                for saga_id, progress, plan, version in self._run(read)}

    def page(self, *, status: str | None = None, name: str | None = None,
             ended_before: datetime | None = None, ended_after: datetime | None = None,
             after: str | None = None, limit: int = 100) -> ArchivePage:
        """Archived sagas, newest ended first, filtered by status, name and end time;
        ``after``: the ``next`` of the page before."""
        if limit < 1:
            raise ValueError(f"limit must be positive, not {limit}")
        where: list[str] = ["TRUE"]
        args: list[object] = []
        if status is not None:
            where.append("status = %s")
            args.append(status)
        if name is not None:
            where.append("name = %s")
            args.append(name)
        if ended_before is not None:
            where.append("ended_at < %s")
            args.append(ended_before)
        if ended_after is not None:
            where.append("ended_at >= %s")
            args.append(ended_after)
        if after is not None:
            at, _, last_id = after.partition("|")
            try:
                cursor_at = datetime.fromisoformat(at)
            except ValueError as exc:
                raise SagaConfigError(f"not a cursor of the archive's list: {after!r}"
                                      ) from exc
            where.append("(ended_at, id) < (%s, %s)")
            args += [cursor_at, last_id]
        sql = (f"SELECT id, name, status, created_at, ended_at FROM saga_celery_sagas "
               f"WHERE {' AND '.join(where)} AND ended_at IS NOT NULL "
               f"ORDER BY ended_at DESC, id DESC LIMIT %s")

        def read(cur: Any) -> Any:
            cur.execute(sql, (*args, limit + 1))
            return cur.fetchall()
        rows = [ArchivedSaga(*row) for row in self._run(read)]
        more = len(rows) > limit
        rows = rows[:limit]
        cursor = None
        if more and rows and rows[-1].ended_at is not None:
            cursor = f"{rows[-1].ended_at.isoformat()}|{rows[-1].id}"
        return ArchivePage(rows, cursor)

    def count(self) -> int:
        def read(cur: Any) -> Any:
            cur.execute("SELECT count(*) FROM saga_celery_sagas")
            return cur.fetchone()[0]
        return int(self._run(read))

    # -- retention and deletion -------------------------------------------------------

    def delete(self, saga_id: str) -> bool:
        """Delete an archived saga; False if it was not archived."""
        def act(cur: Any) -> Any:
            cur.execute("DELETE FROM saga_celery_sagas WHERE id = %s", (saga_id,))
            return cur.rowcount
        return int(self._run(act)) > 0

    def purge(self, now: datetime | None = None, limit: int = 10_000) -> int:
        """Delete up to ``limit`` archived sagas whose retention ran out; how many."""
        at = now or datetime.now(UTC)

        def act(cur: Any) -> Any:
            cur.execute("DELETE FROM saga_celery_sagas WHERE id IN (SELECT id FROM "
                        "saga_celery_sagas WHERE expires_at < %s LIMIT %s)", (at, limit))
            return cur.rowcount
        return int(self._run(act))

    def schema_version(self) -> int:
        def read(cur: Any) -> Any:
            cur.execute("SELECT max(version) FROM saga_celery_schema")
            return cur.fetchone()[0]
        return int(self._run(read) or 0)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # -- connection and schema --------------------------------------------------------

    def _run(self, action: Callable[[Any], T]) -> T:
        """``action(cursor)`` on this process's connection, migrated; one reconnect on a
        dropped connection; psycopg's errors as ``SagaStoreError``s."""
        import psycopg

        for tries_left in (1, 0):
            with self._lock:
                try:
                    conn = self._connection()
                    with conn.cursor() as cur:
                        return action(cur)
                except psycopg.OperationalError as exc:
                    self._drop()
                    if tries_left:
                        continue
                    raise SagaStoreUnavailableError(
                        f"The saga archive at {self.where} cannot be reached ({exc}). Check "
                        "SagaApp(archive=...) and that PostgreSQL is running.") from exc
                except psycopg.Error as exc:
                    self._drop()
                    raise SagaStoreError(
                        f"The saga archive at {self.where} failed: {exc}") from exc
        raise AssertionError("unreachable")

    def _connection(self) -> Any:
        import psycopg

        if self._conn is not None and self._pid != os.getpid():
            self._conn = None  # inherited over a fork: the parent's, never used here
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._url, autocommit=True,
                                         connect_timeout=max(1, int(self._timeout)))
            self._pid = os.getpid()
            if not self._migrated:
                _migrate(self._conn)
                self._migrated = True
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            with suppress(Exception):  # closing a broken connection may fail again
                self._conn.close()
        self._conn = None


def _migrate(conn: Any) -> None:
    """Create or migrate the tables, under an advisory lock (processes start together)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        cur.execute("CREATE TABLE IF NOT EXISTS saga_celery_schema ("
                    "version integer PRIMARY KEY, applied_at timestamptz NOT NULL "
                    "DEFAULT now())")
        cur.execute("SELECT coalesce(max(version), 0) FROM saga_celery_schema")
        current = int(cur.fetchone()[0])
        if current > SCHEMA_VERSION:
            raise SagaConfigError(
                f"The saga archive's tables are at layout {current}, written by a newer "
                f"saga_celery; this release knows layouts up to {SCHEMA_VERSION}.")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                cur.execute(statement)
            cur.execute("INSERT INTO saga_celery_schema (version) VALUES (%s)", (version,))


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{host}" if user else f"{scheme}://{host}"


__all__ = ["ArchivePage", "ArchivedSaga", "PostgresArchive"]


def _history(progress: str, plan: str, events: str, version: int) -> History:
    """A saga as its archive row holds it (JSON text of its columns)."""
    return history_of({"h": 1, "v": version, "d": json.loads(progress), "p": json.loads(plan),
                       "e": json.loads(events)})
