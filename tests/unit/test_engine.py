"""The engine over the in-memory store: commits, event log, structlog lines, leases, races.

No Celery here: sagas are driven with the core's own events, as the Celery adapter feeds
them when its tasks start and end.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import pytest
import structlog

from saga_celery import SagaNotFoundError
from saga_celery._celery.definition import WaitStage, sleep_stage, wait_stage
from saga_celery._core.events import (
    AttemptFailed,
    AttemptStarted,
    AttemptSucceeded,
    Decision,
    Event,
    EventSent,
    RedriveRequested,
    RetryRollbackRequested,
    TerminateRequested,
    Transition,
    WakeUp,
)
from saga_celery._core.model import ErrorInfo, EventType, Kind, OnFailure, Plan
from saga_celery._engine import BEHIND_PAUSES_S, Engine, Lease, lease_name
from saga_celery._store.base import Snapshot
from saga_celery._store.memory import MemoryStore
from tests.unit.sim import plan

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BOOM = ErrorInfo(type="RuntimeError", message="boom")


class Clock:
    """A settable clock: UTC datetimes for the engine, seconds for the store's leases."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def seconds(self) -> float:
        return (self.now - T0).total_seconds()

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Driver:
    """Feeds one saga's events to an engine, as its tasks would."""

    def __init__(self, engine: Engine, saga_id: str) -> None:
        self.engine = engine
        self.saga_id = saga_id
        self.transitions: list[Transition] = []

    def feed(self, event: Event, lease: Lease | None = None) -> Transition:
        transition = self.engine.handle(self.saga_id, event, lease=lease)
        self.transitions.append(transition)
        return transition

    def start(self, name: str, attempt: int = 1, kind: Kind = Kind.STEP) -> Transition:
        return self.feed(AttemptStarted(kind=kind, key=f"{name}#1", attempt=attempt))

    def ok(self, name: str, output: Any = None, attempt: int = 1,
           kind: Kind = Kind.STEP) -> Transition:
        return self.feed(AttemptSucceeded(kind=kind, key=f"{name}#1", attempt=attempt,
                                          output=output))

    def fail(self, name: str, attempt: int = 1, kind: Kind = Kind.STEP,
             retryable: bool = True) -> Transition:
        return self.feed(AttemptFailed(kind=kind, key=f"{name}#1", attempt=attempt,
                                       error=BOOM, retryable=retryable))

    def run(self, name: str, output: Any = None) -> None:
        self.start(name)
        self.ok(name, output)


def new_engine(clock: Clock | None = None) -> tuple[Engine, MemoryStore]:
    clock = clock or Clock()
    store = MemoryStore(clock=clock.seconds)
    return Engine(store, clock=clock), store


def submit(engine: Engine, saga_id: str, saga_plan: Plan, params: Any = None) -> Driver:
    _, created = engine.submit(saga_id=saga_id, name="saga", plan=saga_plan,
                               params=params or {})
    assert created
    return Driver(engine, saga_id)


def stored_events(store: MemoryStore, saga_id: str) -> list[dict[str, Any]]:
    return [event for _, event in store.read_events(saga_id)]


