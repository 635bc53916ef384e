"""Finished sagas compacted (SPEC section 11, ``_store/history.py``, ``finisher.py``), on
fakeredis: what ``status()``, ``events()`` and a late message see does not change, a revived
saga gets its full record back, retention by outcome and ``delete`` (fast: no worker)."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
from celery import Celery

from saga_celery import SagaApp
from saga_celery._core.events import (
    AttemptFailed,
    AttemptStarted,
    AttemptSucceeded,
    RetryRollbackRequested,
)
from saga_celery._core.model import ErrorInfo, Kind, SagaStatus
from saga_celery._core.state import to_state
from saga_celery._engine import Engine
from saga_celery._errors import (
    SagaConfigError,
    SagaCorruptStateError,
    SagaNotFoundError,
    SagaStateError,
    SagaStoreError,
)
from saga_celery._store import MemoryStore, RedisStore
from saga_celery._store.history import MARKER, decode_history, encode_history
from saga_celery._store.retention import parse_retention
from tests.unit.sim import plan

STEPS = ["a", "b", "c", "d", "e"]


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def store(client: fakeredis.FakeRedis) -> RedisStore:
    """A store whose finisher does nothing by itself: each test finishes sagas by hand."""
    made = RedisStore(client, prefix="h:")
    made.finisher.submit = lambda saga_id: None  # type: ignore[method-assign]
    return made


def run_to_end(engine: Engine, saga_id: str, *, fail_last: bool = False,
               rollback_fails: bool = False, format: int = 4) -> None:
    """Start a five-step saga and run it: complete, or with its last step failing."""
    engine.submit(saga_id=saga_id, name="five", plan=plan(*STEPS), params={"o": 1},
                  format=format)
    for name in STEPS:
        key = f"{name}#1"
        engine.handle(saga_id, AttemptStarted(kind=Kind.STEP, key=key, attempt=1))
        if fail_last and name == STEPS[-1]:
            engine.handle(saga_id, AttemptFailed(kind=Kind.STEP, key=key, attempt=1,
                                                 error=ErrorInfo(type="Boom", message="x"),
                                                 retryable=False))
            break
        engine.handle(saga_id, AttemptSucceeded(kind=Kind.STEP, key=key, attempt=1,
                                                output={"step": name}))
    if fail_last:
        drive_rollbacks(engine, saga_id, ok=not rollback_fails)


def drive_rollbacks(engine: Engine, saga_id: str, *, ok: bool) -> None:
    """Run every rollback message due, succeeding or failing, until the saga ends."""
    for _ in range(20):
        run = engine.load(saga_id).run
        if run.is_terminal:
            return
        for dispatch in list(run.outbox.values()):
            engine.handle(saga_id, AttemptStarted(kind=dispatch.kind, key=dispatch.key,
                                                  attempt=dispatch.attempt))
            if ok:
                engine.handle(saga_id, AttemptSucceeded(
                    kind=dispatch.kind, key=dispatch.key, attempt=dispatch.attempt,
                    output=None))
            else:
                engine.handle(saga_id, AttemptFailed(
                    kind=dispatch.kind, key=dispatch.key, attempt=dispatch.attempt,
                    error=ErrorInfo(type="Declined", message="no"), retryable=False))
    raise AssertionError(f"saga {saga_id} did not end")


def test_compaction_keeps_status_events_and_version_exactly(
        store: RedisStore, client: fakeredis.FakeRedis) -> None:
    """After the finisher compacts a saga, ``load``, ``status`` and ``read_events`` give
    what they gave before, the event stream is gone and the marker dropped."""
    engine = Engine(store)
    run_to_end(engine, "s1")
    before = store.load("s1")
    events = store.read_events("s1")
    assert before is not None and before.run.status == SagaStatus.COMPLETE
    assert client.zscore("h:finishing", "s1") is not None

    assert store.finish("s1")
    after = store.load("s1")
    assert after is not None
    assert after.run == before.run and after.version == before.version
    assert to_state(after.run) == to_state(before.run)
    assert store.read_events("s1") == events
    assert store.read_events("s1", after=events[3][0], count=2) == events[4:6]
    assert client.exists("h:{s1}:events") == 0
    assert set(client.hkeys("h:{s1}:state")) == {b"v", b"t", b"c", b"d"}
    assert client.hget("h:{s1}:state", "d") == MARKER
    assert client.zscore("h:finishing", "s1") is None
    assert store.finish("s1")  # again: nothing to do, nothing changed
    assert store.load("s1") == after


def test_a_late_message_for_a_compacted_saga_is_dropped_as_before(store: RedisStore) -> None:
    """A duplicate start of an ended attempt changes nothing, compacted or not."""
    engine = Engine(store)
    run_to_end(engine, "s2")
    store.finish("s2")
    version = store.load("s2").version  # type: ignore[union-attr]
    transition = Engine(store).handle("s2", AttemptStarted(kind=Kind.STEP, key="c#1",
                                                           attempt=1))
    assert not transition.dispatches
    assert store.load("s2").version == version  # type: ignore[union-attr]


def test_retry_rollback_of_a_compacted_saga_expands_it_first(
        store: RedisStore, client: fakeredis.FakeRedis) -> None:
    """Reviving a compacted saga (its rollback failed) gives it its full record back, runs
    it, and it is compacted again when it ends."""
    engine = Engine(store)
    run_to_end(engine, "s3", fail_last=True, rollback_fails=True)
    failed = store.load("s3")
    assert failed is not None and failed.run.status == SagaStatus.ERRORED
    events = store.read_events("s3")
    store.finish("s3")
    assert client.hexists("h:{s3}:state", "c")

    transition = engine.handle("s3", RetryRollbackRequested())
    assert transition.refusal is None and transition.dispatches
    assert not client.hexists("h:{s3}:state", "c")  # expanded: a live record again
    assert store.read_events("s3")[: len(events)] == events
    drive_rollbacks(engine, "s3", ok=True)
    assert client.zscore("h:finishing", "s3") is not None
    assert store.finish("s3")
    assert client.hexists("h:{s3}:state", "c")
    assert store.load("s3").run.status == SagaStatus.ERRORED  # type: ignore[union-attr]


def test_a_format_2_saga_keeps_its_full_record(store: RedisStore,
                                               client: fakeredis.FakeRedis) -> None:
    """Sagas created for 0.2.0 readers (``write_format=2``) are neither marked nor
    compacted: a 0.2.0 process reads them to their end."""
    run_to_end(Engine(store), "s4", format=2)
    assert client.zscore("h:finishing", "s4") is None
    assert store.finish("s4")
    assert client.hexists("h:{s4}:state", "p") and client.exists("h:{s4}:events")


def test_a_marker_left_by_a_dead_process_is_finished_by_the_sweep(
        store: RedisStore, client: fakeredis.FakeRedis) -> None:
    """``finish_pending`` finishes what a process that died after the commit left marked,
    once the marker is older than the grace."""
    run_to_end(Engine(store), "s5")
    assert store.finish_pending(older_than_ms=60_000) == 0  # too fresh: its owner may live
    assert not client.hexists("h:{s5}:state", "c")
    assert store.finish_pending(older_than_ms=0) == 1
    assert client.hexists("h:{s5}:state", "c")
    assert client.zcard("h:finishing") == 0


def test_the_finisher_thread_compacts_without_being_asked(client: fakeredis.FakeRedis) -> None:
    """With the thread on (the default), an ended saga is compacted off the ending call."""
    store = RedisStore(client, prefix="t:")
    run_to_end(Engine(store), "s6")
    assert store.finisher.drain(10.0)
    assert client.hexists("t:{s6}:state", "c")


def test_an_unreadable_history_is_named_corrupt(store: RedisStore,
                                                client: fakeredis.FakeRedis) -> None:
    run_to_end(Engine(store), "s7")
    store.finish("s7")
    client.hset("h:{s7}:state", "c", b"not zlib")
    with pytest.raises(SagaCorruptStateError, match="readable saga history"):
        store.load("s7")


def test_an_archived_saga_without_an_archive_says_what_to_configure(
        store: RedisStore, client: fakeredis.FakeRedis) -> None:
    run_to_end(Engine(store), "s8")
    client.hset("h:{s8}:state", mapping={"a": "pg", "s": "complete"})
    client.hdel("h:{s8}:state", "p")
    with pytest.raises(SagaStoreError, match=r"archive=\.\.\."):
        store.load("s8")
    with pytest.raises(SagaStoreError, match=r"archive=\.\.\."):  # so does a list
        store.load_runs(["s8"])


def test_a_list_reads_compacted_and_live_sagas_as_a_load_does(store: RedisStore) -> None:
    """``load_runs``, what a list of sagas reads, gives each saga's run as ``load`` does,
    compacted or not, in the order asked, None for an id Redis no longer has."""
    engine = Engine(store)
    run_to_end(engine, "l1")
    run_to_end(engine, "l2", fail_last=True)
    assert store.finish("l1")
    engine.submit(saga_id="l3", name="five", plan=plan(*STEPS), params={})

    runs = store.load_runs(["l3", "gone", "l2", "l1"])

    expected = [store.load(i) for i in ("l3", "gone", "l2", "l1")]
    assert runs == [None if e is None else e.run for e in expected]
    assert [r.status if r else None for r in runs] == [
        SagaStatus.QUEUED, None, SagaStatus.ERRORED, SagaStatus.COMPLETE]


def test_history_round_trips_and_is_small() -> None:
    """The compacted value gives back the run, version and events; a five-step saga's
    fits well under 2 KB."""
    store = RedisStore(fakeredis.FakeRedis(), prefix="x:")
    store.finisher.submit = lambda saga_id: None  # type: ignore[method-assign]
    run_to_end(Engine(store), "s9")
    snapshot = store.load("s9")
    assert snapshot is not None
    events = store.read_events("s9")
    blob = encode_history(snapshot.run, snapshot.version, events)
    assert len(blob) < 1500
    back = decode_history(blob)
    assert (back.run, back.version, back.events) == (snapshot.run, snapshot.version, events)


def test_delete_refuses_a_running_saga_and_removes_an_ended_one(
        store: RedisStore, client: fakeredis.FakeRedis) -> None:
    engine = Engine(store)
    engine.submit(saga_id="r", name="five", plan=plan(*STEPS), params=None, format=4)
    with pytest.raises(SagaStateError, match="still running"):
        store.delete("r")
    assert store.load("r") is not None
    run_to_end(engine, "e")
    store.finish("e")
    assert store.delete("e")
    assert store.load("e") is None and client.zscore("h:index", "e") is None
    assert not store.delete("e")


def test_memory_store_deletes_too() -> None:
    store = MemoryStore()
    engine = Engine(store)
    engine.submit(saga_id="r", name="five", plan=plan(*STEPS), params=None, format=4)
    with pytest.raises(SagaStateError):
        store.delete("r")
    run_to_end(engine, "e")
    assert store.delete("e") and store.load("e") is None


def test_retention_by_outcome_sets_each_ttl(store: RedisStore,
                                            client: fakeredis.FakeRedis) -> None:
    by_outcome = RedisStore(client, prefix="r:", retention_ms={"complete": 1000,
                                                                "errored": 9_000_000})
    by_outcome.finisher.submit = lambda saga_id: None  # type: ignore[method-assign]
    engine = Engine(by_outcome)
    run_to_end(engine, "ok")
    run_to_end(engine, "bad", fail_last=True)
    assert 0 < client.pttl("r:{ok}:state") <= 1000
    assert 8_000_000 < client.pttl("r:{bad}:state") <= 9_000_000


@pytest.mark.parametrize(("value", "message"), [
    ({"completed": "1 day"}, r"\['completed'\] is not an outcome"),
    ({"complete": "soon"}, r"retention\['complete'\].*invalid duration"),
    ({"errored": 0}, "must be positive"),
    ("-1 day", "invalid duration"),
])
def test_a_bad_retention_is_refused_naming_it(value: Any, message: str) -> None:
    with pytest.raises(SagaConfigError, match=message):
        parse_retention(value)


def test_retention_takes_one_duration_or_one_per_outcome() -> None:
    assert parse_retention("2 days") == 2 * 86_400_000
    assert parse_retention({"complete": "1 day", "terminated": "30 days"}) == {
        "complete": 86_400_000, "terminated": 30 * 86_400_000}


def test_sagaapp_refuses_an_archive_that_is_not_postgresql() -> None:
    app = Celery("h", broker="memory://", set_as_current=False)
    with pytest.raises(SagaConfigError, match="postgresql://"):
        SagaApp(app, redis_url="redis://127.0.0.1:6379/11", archive="mysql://x@y/z")
    with pytest.raises(SagaConfigError, match="store="):
        SagaApp(app, store=MemoryStore(), archive="postgresql://x@y/z")


def test_sagaapp_takes_retention_by_outcome() -> None:
    app = Celery("h2", broker="memory://", set_as_current=False)
    SagaApp(app, redis_url="redis://127.0.0.1:6379/11",
            retention={"complete": "1 day", "errored": "30 days", "terminated": "30 days"})
    with pytest.raises(SagaConfigError, match="not an outcome"):
        SagaApp(app, redis_url="redis://127.0.0.1:6379/11", retention={"done": "1 day"})


def test_an_unknown_saga_cannot_be_deleted() -> None:
    app = Celery("h3", broker="memory://", set_as_current=False)
    sagas = SagaApp(app, store=MemoryStore())
    with pytest.raises(SagaNotFoundError):
        sagas.reader.delete("nope")


def test_the_stored_records_spliced_decode_as_the_parsed_ones_do(
        store: RedisStore, client: fakeredis.FakeRedis) -> None:
    """The finisher compacts a saga from its stored JSON as it is (``encode_stored_history``):
    it decodes to what ``encode_history`` of the parsed run and events decodes to.  A stored
    event that is not a JSON object takes the parsing path, which names it corrupt and
    leaves the saga (and its marker) as they were."""
    from saga_celery._store.history import encode_stored_history

    engine = Engine(store)
    run_to_end(engine, "s3", fail_last=True)
    snapshot = store.load("s3")
    events = store.read_events("s3")
    assert snapshot is not None
    raw = client.xrange("h:{s3}:events")
    spliced = encode_stored_history(snapshot.version, client.hget("h:{s3}:state", "d"),
                                    client.hget("h:{s3}:state", "p"),
                                    [(i, f[b"e"]) for i, f in raw])
    parsed = encode_history(snapshot.run, snapshot.version, events)
    assert decode_history(spliced) == decode_history(parsed)

    run_to_end(engine, "s4")
    client.xadd("h:{s4}:events", {"e": "[1, 2]"})
    assert not store.finish("s4")  # logged as deferred: corrupt
    assert client.exists("h:{s4}:events") == 1 and client.zscore("h:finishing", "s4")
