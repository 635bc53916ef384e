"""``PostgresArchive`` on a real PostgreSQL (SPEC section 11): the tables it creates and
migrates, idempotent writes, paging, retention and deletion, errors that name the problem."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from saga_celery._engine import Engine
from saga_celery._errors import SagaConfigError, SagaStoreUnavailableError
from saga_celery._store.archive import SCHEMA_VERSION, PostgresArchive
from saga_celery._store.memory import MemoryStore
from tests.integration.history_pg import archive_url  # noqa: F401  (a fixture)
from tests.unit.sim import plan
from tests.unit.test_history import run_to_end

pytestmark = [pytest.mark.integration]


@pytest.fixture
def archive(archive_url: str) -> Iterator[PostgresArchive]:  # noqa: F811
    made = PostgresArchive(archive_url, retention_ms={"complete": 60_000, "errored": None})
    yield made
    made.close()


def finished(saga_id: str, *, fail: bool = False) -> tuple[object, int, list[object]]:
    """A five-step saga run to its end in memory: its run, version and events."""
    store = MemoryStore()
    run_to_end(Engine(store), saga_id, fail_last=fail)
    snapshot = store.load(saga_id)
    assert snapshot is not None
    return snapshot.run, snapshot.version, list(store.read_events(saga_id))


def test_it_creates_its_tables_once_and_records_the_layout(
        archive: PostgresArchive, archive_url: str) -> None:  # noqa: F811
    import psycopg

    assert archive.count() == 0
    assert archive.schema_version() == SCHEMA_VERSION
    again = PostgresArchive(archive_url)  # a second process: nothing applied twice
    assert again.schema_version() == SCHEMA_VERSION
    again.close()
    with psycopg.connect(archive_url) as conn:
        rows = conn.execute("SELECT version FROM saga_celery_schema").fetchall()
    assert rows == [(SCHEMA_VERSION,)]


def test_a_newer_layout_is_refused_naming_it(archive_url: str) -> None:  # noqa: F811
    import psycopg

    with psycopg.connect(archive_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE saga_celery_schema (version integer PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        conn.execute("INSERT INTO saga_celery_schema (version) VALUES (99)")
    archive = PostgresArchive(archive_url)
    with pytest.raises(SagaConfigError, match=r"layout 99.*newer"):
        archive.count()
    archive.close()


def test_writes_are_idempotent_and_never_go_back_a_version(archive: PostgresArchive) -> None:
    run, version, events = finished("w1")
    archive.write(run, version, events)  # type: ignore[arg-type]
    archive.write(run, version, events)  # type: ignore[arg-type]
    archive.write(run, version - 1, events[:2])  # type: ignore[arg-type]
    assert archive.count() == 1
    found = archive.fetch("w1")
    assert found is not None
    assert (found.run, found.version, found.events) == (run, version, events)
    assert archive.fetch("nobody") is None


def test_pages_by_status_name_and_time(archive: PostgresArchive) -> None:
    sagas = [finished(f"p{i}", fail=i % 3 == 0) for i in range(7)]
    archive.write_many(sagas)  # type: ignore[arg-type]
    errored = archive.page(status="errored")
    assert sorted(s.id for s in errored.sagas) == ["p0", "p3", "p6"]
    assert archive.page(name="nobody").sagas == []
    seen, cursor = [], None
    while True:
        page = archive.page(limit=2, after=cursor)
        seen += [s.id for s in page.sagas]
        if page.next is None:
            break
        cursor = page.next
    assert sorted(seen) == [f"p{i}" for i in range(7)] and len(seen) == 7
    future = datetime.now(UTC) + timedelta(days=1)
    assert archive.page(ended_after=future).sagas == []
    assert len(archive.page(ended_before=future, limit=100).sagas) == 7
    with pytest.raises(SagaConfigError, match="cursor"):
        archive.page(after="not a cursor")


def test_retention_by_outcome_purges_and_delete_removes(archive: PostgresArchive) -> None:
    ok, bad = finished("r-ok"), finished("r-bad", fail=True)
    archive.write_many([ok, bad])  # type: ignore[list-item]
    assert archive.purge(datetime.now(UTC)) == 0
    later = datetime.now(UTC) + timedelta(minutes=2)
    assert archive.purge(later) == 1  # complete: kept 60 s; errored: forever
    assert archive.fetch("r-ok") is None and archive.fetch("r-bad") is not None
    assert archive.delete("r-bad") and not archive.delete("r-bad")
    assert archive.count() == 0


def test_an_unreachable_archive_says_so() -> None:
    archive = PostgresArchive("postgresql://postgres@127.0.0.1:1/none", connect_timeout=1)
    with pytest.raises(SagaStoreUnavailableError, match="cannot be reached"):
        archive.count()


def test_an_archive_that_is_down_delays_archiving_and_loses_nothing(
        archive_url: str) -> None:  # noqa: F811
    """With PostgreSQL unreachable, an ended saga keeps its full record and its marker in
    Redis, the sweep says so without failing, and archives it once PostgreSQL is back."""
    import fakeredis

    from saga_celery._store import RedisStore

    client = fakeredis.FakeRedis()
    down = PostgresArchive("postgresql://postgres@127.0.0.1:1/none", connect_timeout=1)
    store = RedisStore(client, prefix="d:", archive=down)
    store.finisher.submit = lambda saga_id: None  # type: ignore[method-assign]
    run_to_end(Engine(store), "down-1")
    assert store.finish_pending(older_than_ms=0) == 0
    assert client.zscore("d:finishing", "down-1") is not None
    assert store.load("down-1").run.status == "complete"  # type: ignore[union-attr]
    assert len(store.read_events("down-1")) > 5

    back = PostgresArchive(archive_url)
    store.archive = back
    assert store.finish_pending(older_than_ms=0) == 1
    assert client.hexists("d:{down-1}:state", "a") and back.count() == 1
    assert store.load("down-1").run.status == "complete"  # type: ignore[union-attr]
    back.close()


def test_a_list_reads_archived_sagas_in_one_archive_query(
        archive: PostgresArchive, monkeypatch: pytest.MonkeyPatch) -> None:
    """A list of sagas whose Redis records are tombstones reads their runs with one archive
    query (no events), each as ``load`` gives it; a live saga among them from Redis."""
    import fakeredis

    from saga_celery._store import RedisStore

    store = RedisStore(fakeredis.FakeRedis(), prefix="l:", archive=archive)
    store.finisher.submit = lambda saga_id: None  # type: ignore[method-assign]
    engine = Engine(store)
    ids = [f"list-{n}" for n in range(4)]
    for n, saga_id in enumerate(ids[:3]):
        run_to_end(engine, saga_id, fail_last=n == 1)
    assert store.finish_pending(older_than_ms=0) == 3  # archived: tombstones in Redis
    engine.submit(saga_id=ids[3], name="five", plan=plan("a"), params={})
    queries: list[list[str]] = []
    fetch_runs = archive.fetch_runs

    def counted(saga_ids: list[str]) -> object:
        queries.append(list(saga_ids))
        return fetch_runs(saga_ids)

    monkeypatch.setattr(archive, "fetch_runs", counted)
    runs = store.load_runs([*reversed(ids), "unknown"])

    assert queries == [[ids[2], ids[1], ids[0]]]
    assert [r.status if r else None for r in runs] == [
        "queued", "complete", "errored", "complete", None]
    assert runs[1:4] == [store.load(i).run for i in reversed(ids[:3])]  # type: ignore[union-attr]