def drive_every_event_type(engine: Engine) -> None:
    """Three sagas that between them emit every lifecycle event type."""
    happy = submit(engine, "happy", plan("a", "b"))
    happy.run("a", {"a": 1})
    happy.run("b", "done")

    failing = submit(engine, "failing", plan("a", "b", "c", limit=1, rb_limit=1))
    failing.run("a", "A")
    failing.run("b", "B")
    failing.start("c")
    failing.fail("c")                                    # retried: attempt_errored
    failing.start("c", 2)
    failing.fail("c", 2)                                 # last attempt: rollback starts
    failing.start("c", 1, Kind.ROLLBACK)
    failing.ok("c", None, 1, Kind.ROLLBACK)
    failing.start("b", 1, Kind.ROLLBACK)
    failing.fail("b", 1, Kind.ROLLBACK)                  # retried
    failing.start("b", 2, Kind.ROLLBACK)
    failing.fail("b", 2, Kind.ROLLBACK)                  # halts: rollback_errored
    failing.feed(RetryRollbackRequested())
    failing.start("b", 3, Kind.ROLLBACK)
    failing.ok("b", None, 3, Kind.ROLLBACK)
    failing.start("a", 1, Kind.ROLLBACK)
    failing.ok("a", None, 1, Kind.ROLLBACK)              # rollback_completed, saga_errored

    stopped = submit(engine, "stopped", plan("a", "b"))
    stopped.run("a", "A")
    stopped.feed(TerminateRequested(rollback=False, reason="customer cancelled"))

    waiting = submit(engine, "waiting", with_waits(plan("a"), sleep_stage(60, "nap"),
                                                   wait_stage("ok", 60_000, None)))
    waiting.run("a", "A")                                # sleep_started
    waiting.feed(WakeUp(key="nap#1"))                    # sleep_completed, wait_started
    waiting.feed(EventSent(event_type="ok", payload=1))  # event_received, wait_completed

    timed_out = submit(engine, "timed-out", with_waits(plan("a"),
                                                       wait_stage("ok", 60_000, None)))
    timed_out.run("a", "A")
    timed_out.feed(WakeUp(key="wait:ok#1"))              # wait_timed_out

    held = submit(engine, "held", plan("a").model_copy(update={"on_failure": OnFailure.HOLD}))
    held.start("a")
    held.fail("a", retryable=False)                      # saga_held
    held.feed(RedriveRequested())                        # saga_redriven


def with_waits(base: Plan, *waits: WaitStage) -> Plan:
    """``base`` with waiting stages appended."""
    stages = [*base.stages]
    for stage in waits:
        stages.append([stage.spec(len(stages), Counter())])
    return base.model_copy(update={"stages": stages})


# --- a whole saga -----------------------------------------------------------------------------


def test_a_saga_driven_through_the_engine_completes_and_is_stored() -> None:
    """Start and end events, committed one by one, take a saga with a parallel stage to
    ``complete``; the store holds the final run."""
    engine, store = new_engine()
    saga = submit(engine, "s-1", plan("a", ["b", "c"], "d"), params={"p": 1})
    assert [d.id for d in store.load("s-1").run.outbox.values()] == ["step:a#1:1"]  # type: ignore[union-attr]

    saga.run("a", "A")
    assert sorted(d.id for d in saga.transitions[-1].dispatches) == ["step:b#1:1", "step:c#1:1"]
    saga.start("c")
    saga.start("b")
    saga.ok("c", "C")
    saga.ok("b", "B")
    saga.run("d", {"final": True})

    snapshot = engine.load("s-1")
    assert snapshot.run.status == "complete"
    assert snapshot.run.output == {"final": True}
    assert [snapshot.run.steps[k].output for k in ("a#1", "b#1", "c#1")] == ["A", "B", "C"]
    assert [snapshot.run.steps[k].start_seq for k in ("a#1", "c#1", "b#1", "d#1")] == [1, 2, 3, 4]
    assert snapshot.run.outbox == {}
    assert snapshot.version == 1 + sum(t.changed for t in saga.transitions)
    assert store.active_ids() == []


def test_events_are_stored_oldest_first_with_unique_ids() -> None:
    """Every event a transition produced is stored, in order, each with its own event id."""
    engine, store = new_engine()
    drive_every_event_type(engine)
    for saga_id in ("happy", "failing", "stopped"):
        events = stored_events(store, saga_id)
        ids = [e["event_id"] for e in events]
        assert len(ids) == len(set(ids))
        assert all(e["saga_id"] == saga_id for e in events)
        assert events[0]["type"] == "saga_queued"
        assert events[-1]["type"] in ("saga_completed", "saga_errored", "saga_terminated")
        versions = [tuple(int(n) for n in i.split("/")[1].split(".")) for i in ids]
        assert versions == sorted(versions)
        timestamps = [e["timestamp"] for e in events]
        assert timestamps == sorted(timestamps)


def test_events_read_after_a_stream_id_are_the_newer_ones() -> None:
    """Reading after an event's stream id gives exactly the events after it, oldest first."""
    engine, store = new_engine()
    saga = submit(engine, "s-1", plan("a", "b"))
    saga.run("a")
    first = store.read_events("s-1")
    saga.run("b")
    newer = store.read_events("s-1", after=first[-1][0])
    assert [e["type"] for _, e in newer] == [
        "step_started", "attempt_started", "attempt_completed", "step_completed",
        "saga_completed"]
    assert [e for _, e in first + newer] == stored_events(store, "s-1")


