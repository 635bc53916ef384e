"""The ``SagaStore`` contract: every implementation behaves the same way."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast
from uuid import uuid4

import fakeredis
import pytest
import redis
from redis import crc
from redis.cluster import RedisCluster

import saga_celery._store as store_package
from saga_celery._core.model import Plan, SagaRun, SagaStatus
from saga_celery._errors import (
    SagaConfigError,
    SagaCorruptStateError,
    SagaStoreError,
    SagaStoreUnavailableError,
)
from saga_celery._store import (
    CorruptRecord,
    LeaseAction,
    LeaseChange,
    MemoryStore,
    RedisStore,
    SagaStore,
    Snapshot,
    SweepRecord,
    active_pages,
)
from saga_celery._store.encoding import encode_progress
from tests.contract.conftest import REDIS_URL, Backend, make_event, make_run

pytestmark = pytest.mark.timeout(30)

LEASE = "attempt:reserve#1:1"


def acquire(token: str, ttl_ms: int = 10_000) -> LeaseChange:
    return LeaseChange(LEASE, token, LeaseAction.ACQUIRE, ttl_ms)


def release(token: str) -> LeaseChange:
    return LeaseChange(LEASE, token, LeaseAction.RELEASE)


def types(store: SagaStore, saga_id: str, after: str = "0") -> list[str]:
    return [event["type"] for _, event in store.read_events(saga_id, after=after)]


def version_of(store: SagaStore, saga_id: str) -> int:
    snapshot = store.load(saga_id)
    assert snapshot is not None
    return snapshot.version


# -- create and load ------------------------------------------------------------------------


def test_create_then_load_round_trips(store: SagaStore) -> None:
    """A created run loads back equal, at version 1, with its first events."""
    run = make_run()
    assert store.create(run, [make_event(run, "saga_queued")]) is True
    snapshot = store.load(run.id)
    assert snapshot is not None
    assert snapshot.run == run
    assert snapshot.version == 1
    assert snapshot.lease_holder is None
    assert types(store, run.id) == ["saga_queued"]


def test_create_twice_keeps_the_first_run(store: SagaStore) -> None:
    """Creating an id that exists returns False and leaves the first run and events alone."""
    first = make_run("order-1")
    store.create(first, [make_event(first, "saga_queued")])
    second = make_run("order-1", params={"order": 43})
    assert store.create(second, [make_event(second, "saga_queued")]) is False
    snapshot = store.load("order-1")
    assert snapshot is not None
    assert snapshot.run == first
    assert types(store, "order-1") == ["saga_queued"]


def test_load_unknown_id_is_none(store: SagaStore) -> None:
    """Loading an id that was never created returns None, with or without a lease."""
    assert store.load("nope") is None
    assert store.load("nope", lease=LEASE) is None


# -- commit ---------------------------------------------------------------------------------


def test_commit_at_current_version_bumps_it(store: SagaStore) -> None:
    """A commit at the stored version writes the run as version + 1."""
    run = make_run()
    store.create(run, [])
    running = run.model_copy(update={"status": SagaStatus.RUNNING})
    assert store.commit(running, version=1, events=[make_event(run, "saga_started")]) is True
    snapshot = store.load(run.id)
    assert snapshot is not None
    assert (snapshot.version, snapshot.run) == (2, running)


def test_stale_commit_writes_nothing(store: SagaStore) -> None:
    """A commit at an old version returns False and adds neither state nor events."""
    run = make_run()
    store.create(run, [make_event(run, "saga_queued")])
    store.commit(run, version=1, events=[make_event(run, "saga_started")])
    stale = run.model_copy(update={"status": SagaStatus.COMPLETE})
    assert store.commit(stale, version=1, events=[make_event(run, "saga_completed")]) is False
    snapshot = store.load(run.id)
    assert snapshot is not None
    assert (snapshot.version, snapshot.run) == (2, run)
    assert types(store, run.id) == ["saga_queued", "saga_started"]


def test_commit_to_unknown_saga_fails(store: SagaStore) -> None:
    """A commit for an id that was never created returns False and creates nothing."""
    run = make_run()
    assert store.commit(run, version=1, events=[make_event(run, "saga_started")]) is False
    assert store.load(run.id) is None


def test_replayed_commit_applies_once(store: SagaStore) -> None:
    """A commit sent twice (redis-py's retry after a dropped reply) fails the second time."""
    run = make_run()
    store.create(run, [])
    events = [make_event(run, "saga_started"), make_event(run, "step_started")]
    assert store.commit(run, version=1, events=events) is True
    assert store.commit(run, version=1, events=events) is False
    assert version_of(store, run.id) == 2
    assert [event for _, event in store.read_events(run.id)] == events


def test_events_are_appended_in_order_and_read_after_an_id(store: SagaStore) -> None:
    """Events of successive commits come back oldest first; ``after`` is exclusive."""
    run = make_run()
    store.create(run, [make_event(run, "saga_queued")])
    store.commit(run, version=1, events=[make_event(run, "saga_started")])
    store.commit(run, version=2, events=[make_event(run, "step_started", step="reserve")])
    read = store.read_events(run.id)
    assert [event["type"] for _, event in read] == ["saga_queued", "saga_started", "step_started"]
    assert read[2][1]["step"] == "reserve"
    assert types(store, run.id, after=read[0][0]) == ["saga_started", "step_started"]
    assert store.read_events(run.id, after=read[2][0]) == []
    assert [i for i, _ in store.read_events(run.id, count=2)] == [read[0][0], read[1][0]]


def test_read_events_of_unknown_saga_is_empty(store: SagaStore) -> None:
    """Reading the events of an unknown saga returns an empty list, also when blocking."""
    assert store.read_events("nope") == []
    assert store.read_events("nope", block_ms=50) == []


def test_read_events_blocks_until_a_commit(store: SagaStore) -> None:
    """A blocking read returns as soon as another thread commits a newer event."""
    run = make_run()
    store.create(run, [make_event(run, "saga_queued")])
    ((last, _),) = store.read_events(run.id)

    def commit_later() -> None:
        time.sleep(0.2)
        store.commit(run, version=1, events=[make_event(run, "saga_started")])

    thread = threading.Thread(target=commit_later)
    started = time.monotonic()
    thread.start()
    read = store.read_events(run.id, after=last, block_ms=2000)
    thread.join()
    assert [event["type"] for _, event in read] == ["saga_started"]
    assert time.monotonic() - started < 1.5


# -- leases ---------------------------------------------------------------------------------


def test_commit_acquires_a_free_lease(store: SagaStore) -> None:
    """A commit with an acquire takes a free lease, and load(lease=...) names its holder."""
    run = make_run()
    store.create(run, [])
    assert store.commit(run, version=1, events=[], lease=acquire("worker-a")) is True
    snapshot = store.load(run.id, lease=LEASE)
    assert snapshot is not None
    assert snapshot.lease_holder == "worker-a"


def test_acquire_of_a_held_lease_fails_the_commit(store: SagaStore) -> None:
    """An acquire while another token holds the lease writes nothing; the holder may re-acquire."""
    run = make_run()
    store.create(run, [])
    store.commit(run, version=1, events=[], lease=acquire("worker-a"))
    event = make_event(run, "attempt_started")
    assert store.commit(run, version=2, events=[event], lease=acquire("worker-b")) is False
    assert version_of(store, run.id) == 2
    assert types(store, run.id) == []
    assert store.commit(run, version=2, events=[event], lease=acquire("worker-a")) is True
    assert version_of(store, run.id) == 3


def test_release_lease_only_by_its_holder(store: SagaStore) -> None:
    """Releasing a lease returns False for another token and True for the holder."""
    run = make_run()
    store.create(run, [])
    store.commit(run, version=1, events=[], lease=acquire("worker-a"))
    assert store.release_lease(run.id, LEASE, "worker-b") is False
    assert store.release_lease(run.id, LEASE, "worker-a") is True
    assert store.release_lease(run.id, LEASE, "worker-a") is False
    snapshot = store.load(run.id, lease=LEASE)
    assert snapshot is not None
    assert snapshot.lease_holder is None


def test_commit_releases_a_lease_only_for_its_holder(store: SagaStore) -> None:
    """A release with a commit frees the lease if the token holds it, and commits either way."""
    run = make_run()
    store.create(run, [])
    store.commit(run, version=1, events=[], lease=acquire("worker-a"))
    assert store.commit(run, version=2, events=[], lease=release("worker-b")) is True
    holder = store.load(run.id, lease=LEASE)
    assert holder is not None
    assert holder.lease_holder == "worker-a"
    assert store.commit(run, version=3, events=[], lease=release("worker-a")) is True
    freed = store.load(run.id, lease=LEASE)
    assert freed is not None
    assert freed.lease_holder is None


def test_renew_lease_only_by_its_holder(backend: Backend) -> None:
    """Renewing extends the holder's lease past its first deadline; another token cannot."""
    store, run = backend.store, make_run()
    store.create(run, [])
    store.commit(run, version=1, events=[], lease=acquire("worker-a", ttl_ms=300))
    assert store.renew_lease(run.id, LEASE, "worker-b", 5000) is False
    assert store.renew_lease(run.id, LEASE, "worker-a", 5000) is True
    backend.elapse_ms(400)
    snapshot = store.load(run.id, lease=LEASE)
    assert snapshot is not None
    assert snapshot.lease_holder == "worker-a"


def test_lease_expires(backend: Backend) -> None:
    """A lease not renewed runs out: nobody holds it, renew fails and another token takes it."""
    store, run = backend.store, make_run()
    store.create(run, [])
    store.commit(run, version=1, events=[], lease=acquire("worker-a", ttl_ms=50))
    backend.elapse_ms(200)
    snapshot = store.load(run.id, lease=LEASE)
    assert snapshot is not None
    assert snapshot.lease_holder is None
    assert store.renew_lease(run.id, LEASE, "worker-a", 1000) is False
    assert store.commit(run, version=2, events=[], lease=acquire("worker-b")) is True


def test_lease_ttl_must_be_positive(store: SagaStore) -> None:
    """An acquire or renew with a non-positive ttl is a programming error, not a silent no-op."""
    run = make_run()
    store.create(run, [])
    with pytest.raises(ValueError, match="ttl_ms"):
        store.commit(run, version=1, events=[], lease=acquire("worker-a", ttl_ms=0))
    with pytest.raises(ValueError, match="ttl_ms"):
        store.renew_lease(run.id, LEASE, "worker-a", 0)


def test_read_events_count_must_be_positive(store: SagaStore) -> None:
    """A read with a non-positive count is a programming error, as redis-py makes it."""
    with pytest.raises(ValueError, match="count"):
        store.read_events("any", count=0)


# -- indexes --------------------------------------------------------------------------------


def test_terminal_commit_leaves_the_active_index(store: SagaStore) -> None:
    """A terminal commit drops the saga from active_ids; a non-terminal one keeps it there."""
    live, done = make_run(created=1), make_run(created=2)
    store.create(live, [])
    store.create(done, [])
    store.commit(live, version=1, events=[])
    assert store.commit(done, version=1, events=[], terminal=True) is True
    assert store.active_ids() == [live.id]
    assert store.list_ids() == [done.id, live.id]


def test_conflicting_terminal_commit_keeps_the_saga_active(store: SagaStore) -> None:
    """A terminal commit that loses a version conflict leaves the saga in active_ids."""
    run = make_run()
    store.create(run, [])
    store.commit(run, version=1, events=[])
    assert store.commit(run, version=1, events=[], terminal=True) is False
    assert store.active_ids() == [run.id]


def test_commit_after_terminal_makes_the_saga_active_again(store: SagaStore) -> None:
    """A non-terminal commit after a terminal one (retry_rollback) puts the id back in active."""
    run = make_run()
    store.create(run, [])
    store.commit(run, version=1, events=[], terminal=True)
    assert store.active_ids() == []
    assert store.commit(run, version=2, events=[]) is True
    assert store.active_ids() == [run.id]


def test_active_ids_oldest_first_and_forget(store: SagaStore) -> None:
    """active_ids lists by creation time, oldest first, up to limit; forget_active drops a
    terminal saga the index still holds (it is a superset)."""
    runs = [make_run(created=seconds) for seconds in (30, 10, 20)]
    for run in runs:
        store.create(run, [])
    assert store.active_ids() == [runs[1].id, runs[2].id, runs[0].id]
    assert store.active_ids(limit=2) == [runs[1].id, runs[2].id]
    store.commit(runs[2], version=1, events=[], terminal=True)
    assert store.commit(runs[2], version=1, events=[], terminal=True) is False  # stays listed
    assert runs[2].id in store.active_ids()
    store.forget_active(runs[2].id)
    assert store.active_ids() == [runs[1].id, runs[0].id]
    assert store.active_ids(limit=0) == []


def test_forget_active_keeps_a_live_saga(store: SagaStore) -> None:
    """A sweep that saw a saga terminal may forget it after retry_rollback revived it: the
    revived saga stays in active_ids, whichever of the two came first."""
    run, gone = make_run(), make_run()
    store.create(run, [])
    store.commit(run, version=1, events=[], terminal=True)
    store.commit(run, version=2, events=[])  # revived: back in the index
    store.forget_active(run.id)  # the sweep saw version 2 and calls it late
    assert store.active_ids() == [run.id]
    store.forget_active(gone.id)  # never created: nothing to keep
    assert store.active_ids() == [run.id]


def test_active_pages_visit_every_active_saga_once_oldest_first(store: SagaStore) -> None:
    """Pages of 10 over 25 active sagas give each once, oldest first; a page ends only where
    a creation time ends, so one holds every saga created in its last millisecond."""
    runs = [make_run(f"a-{i:02d}", created=i // 3) for i in range(25)]  # three per second
    for run in reversed(runs):
        store.create(run, [])

    pages = list(active_pages(store, 10))

    assert [saga_id for page in pages for saga_id in page] == [run.id for run in runs]
    assert [len(page) for page in pages] == [12, 12, 1]


def test_active_pages_keep_their_place_while_sagas_leave(store: SagaStore) -> None:
    """A saga that ends while the pages are read, before or after the page it is on, moves
    no other saga out of the pages."""
    runs = [make_run(f"b-{i:02d}", created=i) for i in range(25)]
    for run in runs:
        store.create(run, [])
    pages = active_pages(store, 10)

    seen = next(pages)
    for ended in (runs[3], runs[15]):
        store.commit(ended, version=1, events=[], terminal=True)
    seen += [saga_id for page in pages for saga_id in page]

    assert seen == [run.id for run in runs if run is not runs[15]]


def test_active_page_of_an_empty_index_is_the_last(store: SagaStore) -> None:
    """With no active saga, the first page is empty and no page follows."""
    assert store.active_page(None, 10) == ([], None)
    with pytest.raises(ValueError, match="count"):
        store.active_page(None, 0)


def test_a_saga_marked_corrupt_leaves_the_active_index_for_the_corrupt_records(
    store: SagaStore,
) -> None:
    """mark_corrupt moves an id out of the active index into the corrupt records (most
    recently moved first, with when and why); marking it again updates them."""
    first, second = make_run("c-1"), make_run("c-2", created=1)
    for run in (first, second):
        store.create(run, [])
    store.mark_corrupt("c-1", "unreadable", at_ms=1000)
    store.mark_corrupt("c-2", "WRONGTYPE", at_ms=2000)

    assert store.active_ids() == []
    assert store.corrupt_records() == [CorruptRecord("c-2", 2000, "WRONGTYPE"),
                                       CorruptRecord("c-1", 1000, "unreadable")]
    assert store.corrupt_records(limit=1) == [CorruptRecord("c-2", 2000, "WRONGTYPE")]
    assert store.corrupt_records(limit=0) == []
    store.mark_corrupt("c-1", "still unreadable", at_ms=3000)
    assert store.corrupt_records()[0] == CorruptRecord("c-1", 3000, "still unreadable")
    assert store.list_ids() == ["c-2", "c-1"]  # the index keeps them: nothing is deleted


def test_list_ids_newest_first(store: SagaStore) -> None:
    """list_ids lists every saga, terminal or not, newest first, up to limit."""
    runs = [make_run(created=seconds) for seconds in (10, 30, 20)]
    for run in runs:
        store.create(run, [])
    store.commit(runs[1], version=1, events=[], terminal=True)
    assert store.list_ids() == [runs[1].id, runs[2].id, runs[0].id]
    assert store.list_ids(limit=1) == [runs[1].id]


def test_load_runs_reads_each_run_in_order_none_for_an_unknown_id(store: SagaStore) -> None:
    """What a list of sagas reads: each run as ``load`` gives it, in the order asked."""
    runs = [make_run(created=seconds) for seconds in (10, 30, 20)]
    for run in runs:
        store.create(run, [])
    store.commit(runs[1], version=1, events=[], terminal=True)
    ids = [runs[2].id, "never-made", runs[1].id, runs[0].id]

    loaded = store.load_runs(ids)

    assert loaded == [None if (s := store.load(i)) is None else s.run for i in ids]
    assert [r.id if r else None for r in loaded] == [runs[2].id, None, runs[1].id, runs[0].id]
    assert store.load_runs([]) == []


def test_memory_retention_expires_terminal_sagas() -> None:
    """The memory twin forgets a terminal saga's state and events once retention passes."""
    clock = {"now": 0.0}
    store = MemoryStore(clock=lambda: clock["now"], retention_ms=1000)
    run = make_run()
    store.create(run, [make_event(run, "saga_queued")])
    store.commit(run, version=1, events=[], terminal=True)
    clock["now"] = 0.9
    assert store.load(run.id) is not None
    clock["now"] = 1.1
    assert store.load(run.id) is None
    assert store.read_events(run.id) == []
    assert store.create(run, []) is True


# -- what lives in Redis --------------------------------------------------------------------


def saga_keys(backend: Backend) -> list[str]:
    assert backend.client is not None
    keys = [k.decode() for k in backend.client.scan_iter(match=f"{backend.prefix}*")]
    return sorted(k for k in keys if k not in {f"{backend.prefix}index", f"{backend.prefix}active"})


def test_terminal_commit_starts_the_retention_clock(redis_backend: Backend) -> None:
    """A terminal commit puts the retention TTL on the state and events keys, not before."""
    client, store, run = redis_backend.client, redis_backend.store, make_run()
    assert client is not None
    store.create(run, [make_event(run, "saga_queued")])
    state, events = (f"{redis_backend.prefix}{{{run.id}}}:{name}" for name in ("state", "events"))
    assert (client.pttl(state), client.pttl(events)) == (-1, -1)
    store.commit(run, version=1, events=[], terminal=True)
    week_ms = 7 * 24 * 3600 * 1000
    assert week_ms - 60_000 < client.pttl(state) <= week_ms
    assert week_ms - 60_000 < client.pttl(events) <= week_ms
    store.commit(run, version=2, events=[])
    assert (client.pttl(state), client.pttl(events)) == (-1, -1)


def test_all_keys_of_a_saga_share_its_hash_tag(redis_backend: Backend) -> None:
    """Every key of one saga carries ``{id}``, so they share one Redis Cluster slot."""
    store, run = redis_backend.store, make_run()
    store.create(run, [make_event(run, "saga_queued")])
    store.commit(run, version=1, events=[make_event(run, "saga_started")], lease=acquire("w"))
    keys = saga_keys(redis_backend)
    assert len(keys) == 3
    assert all(f"{{{run.id}}}" in key for key in keys)
    key_slot = cast(Callable[[bytes], int], crc.key_slot)
    assert len({key_slot(key.encode()) for key in keys}) == 1


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], Any]], int]:
    """Counts the requests sent to Redis (a pipeline is one) while a callable runs."""
    sent = [0]
    original = cast(Callable[..., None], redis.connection.AbstractConnection.send_packed_command)

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent[0] += 1
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)

    def count(operation: Callable[[], Any]) -> int:
        before = sent[0]
        operation()
        return sent[0] - before

    return count


