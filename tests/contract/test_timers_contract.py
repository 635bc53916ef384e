"""The timer part of the store contract (SPEC section 8), on every store: timers recorded
with a commit, claimed atomically once due, and forgotten once sent."""

from __future__ import annotations

import threading

from saga_celery._store import SagaStore, Timer
from tests.contract.conftest import Backend, make_event, make_run

NOW = 1_800_000_000_000


def _committed_with(store: SagaStore, *timers: Timer) -> bool:
    run = make_run(timers[0].saga_id if timers else None)
    assert store.create(run, [make_event(run, "saga_queued")])
    return store.commit(run, version=1, events=[make_event(run, "attempt_errored")],
                        timers=list(timers))


def test_a_timer_is_recorded_with_its_commit_and_claimed_once_due(store: SagaStore) -> None:
    """A committed timer is not claimed before its due time, and is claimed at it."""
    timer = Timer("order-t1", "step:reserve#1:2", NOW + 20_000)
    assert _committed_with(store, timer)
    assert store.claim_timers(NOW + 19_999, 30_000) == []
    assert store.claim_timers(NOW + 20_000, 30_000) == [timer]


def test_a_refused_commit_records_no_timer(backend: Backend) -> None:
    """A version conflict writes nothing, no timer either; on Cluster the timers set is in
    another slot, so the timer is written beside the refused commit (and, when it fires,
    finds no outbox entry to send: ``_celery/timers.py``)."""
    store = backend.store
    run = make_run("order-t2")
    assert store.create(run, [make_event(run, "saga_queued")])
    timer = Timer(run.id, "step:reserve#1:2", NOW)
    assert not store.commit(run, version=7, events=[], timers=[timer])
    expected = [timer] if backend.kind == "cluster" else []
    assert store.claim_timers(NOW, 30_000) == expected


def test_a_claimed_timer_is_not_claimed_again_until_the_claim_lapses(store: SagaStore) -> None:
    """One claimer per timer; a claimer that never drops it leaves it to fire again later."""
    timer = Timer("order-t3", "step:reserve#1:3", NOW)
    assert _committed_with(store, timer)
    assert store.claim_timers(NOW, 30_000) == [timer]
    assert store.claim_timers(NOW + 29_999, 30_000) == []
    again = store.claim_timers(NOW + 30_000, 30_000)
    assert again == [timer._replace(due_ms=NOW + 30_000)]


def test_a_dropped_timer_never_fires_again(store: SagaStore) -> None:
    """``drop_timer`` forgets a sent timer."""
    timer = Timer("order-t4", "step:reserve#1:2", NOW)
    assert _committed_with(store, timer)
    (claimed,) = store.claim_timers(NOW, 1)
    store.drop_timer(claimed)
    assert store.claim_timers(NOW + 60_000, 1) == []


def test_due_timers_are_claimed_oldest_first_at_most_limit(store: SagaStore) -> None:
    """A claim takes the oldest due timers first, up to its limit."""
    timers = [Timer(f"order-t5-{i}", "step:reserve#1:2", NOW - i) for i in range(5)]
    for timer in timers:
        assert _committed_with(store, timer)
    first = store.claim_timers(NOW, 30_000, limit=3)
    assert first == list(reversed(timers))[:3]
    assert store.claim_timers(NOW, 30_000, limit=3) == list(reversed(timers))[3:]


def test_add_timers_keeps_a_recorded_due_time(store: SagaStore) -> None:
    """The sweep's repair (``add_timers``) adds a missing timer, never moves one."""
    timer = Timer("order-t6", "step:reserve#1:2", NOW)
    assert _committed_with(store, timer)
    store.add_timers([timer._replace(due_ms=NOW + 50_000),
                      Timer("order-t6b", "rollback:reserve#1:1", NOW + 1)])
    assert store.claim_timers(NOW + 1, 30_000) == [
        timer, Timer("order-t6b", "rollback:reserve#1:1", NOW + 1)]


def test_concurrent_claims_share_out_each_timer_once(backend: Backend) -> None:
    """Four pollers claiming at once: every due timer goes to exactly one of them."""
    store = backend.store
    timers = [Timer(f"order-t7-{i}", "step:reserve#1:2", NOW) for i in range(40)]
    for timer in timers:
        assert _committed_with(store, timer)
    got: list[Timer] = []
    lock = threading.Lock()

    def poll() -> None:
        for _ in range(20):
            claimed = store.claim_timers(NOW, 30_000, limit=3)
            with lock:
                got.extend(claimed)

    pollers = [threading.Thread(target=poll) for _ in range(4)]
    for t in pollers:
        t.start()
    for t in pollers:
        t.join()
    assert sorted(got) == sorted(timers)


def test_a_commit_taking_a_lease_records_its_timers_too(store: SagaStore) -> None:
    """With a lease in the same commit (one more key for the script), the timer is recorded
    and the lease taken."""
    from saga_celery._store import LeaseAction, LeaseChange

    run = make_run("order-t8")
    assert store.create(run, [make_event(run, "saga_queued")])
    timer = Timer(run.id, "step:reserve#1:2", NOW)
    lease = LeaseChange("step:reserve#1", "token-1", LeaseAction.ACQUIRE, 30_000)
    assert store.commit(run, version=1, events=[], lease=lease, timers=[timer])
    loaded = store.load(run.id, lease="step:reserve#1")
    assert loaded is not None and loaded.lease_holder == "token-1"
    assert store.claim_timers(NOW, 30_000) == [timer]


def test_a_timer_is_recorded_with_the_creation_of_its_saga(backend: Backend) -> None:
    """A saga whose first stage waits records its timer with its creation, in one script
    (on Cluster beside it, in the same pipeline); a creation refused (the id exists)
    records none, but on Cluster, where such a timer finds no outbox entry when it fires."""
    store = backend.store
    run = make_run("order-t7")
    timer = Timer(run.id, "wake:0:1", NOW + 5_000)
    assert store.create(run, [make_event(run, "saga_queued")], timers=[timer])
    assert store.claim_timers(NOW + 5_000, 30_000) == [timer]
    other = Timer(run.id, "wake:0:2", NOW + 6_000)
    assert not store.create(run, [make_event(run, "saga_queued")], timers=[other])
    expected = [other] if backend.kind == "cluster" else []
    assert store.claim_timers(NOW + 6_000, 30_000) == expected