def test_the_stored_event_log_matches_what_each_transition_emitted() -> None:
    """The event log is exactly the transitions' events, in commit order, plus ids."""
    engine, store = new_engine()
    saga = submit(engine, "s-1", plan("a", "b", limit=1))
    saga.run("a", "A")
    saga.start("b")
    saga.fail("b")
    saga.start("b", 2)
    saga.ok("b", "B", 2)
    emitted = [e["type"] for t in saga.transitions for e in t.events]
    assert [e["type"] for e in stored_events(store, "s-1")] == ["saga_queued", *emitted]


# --- structlog --------------------------------------------------------------------------------


def test_every_lifecycle_event_is_logged_with_saga_id_and_type() -> None:
    """Each stored event is one structlog line ``saga.<type>`` carrying saga_id, its type and
    all its fields; every event type of SPEC section 6 shows up."""
    engine, store = new_engine()
    with structlog.testing.capture_logs() as logs:
        drive_every_event_type(engine)

    # This test's sagas' lifecycle lines only: a background thread left by another test (a
    # finisher, a lease keeper, an in-process worker's timer poller) may log meanwhile.
    ids = ("happy", "failing", "stopped", "waiting", "timed-out", "held")
    saga_logs = [entry for entry in logs if entry["event"].startswith("saga.")
                 and "saga_event" in entry and entry.get("saga_id") in ids]
    events = [e for saga_id in ids for e in stored_events(store, saga_id)]
    assert len(saga_logs) == len(events)
    by_id = {entry["event_id"]: entry for entry in saga_logs}
    for event in events:
        entry = by_id[event["event_id"]]
        assert entry["event"] == f"saga.{event['type']}"
        assert entry["saga_event"] == event["type"]
        assert entry["log_level"] == "info"
        assert entry["saga_id"] == event["saga_id"]
        payload = {k: v for k, v in event.items() if k != "type"}
        assert {k: entry[k] for k in payload} == payload
    assert {e["type"] for e in events} == set(get_args(EventType))


def test_no_event_payload_uses_structlogs_event_key() -> None:
    """No lifecycle event has a field named ``event``, so no payload can clobber structlog's
    message."""
    engine, store = new_engine()
    with structlog.testing.capture_logs() as logs:
        drive_every_event_type(engine)
    for saga_id in ("happy", "failing", "stopped"):
        assert all("event" not in e for e in stored_events(store, saga_id))
    assert all(entry["event"] == f"saga.{entry['saga_event']}" for entry in logs
               if "saga_event" in entry)


def test_attempt_events_carry_step_count_and_attempt() -> None:
    """Step, attempt and rollback-step events name ``step`` and ``count``; attempt events also
    ``attempt``; ``retry_delay_ms`` is null on an attempt that will not be retried."""
    engine, store = new_engine()
    drive_every_event_type(engine)
    events = stored_events(store, "failing")
    for event in events:
        kind = event["type"]
        if kind.startswith(("step_", "attempt_", "rollback_step_", "rollback_attempt_")):
            assert {"step", "count"} <= set(event), event
        if "attempt_" in kind:
            assert "attempt" in event, event
    delays = [(e["attempt"], e["retry_delay_ms"]) for e in events
              if e["type"] == "attempt_errored"]
    assert delays[0][1] is not None and delays[0][1] > 0
    assert delays[1] == (2, None)
    started = [e for e in events if e["type"] == "rollback_started"]
    assert [e["resumed"] for e in started] == [False, True]
    assert started[0]["trigger_error"]["type"] == "RuntimeError"
    assert started[0]["total_steps"] == 3


def test_a_refused_request_writes_and_logs_nothing() -> None:
    """Terminating a terminal saga is refused: no commit, no event, no log line."""
    engine, store = new_engine()
    saga = submit(engine, "s-1", plan("a"))
    saga.run("a")
    before = store.load("s-1")
    with structlog.testing.capture_logs() as logs:
        transition = saga.feed(TerminateRequested(rollback=True))
    assert transition.refusal is not None and "already complete" in transition.refusal
    assert store.load("s-1") == before
    assert logs == []