def test_every_operation_is_one_round_trip(
    one_node_backend: Backend, round_trips: Callable[[Callable[[], Any]], int]
) -> None:
    """Each store method sends exactly one request to Redis once its scripts are loaded."""
    store = one_node_backend.store

    def scenario(run: Any) -> dict[str, Callable[[], Any]]:
        return {
            "ping": store.ping,
            "create": lambda: store.create(run, [make_event(run, "saga_queued")]),
            "load": lambda: store.load(run.id, lease=LEASE),
            "load_runs": lambda: store.load_runs([run.id, "unknown-1", "unknown-2"]),
            "commit": lambda: store.commit(run, version=1, events=[], lease=acquire("w")),
            "renew_lease": lambda: store.renew_lease(run.id, LEASE, "w", 5000),
            "release_lease": lambda: store.release_lease(run.id, LEASE, "w"),
            "read_events": lambda: store.read_events(run.id),
            "active_ids": store.active_ids,
            "list_ids": store.list_ids,
            "terminal commit": lambda: store.commit(run, version=2, events=[], terminal=True),
            "forget_active": lambda: store.forget_active(run.id),
        }

    for operation in scenario(make_run()).values():
        operation()  # loads the scripts and opens the connection
    counts = {name: round_trips(op) for name, op in scenario(make_run()).items()}
    assert counts == dict.fromkeys(counts, 1)