def test_handle_on_an_unknown_saga_raises_not_found() -> None:
    """An event for a saga id the store does not know raises SagaNotFoundError naming it."""
    engine, _ = new_engine()
    with pytest.raises(SagaNotFoundError, match="'ghost'"):
        engine.handle("ghost", TerminateRequested(rollback=False))


# --- leases -----------------------------------------------------------------------------------


def test_run_takes_the_lease_and_a_second_delivery_waits() -> None:
    """The delivery told RUN holds the attempt's lease; another delivery of the same attempt
    is told WAIT and changes nothing; the end of the attempt gives the lease back."""
    engine, store = new_engine()
    submit(engine, "s-1", plan("a", "b"))
    first = Lease(name="step:a#1", token="worker-1", ttl_ms=5000)
    second = Lease(name="step:a#1", token="worker-2", ttl_ms=5000)
    started = AttemptStarted(kind=Kind.STEP, key="a#1", attempt=1)

    assert engine.handle("s-1", started, lease=first).decision == Decision.RUN
    held = store.load("s-1", lease="step:a#1")
    assert held is not None and held.lease_holder == "worker-1"

    waiting = engine.handle("s-1", started, lease=second)
    assert waiting.decision == Decision.WAIT
    assert store.load("s-1", lease="step:a#1") == held

    engine.handle("s-1", AttemptSucceeded(kind=Kind.STEP, key="a#1", attempt=1), lease=first)
    freed = store.load("s-1", lease="step:a#1")
    assert freed is not None and freed.lease_holder is None
    late = engine.handle("s-1", started, lease=second)
    assert late.decision == Decision.SKIP
    assert [d.id for d in late.dispatches] == ["step:b#1:1"]  # re-sends what the attempt sent


def test_a_lease_whose_holder_stopped_renewing_runs_the_attempt_again() -> None:
    """Once the holder's lease expires, a redelivery of the same attempt runs it (same attempt
    number) and takes the lease."""
    clock = Clock()
    engine, store = new_engine(clock)
    submit(engine, "s-1", plan("a"))
    started = AttemptStarted(kind=Kind.STEP, key="a#1", attempt=1)
    engine.handle("s-1", started, lease=Lease("step:a#1", "dead-worker", 3000))

    clock.advance(2)
    assert engine.renew("s-1", Lease("step:a#1", "dead-worker", 3000))
    clock.advance(2.5)
    assert engine.handle("s-1", started, lease=Lease("step:a#1", "w-2", 3000)).decision == (
        Decision.WAIT)
    clock.advance(1)
    again = engine.handle("s-1", started, lease=Lease("step:a#1", "w-2", 3000))
    assert again.decision == Decision.RUN
    snapshot = store.load("s-1", lease="step:a#1")
    assert snapshot is not None and snapshot.lease_holder == "w-2"
    (attempt,) = snapshot.run.steps["a#1"].attempts
    assert (attempt.attempt, attempt.losses) == (1, 1)
    assert not engine.renew("s-1", Lease("step:a#1", "dead-worker", 3000))


def test_release_gives_back_only_the_holders_lease() -> None:
    """``Engine.release`` frees a lease held by that token and leaves another holder's alone."""
    engine, store = new_engine()
    submit(engine, "s-1", plan("a"))
    engine.handle("s-1", AttemptStarted(kind=Kind.STEP, key="a#1", attempt=1),
                  lease=Lease("step:a#1", "w-1", 5000))
    engine.release("s-1", Lease("step:a#1", "w-2", 5000))
    assert store.load("s-1", lease="step:a#1").lease_holder == "w-1"  # type: ignore[union-attr]
    engine.release("s-1", Lease("step:a#1", "w-1", 5000))
    assert store.load("s-1", lease="step:a#1").lease_holder is None  # type: ignore[union-attr]


# --- concurrent writers -----------------------------------------------------------------------


class SlowLoadStore(MemoryStore):
    """Loads then pauses, so writers racing on one saga all read the same version."""

    def __init__(self) -> None:
        super().__init__()
        self.conflicts = 0
        self._count_lock = threading.Lock()

    def load(self, saga_id: str, *, lease: str | None = None) -> Snapshot | None:
        snapshot = super().load(saga_id, lease=lease)
        threading.Event().wait(0.002)
        return snapshot

    def commit(self, run: Any, **kwargs: Any) -> bool:
        ok = super().commit(run, **kwargs)
        if not ok:
            with self._count_lock:
                self.conflicts += 1
        return ok