def test_on_a_cluster_one_sagas_work_is_one_request_to_its_node(
        cluster_backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Redis Cluster a load, a commit and a lease change are one request, to the node of
    the saga's slot; a create or a terminal commit adds one request per node holding an
    index set, and nothing else."""
    backend = cluster_backend
    client, store, run = cast(RedisCluster, backend.client), backend.store, make_run()
    sent: list[str] = []
    original = cast(Callable[..., None], redis.connection.AbstractConnection.send_packed_command)

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(f"127.0.0.1:{self.port}")
        original(self, command, check_health)

    def nodes(*keys: str) -> list[str]:
        return sorted({client.get_node_from_key(key).name for key in keys})

    def scenario(run: SagaRun) -> list[tuple[Callable[[], Any], list[str]]]:
        saga = nodes(f"{backend.prefix}{{{run.id}}}:state")
        index = nodes(f"{backend.prefix}index", f"{backend.prefix}active")
        return [
            (lambda: store.create(run, [make_event(run, "saga_queued")]),
             sorted({*saga, *index})),
            (lambda: store.load(run.id, lease=LEASE), saga),
            (lambda: store.commit(run, version=1, events=[], lease=acquire("w")), saga),
            (lambda: store.renew_lease(run.id, LEASE, "w", 5000), saga),
            (lambda: store.release_lease(run.id, LEASE, "w"), saga),
            (lambda: store.commit(run, version=2, events=[], terminal=True),
             sorted({*saga, *nodes(f"{backend.prefix}active")})),
        ]

    for operation, _ in scenario(make_run()):
        operation()  # loads the scripts on every node
    client.ping(target_nodes=RedisCluster.PRIMARIES)  # opens a connection to every node
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    for operation, expected in scenario(run):
        sent.clear()
        operation()
        assert sorted(sent) == expected


def test_a_flushed_script_is_loaded_again(redis_backend: Backend) -> None:
    """After Redis forgets the scripts (restart, failover) the next commit reloads them."""
    client, store, run = redis_backend.client, redis_backend.store, make_run()
    assert client is not None
    store.create(run, [])
    client.script_flush()
    assert store.commit(run, version=1, events=[make_event(run, "saga_started")]) is True
    client.script_flush()
    assert store.create(make_run(), []) is True


@pytest.mark.parametrize(
    "data",
    [b"not json", b'{"id": "x"}', b"[]"],
    ids=["not-json", "missing-fields", "not-an-object"],
)
def test_unreadable_state_is_corrupt(redis_backend: Backend, data: bytes) -> None:
    """A state record saga_celery cannot parse raises SagaCorruptStateError naming the saga."""
    client, store, run = redis_backend.client, redis_backend.store, make_run()
    assert client is not None
    store.create(run, [])
    state = f"{redis_backend.prefix}{{{run.id}}}:state"
    client.hset(state, "d", data)
    with pytest.raises(SagaCorruptStateError, match=r"delete it") as raised:
        store.load(run.id)
    assert raised.value.saga_id == run.id
    assert state in str(raised.value)
    assert isinstance(raised.value.__cause__, Exception)


def test_unreadable_version_is_corrupt(redis_backend: Backend) -> None:
    """A version that is not a positive integer raises SagaCorruptStateError."""
    client, store, run = redis_backend.client, redis_backend.store, make_run()
    assert client is not None
    store.create(run, [])
    client.hset(f"{redis_backend.prefix}{{{run.id}}}:state", "v", "one")
    with pytest.raises(SagaCorruptStateError) as raised:
        store.load(run.id)
    assert raised.value.saga_id == run.id


def test_a_key_of_the_wrong_type_is_corrupt(redis_backend: Backend) -> None:
    """A saga key holding the wrong Redis type fails load, commit and reads with a clear error."""
    client, store, run = redis_backend.client, redis_backend.store, make_run()
    assert client is not None
    state = f"{redis_backend.prefix}{{{run.id}}}:state"
    client.set(state, "hello")
    for operation in (
        lambda: store.load(run.id),
        lambda: store.commit(run, version=1, events=[]),
    ):
        with pytest.raises(SagaCorruptStateError, match=run.id) as raised:
            operation()
        assert raised.value.saga_id == run.id
    assert client.get(state) == b"hello"


def test_a_wrong_type_events_key_fails_the_commit_before_writing(redis_backend: Backend) -> None:
    """A commit whose events key is not a stream writes nothing and names the key."""
    client, store, run = redis_backend.client, redis_backend.store, make_run()
    assert client is not None
    store.create(run, [])
    events = f"{redis_backend.prefix}{{{run.id}}}:events"
    client.set(events, "hello")
    with pytest.raises(SagaCorruptStateError, match=events):
        store.commit(run, version=1, events=[make_event(run, "saga_started")])
    assert version_of(store, run.id) == 1
    if redis_backend.kind == "redis":  # fakeredis 2.41 crashes (AttributeError) on this XREAD
        with pytest.raises(SagaCorruptStateError):
            store.read_events(run.id)


# -- configuration and failures -------------------------------------------------------------


@pytest.fixture
def unreachable() -> Iterator[RedisStore]:
    store = RedisStore.from_url("redis://:hunter2@127.0.0.1:1/0", socket_timeout=0.5)
    yield store


def test_unreachable_redis_is_a_saga_error(unreachable: RedisStore) -> None:
    """An unreachable Redis raises SagaStoreUnavailableError, named without its password."""
    run = make_run()
    for operation in (
        unreachable.ping,
        lambda: unreachable.load(run.id),
        lambda: unreachable.create(run, []),
        lambda: unreachable.commit(run, version=1, events=[]),
        lambda: unreachable.read_events(run.id),
    ):
        with pytest.raises(SagaStoreUnavailableError) as raised:
            operation()
        message = str(raised.value)
        assert "127.0.0.1:1/0" in message
        assert "check the saga store's redis url" in message.lower()
        assert "hunter2" not in message
        assert isinstance(raised.value, ConnectionError)
        assert isinstance(raised.value.__cause__, redis.ConnectionError)


def test_bad_configuration_is_refused() -> None:
    """A prefix that would break the hash tag, or a non-positive retention, is refused."""
    with pytest.raises(SagaConfigError, match="prefix"):
        RedisStore.from_url("redis://127.0.0.1:1/0", prefix="saga{x}:")
    with pytest.raises(SagaConfigError, match="retention_ms"):
        RedisStore.from_url("redis://127.0.0.1:1/0", retention_ms=0)
    with pytest.raises(SagaConfigError, match="retention_ms"):
        MemoryStore(retention_ms=-1)
    with pytest.raises(SagaConfigError, match="URL"):
        RedisStore.from_url("http://127.0.0.1:6379/0")


def test_an_event_that_is_not_json_is_refused(store: SagaStore) -> None:
    """An event that cannot be stored as JSON raises SagaStoreError and writes nothing."""
    run = make_run()
    with pytest.raises(SagaStoreError, match="JSON"):
        store.create(run, [{"type": "saga_queued", "payload": object()}])
    assert store.load(run.id) is None


def test_exported_members() -> None:
    """The store package exports exactly its public names, sorted."""
    expected = ["CorruptRecord", "LeaseAction", "LeaseChange", "MemoryStore", "RedisStore",
                "SagaStore", "Snapshot", "SweepRecord", "Timer", "active_pages"]
    assert store_package.__all__ == expected


def test_resp3_and_decoded_responses_work(redis_backend: Backend) -> None:
    """The store reads the same with RESP3 and with decode_responses=True clients."""
    for protocol in (2, 3):
        client: redis.Redis | RedisCluster
        if redis_backend.kind == "redis":
            client = redis.Redis.from_url(REDIS_URL, protocol=protocol, decode_responses=True)
        elif isinstance(redis_backend.client, RedisCluster):
            node = redis_backend.client.get_default_node()
            client = RedisCluster(host=node.host, port=node.port, protocol=protocol,
                                  decode_responses=True)
        else:
            client = fakeredis.FakeRedis(protocol=protocol, decode_responses=True)
        store, run = RedisStore(client, prefix=redis_backend.prefix), make_run()
        assert store.create(run, [make_event(run, "saga_queued")]) is True
        assert store.commit(run, version=1, events=[], lease=acquire("w")) is True
        assert store.load(run.id, lease=LEASE) == Snapshot(run, 2, "w")
        assert types(store, run.id) == ["saga_queued"]
        assert store.read_events(run.id, after="0", block_ms=10) != []
        assert run.id in store.list_ids()
        assert run.id in store.active_page(None, 1)[0]
        store.mark_corrupt(run.id, "why", at_ms=7)
        assert CorruptRecord(run.id, 7, "why") in store.corrupt_records()
        client.close()


def test_a_block_longer_than_the_socket_timeout_still_waits(real_redis_backend: Backend) -> None:
    """A blocking read longer than the client's socket timeout waits it out, no TimeoutError."""
    prefix = real_redis_backend.prefix
    store = RedisStore.from_url(REDIS_URL, prefix=prefix, socket_timeout=0.3)
    started = time.monotonic()
    assert store.read_events("quiet", block_ms=700) == []
    assert 0.6 < time.monotonic() - started < 2


def test_a_wrong_type_index_key_is_corrupt(redis_backend: Backend) -> None:
    """A global index key of the wrong Redis type raises SagaCorruptStateError naming it."""
    client, store = redis_backend.client, redis_backend.store
    assert client is not None
    client.set(f"{redis_backend.prefix}active", "hello")
    for operation in (store.active_ids, lambda: store.create(make_run(), [])):
        with pytest.raises(SagaCorruptStateError, match=f"{redis_backend.prefix}active"):
            operation()



def test_memory_prune_index_drops_only_expired_sagas() -> None:
    """Pruning the index removes the ids whose retention ran out and keeps the live ones."""
    clock = {"now": 0.0}
    store = MemoryStore(clock=lambda: clock["now"], retention_ms=1000)
    done, live = make_run("p-1"), make_run("p-2")
    for run in (done, live):
        store.create(run, [])
    store.commit(done, version=1, events=[], terminal=True)
    assert store.prune_index() == 0
    clock["now"] = 1.1
    assert store.prune_index() == 1
    assert store.list_ids() == ["p-2"]


def test_redis_prune_index_drops_only_vanished_sagas(redis_backend: Backend) -> None:
    """In Redis, ids whose state key expired leave the index; the others stay."""
    store, client = redis_backend.store, redis_backend.client
    assert client is not None
    for saga_id in ("p-1", "p-2"):
        store.create(make_run(saga_id), [])
    client.delete(f"{redis_backend.prefix}{{p-1}}:state")
    assert store.prune_index() == 1
    assert store.list_ids() == ["p-2"]
    assert store.prune_index() == 0


def test_the_plan_is_written_once(redis_backend: Backend) -> None:
    """create stores the plan in its own field; a commit writes only the run's progress, and
    a load puts the two back together."""
    client, store, run = redis_backend.client, redis_backend.store, make_run()
    assert client is not None
    store.create(run, [])
    state = f"{redis_backend.prefix}{{{run.id}}}:state"
    plan = client.hget(state, "p")
    assert plan is not None and Plan.model_validate_json(plan) == run.plan
    # A plan that does not wait is stored without SPEC section 8's fields (format 2 readers).
    assert json.loads(plan) == run.plan.model_dump(
        mode="json", exclude={"on_failure": True, "hold_timeout_ms": True,
                              "stages": {"__all__": {"__all__": {"wait"}}}})
    moved = run.model_copy(update={"name": "renamed"})
    assert store.commit(moved, version=1, events=[]) is True
    progress = json.loads(client.hget(state, "d") or b"{}")
    assert "plan" not in progress and progress["name"] == "renamed"
    assert client.hget(state, "p") == plan
    loaded = store.load(run.id)
    assert loaded is not None and loaded.run == moved


def test_a_client_that_is_not_redis_redis_goes_through_its_own_api(
        redis_backend: Backend) -> None:
    """The store sends commits and loads on a kept connection of a ``redis.Redis``; any other
    client (a Redis Cluster client routes each command itself) runs them through its API."""
    client, store, run = redis_backend.client, redis_backend.store, make_run()
    assert client is not None and isinstance(store, RedisStore)
    store._raw = False  # as for a client of another class
    assert store.create(run, []) is True
    moved = run.model_copy(update={"name": "renamed"})
    assert store.commit(moved, version=1, events=[{"type": "x"}]) is True
    assert store.commit(moved, version=1, events=[]) is False  # a version conflict
    loaded = store.load(run.id, lease="step:reserve#1")
    assert loaded is not None and (loaded.run, loaded.version) == (moved, 2)
    client.script_flush()  # NOSCRIPT is handled the same way
    assert store.commit(moved, version=2, events=[]) is True


@pytest.mark.parametrize("protocol", [2, 3])
def test_the_kept_connection_reads_every_reply_it_can_get(protocol: int) -> None:
    """The store's exchanges on its kept connection give redis-py's replies, over RESP2 and
    RESP3: integers, strings, nulls, arrays, errors as values (NOSCRIPT as
    ``NoScriptError``), and replies larger than one socket read."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5.0, protocol=protocol)
    prefix = f"sagatest-{uuid4().hex[:8]}:"
    store = RedisStore(client, prefix=prefix)
    big = b"x" * 300_000
    try:
        replies = store._send([
            ("SET", f"{prefix}s", big), ("GET", f"{prefix}s"), ("GET", f"{prefix}none"),
            ("HSET", f"{prefix}h", "a", "1"), ("HMGET", f"{prefix}h", "a", "b"),
            ("INCR", f"{prefix}n"), ("PING",), ("EVALSHA", "0" * 40, "0"),
            ("LPUSH", f"{prefix}s", "v"), ("EVAL", "return {1, 'two', false}", "0"),
        ])
        assert replies[:7] == [b"OK", big, None, 1, [b"1", None], 1, b"PONG"]
        assert isinstance(replies[7], redis.exceptions.NoScriptError)
        assert isinstance(replies[8], redis.ResponseError) and "WRONGTYPE" in str(replies[8])
        assert replies[9] == [1, b"two", None]
    finally:
        client.delete(*client.keys(f"{prefix}*"))
        client.close()


def test_an_interrupted_exchange_leaves_no_reply_behind(
        real_redis_backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A time limit that lands between two replies drops the kept connection: the next
    command reads its own reply, not the one left unread."""
    store = real_redis_backend.store
    assert isinstance(store, RedisStore)
    conn = store._connections.get()
    read = conn.read_response
    calls = [0]

    def interrupted() -> Any:
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt  # what a soft time limit's exception does mid-exchange
        return read()

    monkeypatch.setattr(conn, "read_response", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store._send([("ECHO", "first"), ("ECHO", "unread")])
    assert store._send([("ECHO", "second")]) == [b"second"]


def test_a_journaled_start_is_replayed_on_load(redis_backend: Backend) -> None:
    """A start committed as a journal line leaves the stored progress as it was; a load
    replays the line, and the next full commit empties the journal."""
    from datetime import timedelta

    from saga_celery._core.events import AttemptStarted, AttemptSucceeded
    from saga_celery._core.machine import apply, start_saga
    from saga_celery._core.model import Kind
    from saga_celery._store.journal import encode_entry

    client, store = redis_backend.client, redis_backend.store
    assert client is not None
    template = make_run()
    now = template.created_at
    queued = start_saga(saga_id=template.id, name="checkout", plan=template.plan,
                        params={"order": 42}, now=now).run
    assert store.create(queued, []) is True
    state = f"{redis_backend.prefix}{{{queued.id}}}:state"
    progress = client.hget(state, "d")

    start = AttemptStarted(kind=Kind.STEP, key="reserve#1", attempt=1)
    started = apply(queued, start, now=now + timedelta(seconds=1))
    assert started.changed and started.run != queued
    line = encode_entry(start, now + timedelta(seconds=1))
    assert store.commit(started.run, version=1, events=[make_event(started.run, "x")],
                        journal=line) is True
    assert client.hget(state, "d") == progress  # the run itself was not written
    assert client.hget(state, "j") == line + b"\n"
    loaded = store.load(queued.id)
    assert loaded is not None
    assert (loaded.run, loaded.version, loaded.journal) == (started.run, 2, 1)
    assert len(store.read_events(queued.id)) == 1

    ended = apply(started.run, AttemptSucceeded(kind=Kind.STEP, key="reserve#1", attempt=1,
                                                output={"r": 1}),
                  now=now + timedelta(seconds=2))
    assert store.commit(ended.run, version=2, events=[]) is True
    assert client.hget(state, "j") is None
    assert client.hget(state, "d") == encode_progress(ended.run).encode()
    loaded = store.load(queued.id)
    assert loaded is not None
    assert (loaded.run, loaded.version, loaded.journal) == (ended.run, 3, 0)

    client.hset(state, "j", b"not a journal line\n")
    with pytest.raises(SagaCorruptStateError, match="does not hold a readable saga record"):
        store.load(queued.id)


def test_the_engine_journals_starts_and_a_cold_engine_loads_the_same_run(
        redis_backend: Backend) -> None:
    """Over Redis the engine commits a start as a journal line (at most ``MAX_ENTRIES`` in
    a row, then in full) and an end in full; an engine without the state cache, as in
    another pool process, loads exactly the run the committing engine holds."""
    from saga_celery._core.events import AttemptStarted, AttemptSucceeded
    from saga_celery._core.model import Kind
    from saga_celery._engine import Engine, Lease
    from saga_celery._store.journal import MAX_ENTRIES
    from tests.unit.sim import plan

    client, store = redis_backend.client, redis_backend.store
    assert client is not None
    names = [f"s{i}" for i in range(MAX_ENTRIES + 1)]
    warm = Engine(store)
    saga_id = f"journal-{uuid4().hex[:8]}"
    warm.submit(saga_id=saga_id, name="wide", plan=plan(names, "last"), params=None)
    state = f"{redis_backend.prefix}{{{saga_id}}}:state"

    def cold() -> Any:
        return Engine(store).load(saga_id).run

    journal_sizes = []
    for i, name in enumerate(names):
        lease = Lease(name=f"step:{name}#1", token=f"w{i}", ttl_ms=30_000)
        t = warm.handle(saga_id, AttemptStarted(kind=Kind.STEP, key=f"{name}#1", attempt=1),
                        lease=lease)
        assert cold() == t.run
        journal_sizes.append((client.hget(state, "j") or b"").count(b"\n"))
    assert journal_sizes == [*range(1, MAX_ENTRIES + 1), 0]  # the ninth start in full
    for name in names:
        t = warm.handle(saga_id, AttemptSucceeded(kind=Kind.STEP, key=f"{name}#1", attempt=1,
                                                  output=name))
        assert client.hget(state, "j") is None
        assert cold() == t.run


def test_the_commit_script_refuses_a_malformed_header(redis_backend: Backend) -> None:
    """The commit script reads its settings from one '|'-separated header and writes
    nothing when the header is not one it wrote."""
    client, store, run = redis_backend.client, redis_backend.store, make_run()
    assert client is not None and isinstance(store, RedisStore)
    store.create(run, [])
    client.script_load(store._commit.script)
    state = f"{redis_backend.prefix}{{{run.id}}}:state"
    events = f"{redis_backend.prefix}{{{run.id}}}:events"
    before = client.hgetall(state)
    for header in ("1|2|acquire|30000|0||x", "1|2", "one|2||||d", "1|2|||2||d", "1|2|||0||d|"):
        with pytest.raises(redis.ResponseError, match="malformed header"):
            client.evalsha(store._commit.sha, 2, state, events, header, "", "{}")
    assert client.hgetall(state) == before
    assert client.evalsha(store._commit.sha, 2, state, events, "1|2|||0||d", "",
                          encode_progress(run)) == 1


def test_a_loading_redis_is_an_error_to_retry_not_a_reply() -> None:
    """A Redis still loading its data after a restart answers ``-LOADING``: an exchange
    raises it (a ``ConnectionError``, so redis-py's retry policy and the store's error
    translation handle it) instead of returning it as a reply; other errors stay replies.
    The chaos run found this one."""
    from saga_celery._store.connections import exchange

    with scripted_redis([b"-ERR unknown command\r\n:1\r\n",
                         b"-LOADING Redis is loading the dataset in memory\r\n"]) as port:
        conn = redis.Connection(port=port, protocol=2, socket_timeout=5.0)
        ping = b"*1\r\n$4\r\nPING\r\n"
        replies = exchange(conn, ping * 2, 2)
        assert isinstance(replies[0], redis.ResponseError) and replies[1] == 1
        with pytest.raises(redis.exceptions.BusyLoadingError):
            exchange(conn, ping, 1)
        conn.disconnect()


@contextmanager
def scripted_redis(answers: list[bytes]) -> Iterator[int]:
    """A server on a free local port (yielded) that answers each read from its one
    client with the next of ``answers``, once redis-py's ``CLIENT SETINFO`` are answered."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            pending = list(answers)
            while pending and (data := conn.recv(65536)):
                setinfo = data.count(b"SETINFO")
                conn.sendall(b"+OK\r\n" * setinfo if setinfo else pending.pop(0))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        server.join(timeout=5)


# -- a Redis that forgot the scripts -------------------------------------------------------------


def test_a_commit_lands_once_when_the_script_must_be_loaded_again(
        redis_backend: Backend) -> None:
    """NOSCRIPT (a restarted or failed-over Redis): the script is loaded and the commit sent
    again, landing once."""
    client, store, run = redis_backend.client, redis_backend.store, make_run()
    assert client is not None
    store.create(run, [])
    client.script_flush()
    assert store.commit(run, version=1, events=[make_event(run, "saga_started")]) is True
    assert version_of(store, run.id) == 2


# -- the recovery sweep's health record ----------------------------------------------------------


def test_each_sweep_record_replaces_the_last_and_keeps_beats_interval(store: SagaStore) -> None:
    """No record before any sweep; each sweep's record replaces the one before, and one
    without an interval (a sweep run by hand) keeps the interval a sweep of beat's wrote."""
    assert store.last_sweep() is None
    by_beat = SweepRecord(swept_at_ms=1_700_000_000_000, sagas=3, overdue=2,
                          oldest_overdue_ms=1_699_999_000_000, oldest_overdue_saga="order-1",
                          oldest_overdue_message="step:reserve#1:1", interval_ms=30_000)
    store.record_sweep(by_beat)
    assert store.last_sweep() == by_beat
    by_hand = SweepRecord(swept_at_ms=1_700_000_005_000, sagas=0)
    store.record_sweep(by_hand)
    assert store.last_sweep() == by_hand._replace(interval_ms=30_000)


def test_a_health_key_that_holds_no_sweep_record_is_corrupt(redis_backend: Backend) -> None:
    """A foreign value under ``<prefix>health`` (another type, or fields that are not
    numbers) reads as a ``SagaCorruptStateError`` naming the key."""
    client, store = redis_backend.client, redis_backend.store
    assert client is not None
    key = f"{redis_backend.prefix}health"
    client.set(key, "up")
    with pytest.raises(SagaCorruptStateError, match=key):
        store.last_sweep()
    client.delete(key)
    client.hset(key, mapping={"swept_at_ms": "soon", "sagas": "1"})
    with pytest.raises(SagaCorruptStateError, match=key):
        store.last_sweep()