def race(calls: list[Callable[[], Transition]]) -> list[Transition]:
    """Run the calls at once, one thread each; return their transitions in call order."""
    barrier = threading.Barrier(len(calls))
    results: list[Transition | BaseException | None] = [None] * len(calls)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # re-raised below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


@pytest.mark.parametrize("repetition", range(20))
def test_siblings_finishing_at_once_lose_no_update(repetition: int) -> None:
    """Parallel siblings whose ends are handled at the same moment from several threads are all
    recorded (compare-and-set retries), and the next stage is sent exactly once."""
    names = ["b", "c", "d", "e"]
    store = SlowLoadStore()
    engine = Engine(store, cache_size=0)  # race on loads, not on the cache
    saga = submit(engine, "s-1", plan(names, "z"))
    for name in names:
        saga.start(name)

    ends: list[Callable[[], Transition]] = [
        lambda n=name: engine.handle("s-1", AttemptSucceeded(kind=Kind.STEP, key=f"{n}#1",
                                                             attempt=1, output=n.upper()))
        for name in names]
    transitions = race(ends)

    run = engine.load("s-1").run
    assert [run.steps[f"{n}#1"].status for n in names] == ["complete"] * len(names)
    assert [run.steps[f"{n}#1"].output for n in names] == ["B", "C", "D", "E"]
    sent = [d.id for t in transitions for d in t.dispatches]
    assert sent == ["step:z#1:1"]
    assert list(run.outbox) == ["step:z#1:1"]
    types = [e["type"] for e in stored_events(store, "s-1")]
    assert types.count("step_completed") == len(names)
    assert store.conflicts > 0  # the threads really did race on one version


@pytest.mark.parametrize("repetition", range(20))
def test_failure_and_sibling_success_at_once_both_count(repetition: int) -> None:
    """One sibling fails while another succeeds at the same moment: the success is kept, the
    next stage never starts, and the rollback opens once, with the latest-started step."""
    store = SlowLoadStore()
    engine = Engine(store, cache_size=0)  # race on loads, not on the cache
    saga = submit(engine, "s-1", plan(["b", "c"], "z"))
    saga.start("b")
    saga.start("c")
    transitions = race([
        lambda: engine.handle("s-1", AttemptSucceeded(kind=Kind.STEP, key="b#1", attempt=1,
                                                      output="B")),
        lambda: engine.handle("s-1", AttemptFailed(kind=Kind.STEP, key="c#1", attempt=1,
                                                   error=BOOM, retryable=False)),
    ])
    run = engine.load("s-1").run
    assert run.steps["b#1"].output == "B"
    assert run.steps["c#1"].status == "errored"
    assert run.steps["z#1"].status == "cancelled"
    assert run.status == "rolling_back"
    assert [d.id for t in transitions for d in t.dispatches] == ["rollback:c#1:1"]
    assert run.rollback is not None and run.rollback.order == ["c#1", "b#1"]
    types = [e["type"] for e in stored_events(store, "s-1")]
    assert types.count("rollback_started") == 1


class CountingStore(MemoryStore):
    """Counts loads, to see which transitions needed one."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0

    def load(self, saga_id: str, *, lease: str | None = None) -> Snapshot | None:
        self.loads += 1
        return super().load(saga_id, lease=lease)


def test_after_a_commit_the_next_transition_skips_the_load() -> None:
    """A step's start and end handled by one engine load the saga once, not twice."""
    store = CountingStore()
    engine = Engine(store)
    saga = submit(engine, "s-1", plan("a", "b"))
    saga.start("a")
    loads = store.loads
    saga.ok("a", "A")
    saga.start("b")
    saga.ok("b", "B")
    assert store.loads == loads
    assert engine.load("s-1").run.status == "complete"


def test_a_stale_cached_state_converges_through_the_stored_one() -> None:
    """When another process moved the saga on, the cached state only costs a conflict."""
    store = MemoryStore()
    mine, theirs = Engine(store), Engine(store)
    submit(mine, "s-1", plan(["a", "b"], "c"))
    mine.handle("s-1", AttemptStarted(kind=Kind.STEP, key="a#1", attempt=1))
    theirs.handle("s-1", AttemptStarted(kind=Kind.STEP, key="b#1", attempt=1))
    theirs.handle("s-1", AttemptSucceeded(kind=Kind.STEP, key="b#1", attempt=1, output="B"))
    t = mine.handle("s-1", AttemptSucceeded(kind=Kind.STEP, key="a#1", attempt=1, output="A"))
    assert [d.id for d in t.dispatches] == ["step:c#1:1"]
    run = store.load("s-1")
    assert run is not None
    assert [run.run.steps[k].status for k in ("a#1", "b#1")] == ["complete", "complete"]


def test_a_skip_is_never_decided_on_a_stale_cached_state() -> None:
    """A start the cached state knows nothing about is checked against the stored state."""
    store = MemoryStore()
    mine, theirs = Engine(store), Engine(store)
    submit(mine, "s-1", plan("a", "b"))
    mine.handle("s-1", AttemptStarted(kind=Kind.STEP, key="a#1", attempt=1))
    theirs.handle("s-1", AttemptSucceeded(kind=Kind.STEP, key="a#1", attempt=1, output="A"))
    # mine still remembers the state before b was sent; b's message must run anyway
    t = mine.handle("s-1", AttemptStarted(kind=Kind.STEP, key="b#1", attempt=1))
    assert t.decision == Decision.RUN


# --- a message that overtakes the commit that sent it -------------------------------------------


def test_a_start_waits_a_moment_for_the_commit_that_sent_its_message() -> None:
    """A message published before its commit's answer (``not_before``) can reach a worker
    whose store read comes first (another connection, another host): the start reads
    again until the commit is there, and runs."""
    engine, store = new_engine()
    saga = submit(engine, "s-early", plan("a", "b"))
    saga.start("a")
    before = store.load("s-early")  # version 2: a running, b not due yet
    saga.ok("a", "A")  # version 3: b is due
    reads = Behind(store, [before, before])
    started = Engine(reads, clock=engine.clock).handle(  # type: ignore[arg-type]
        "s-early", AttemptStarted(kind=Kind.STEP, key="b#1", attempt=1), not_before=3)
    assert reads.loads == 3 and started.decision == Decision.RUN


class Behind:
    """A store whose first loads return older snapshots; everything else is ``inner``'s."""

    def __init__(self, inner: MemoryStore, stale: list[Snapshot | None]) -> None:
        self.inner, self.stale, self.loads = inner, stale, 0

    def load(self, saga_id: str, *, lease: str | None = None) -> Snapshot | None:
        self.loads += 1
        return self.stale.pop(0) if self.stale else self.inner.load(saga_id, lease=lease)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_start_whose_commit_is_not_there_yet_is_told_to_come_back() -> None:
    """Past a moment's wait the answer is BEHIND, nothing applied: the message comes back
    later rather than being dropped (it was left to the recovery sweep before)."""
    engine, store = new_engine()
    saga = submit(engine, "s-never", plan("a", "b"))
    saga.start("a")
    before = store.load("s-never")
    reads = Behind(store, [])
    started = Engine(reads, clock=engine.clock).handle(  # type: ignore[arg-type]
        "s-never", AttemptStarted(kind=Kind.STEP, key="b#1", attempt=1), not_before=9)
    assert started.decision == Decision.BEHIND and not started.changed
    assert reads.loads == 1 + len(BEHIND_PAUSES_S)
    assert store.load("s-never").version == before.version  # type: ignore[union-attr]


def test_a_start_behind_runs_once_the_commit_lands() -> None:
    """The same message, come back after its commit landed, runs the attempt."""
    engine, store = new_engine()
    saga = submit(engine, "s-late", plan("a", "b"))
    saga.start("a")
    worker = Engine(store, clock=engine.clock)
    event = AttemptStarted(kind=Kind.STEP, key="b#1", attempt=1)
    assert worker.handle("s-late", event, not_before=3).decision == Decision.BEHIND
    saga.ok("a", "A")  # version 3 lands
    assert worker.handle("s-late", event, not_before=3).decision == Decision.RUN


def test_a_cached_copy_older_than_the_message_is_not_used() -> None:
    """``not_before`` past the cached version: the start loads instead of committing on a
    copy it knows is stale (which would be refused)."""
    engine, store = new_engine()
    saga = submit(engine, "s-old", plan("a", "b"))
    saga.start("a")
    other = Engine(store, clock=engine.clock)
    other.handle("s-old", AttemptSucceeded(kind=Kind.STEP, key="a#1", attempt=1, output="A"))
    commits = [0]
    original = store.commit

    def counted(run: Any, **kwargs: Any) -> bool:
        commits[0] += 1
        return original(run, **kwargs)

    store.commit = counted  # type: ignore[method-assign]
    started = engine.handle("s-old", AttemptStarted(kind=Kind.STEP, key="b#1", attempt=1),
                            not_before=3)
    assert started.decision == Decision.RUN and commits[0] == 1


# --- threads ------------------------------------------------------------------------------


def test_a_run_handed_to_one_thread_is_never_changed_by_another() -> None:
    """Each thread remembers its own sagas: the run a transition returned is not the object
    another thread's next event for the same saga changes in place."""
    engine, _ = new_engine()
    submit(engine, "s-threads", plan("a", "b"))
    started = engine.handle("s-threads", AttemptStarted(kind=Kind.STEP, key="a#1", attempt=1))
    seen = started.run.model_dump_json()

    def end() -> None:
        engine.handle("s-threads", AttemptSucceeded(kind=Kind.STEP, key="a#1", attempt=1,
                                                    output="A"))

    other = threading.Thread(target=end)
    other.start()
    other.join()
    assert started.run.model_dump_json() == seen
    assert engine.load("s-threads").run.steps["a#1"].output == "A"


# --- leases -------------------------------------------------------------------------------


def test_an_end_that_changes_nothing_still_gives_its_lease_back() -> None:
    """A body that returns after its attempt was recorded as timed out frees its step's lease
    (a retry or a handler waits on it)."""
    engine, store = new_engine()
    submit(engine, "s-late-end", plan("a", "b"))
    lease = Lease(name=lease_name("step", "a#1"), token="worker-1", ttl_ms=60_000)
    start = AttemptStarted(kind=Kind.STEP, key="a#1", attempt=1)
    assert engine.handle("s-late-end", start, lease=lease).decision == Decision.RUN
    timed_out = AttemptFailed(kind=Kind.STEP, key="a#1", attempt=1, via_retry=False,
                              error=ErrorInfo(type="TimeoutError", message="late"))
    engine.handle("s-late-end", timed_out)  # at the deadline, on the body's behalf
    assert store.load("s-late-end", lease=lease.name).lease_holder == "worker-1"  # type: ignore[union-attr]
    late = engine.handle("s-late-end", AttemptSucceeded(kind=Kind.STEP, key="a#1", attempt=1,
                                                        output="A"), lease=lease)
    assert not late.changed
    assert store.load("s-late-end", lease=lease.name).lease_holder is None  # type: ignore[union-attr]


def test_a_format_1_saga_keeps_0_1_0s_lease_names() -> None:
    """A rollback attempt of a saga created in format 1 takes ``rollback:<key>``, as 0.1.0
    workers running the same saga do, whatever name the delivery asked for."""
    engine, store = new_engine()
    transition, _ = engine.submit(saga_id="s-f1", name="saga", plan=plan("a"), params={},
                                  format=1)
    assert transition.run.format == 1
    engine.handle("s-f1", AttemptStarted(kind=Kind.STEP, key="a#1", attempt=1))
    engine.handle("s-f1", AttemptFailed(kind=Kind.STEP, key="a#1", attempt=1, retryable=False,
                                        error=ErrorInfo(type="Boom", message="no")))
    lease = Lease(name=lease_name("rollback", "a#1"), token="new-worker", ttl_ms=60_000)
    assert lease.name == "step:a#1"  # what this release names it in format 2
    start = AttemptStarted(kind=Kind.ROLLBACK, key="a#1", attempt=1)
    assert engine.handle("s-f1", start, lease=lease).decision == Decision.RUN
    assert store.load("s-f1", lease="rollback:a#1").lease_holder == "new-worker"  # type: ignore[union-attr]
    assert store.load("s-f1", lease="step:a#1").lease_holder is None  # type: ignore[union-attr]
