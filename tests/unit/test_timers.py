"""Timers (SPEC section 8) without Celery or Redis: which delays become timers, how a poll
fires them, and that a saga that does not wait never records one."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from structlog.testing import capture_logs

from saga_celery import SagaApp, SagaConfigError, SagaStoreUnavailableError
from saga_celery._celery.dispatch import Dispatcher
from saga_celery._celery.timers import (
    CLAIM_HOLD_MS,
    Countdowns,
    TimerPoller,
    default_max_countdown_s,
    fire_due,
)
from saga_celery._core.events import AttemptFailed, AttemptStarted
from saga_celery._core.model import (
    Backoff,
    Dispatch,
    ErrorInfo,
    Kind,
    Plan,
    Policy,
    SagaRun,
    StepSpec,
    WaitKind,
    WaitSpec,
)
from saga_celery._engine import Engine, epoch_ms
from saga_celery._store import MemoryStore, Timer

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
KEY = "charge#1"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class Sent:
    """A dispatcher's stand-in: records what it is asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def send(self, run: SagaRun, dispatches: Sequence[Dispatch], **_: Any) -> None:
        self.sent.extend((run.id, d.id) for d in dispatches)


class SpyStore(MemoryStore):
    """A ``MemoryStore`` that records the keyword arguments of every commit."""

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[dict[str, Any]] = []

    def commit(self, run: SagaRun, **kwargs: Any) -> bool:  # type: ignore[override]
        self.commits.append(kwargs)
        return super().commit(run, **kwargs)


def plan(delay_s: float) -> Plan:
    policy = Policy(limit=3, delay_ms=delay_s * 1000, backoff=Backoff.CONSTANT,
                    timeout_ms=1000.0)
    return Plan(stages=[[StepSpec(key=KEY, name="charge", count=1, stage=0, index=0,
                                  task="shop.charge", policy=policy)]])


def failed_once(engine: Engine, saga_id: str, delay_s: float) -> None:
    """Start ``saga_id`` and fail its first attempt: its retry is due ``delay_s`` later."""
    engine.submit(saga_id=saga_id, name="checkout", plan=plan(delay_s), params=None)
    engine.handle(saga_id, AttemptStarted(kind=Kind.STEP, key=KEY, attempt=1))
    engine.handle(saga_id, AttemptFailed(kind=Kind.STEP, key=KEY, attempt=1,
                                         error=ErrorInfo(type="E", message="down")))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> SpyStore:
    return SpyStore()


@pytest.fixture
def engine(store: SpyStore, clock: Clock) -> Engine:
    return Engine(store, clock=clock, max_countdown_s=lambda: 60.0)


def test_a_delay_over_max_countdown_is_a_timer_recorded_with_its_commit(
        engine: Engine, store: SpyStore) -> None:
    """The commit that decides a 20 minute retry records its timer, due 20 minutes on."""
    failed_once(engine, "long", 20 * 60)
    assert store.commits[-1]["timers"] == [
        Timer("long", f"step:{KEY}:2", epoch_ms(T0 + timedelta(minutes=20)))]


def test_a_saga_that_does_not_wait_commits_exactly_as_before(
        engine: Engine, store: SpyStore) -> None:
    """Waiting costs nothing on a saga that does not wait: no commit of a saga with short
    delays passes ``timers`` at all."""
    failed_once(engine, "short", 30)
    assert store.commits and all("timers" not in c for c in store.commits)
    assert store.claim_timers(epoch_ms(T0 + timedelta(days=1)), CLAIM_HOLD_MS) == []


def test_a_due_timer_sends_its_message_once_and_is_forgotten(
        engine: Engine, clock: Clock) -> None:
    """Before its due time a poll sends nothing; at it, one poll sends the retry; the next
    finds nothing, even after the claim would have lapsed."""
    failed_once(engine, "due", 20 * 60)
    sent = Sent()
    clock.now = T0 + timedelta(minutes=20) - timedelta(milliseconds=1)
    assert fire_due(engine, sent) == 0  # type: ignore[arg-type]
    clock.now = T0 + timedelta(minutes=20)
    assert fire_due(engine, sent) == 1  # type: ignore[arg-type]
    clock.now += timedelta(milliseconds=CLAIM_HOLD_MS + 1)
    assert fire_due(engine, sent) == 0  # type: ignore[arg-type]
    assert sent.sent == [("due", f"step:{KEY}:2")]


def test_a_timer_whose_message_already_started_sends_nothing(
        engine: Engine, clock: Clock) -> None:
    """The recovery sweep (or a duplicate) got the retry going first: the timer is dropped."""
    failed_once(engine, "moved-on", 20 * 60)
    engine.handle("moved-on", AttemptStarted(kind=Kind.STEP, key=KEY, attempt=2))
    sent = Sent()
    clock.now = T0 + timedelta(hours=1)
    assert fire_due(engine, sent) == 0  # type: ignore[arg-type]
    assert sent.sent == []
    assert engine.store.claim_timers(epoch_ms(clock.now + timedelta(days=1)), 1) == []


def test_a_timer_of_a_saga_that_is_gone_is_dropped(engine: Engine, clock: Clock) -> None:
    """A timer whose saga expired (or never committed, on Cluster) is forgotten."""
    engine.store.add_timers([Timer("ghost", f"step:{KEY}:2", epoch_ms(T0))])
    assert fire_due(engine, Sent()) == 0  # type: ignore[arg-type]
    assert engine.store.claim_timers(epoch_ms(T0 + timedelta(days=1)), 1) == []


def test_many_due_timers_are_all_fired_by_one_poll(engine: Engine, clock: Clock) -> None:
    """A poll goes on claiming while it gets full batches (an outage's backlog)."""
    for i in range(250):
        failed_once(engine, f"many-{i}", 20 * 60)
    clock.now = T0 + timedelta(hours=1)
    sent = Sent()
    assert fire_due(engine, sent) == 250  # type: ignore[arg-type]


def test_the_dispatcher_leaves_a_timer_s_message_unsent(app: Celery, clock: Clock) -> None:
    """Only messages due within max_countdown go to the broker; a later one waits as its
    timer (``Dispatcher.is_timer``)."""
    published: list[list[Any]] = []
    dispatcher = Dispatcher(app, clock, lambda: 60.0)
    dispatcher._publish = published.append  # type: ignore[method-assign]
    run = SagaRun(id="d", name="n", created_at=T0, plan=plan(1), steps={})
    soon, late = (Dispatch(kind=Kind.STEP, key=KEY, attempt=n, due_at=T0 + timedelta(seconds=s),
                           retries=0, origin="saga") for n, s in ((1, 60), (2, 61)))
    dispatcher.send(run, [soon, late])
    assert [m.control.attempt for m in published[0]] == [1]
    assert (dispatcher.is_timer(soon), dispatcher.is_timer(late)) == (False, True)


def test_max_countdown_defaults_to_a_quarter_of_the_visibility_timeout() -> None:
    """A quarter of Redis's visibility timeout, at most 5 minutes; 5 minutes on RabbitMQ."""
    redis_app = Celery("r", broker="redis://127.0.0.1:1/0", set_as_current=False)
    redis_app.conf.broker_transport_options = {"visibility_timeout": 5}
    assert default_max_countdown_s(redis_app) == 1.25
    redis_app.conf.broker_transport_options = {}  # kombu's default, an hour
    assert default_max_countdown_s(redis_app) == 300.0
    amqp_app = Celery("a", broker="amqp://127.0.0.1:1//", set_as_current=False)
    assert default_max_countdown_s(amqp_app) == 300.0


def test_a_max_countdown_redis_would_redeliver_is_refused() -> None:
    """An explicit max_countdown at or over the visibility timeout is a configuration error."""
    redis_app = Celery("r", broker="redis://127.0.0.1:1/0", set_as_current=False)
    redis_app.conf.broker_transport_options = {"visibility_timeout": 30}
    with pytest.raises(SagaConfigError, match="max_countdown"):
        Countdowns(redis_app, 30.0)
    with pytest.raises(SagaConfigError, match="max_countdown"):
        SagaApp(redis_app, store=MemoryStore(), max_countdown="1 minute")
    assert Countdowns(redis_app, 29.0)() == 29.0


def test_saga_app_registers_the_timer_bootstep(sagas: SagaApp, app: Celery) -> None:
    """Every worker of a SagaApp runs the timer poller: no beat is needed for timers."""
    names = {getattr(step, "name", "") for step in app.steps["worker"]}
    assert "saga_celery.timers" in names


def test_a_failing_poll_is_logged_and_the_poller_goes_on() -> None:
    """A store that cannot be reached fails one poll, not the poller."""
    calls: list[int] = []

    def fire() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("redis went away")
        return 3

    poller = TimerPoller(fire)
    with capture_logs() as logs:
        assert poller.poll_once() == 0
    assert poller.poll_once() == 3
    assert [entry["event"] for entry in logs] == ["saga.timer_poll_failed"]


def test_the_recovery_sweep_puts_back_a_timer_a_cluster_commit_left_out(
        engine: Engine, clock: Clock) -> None:
    """A timer missing from the store (a Cluster commit's pipeline cut after the script) is
    recorded again by the sweep, with its due time, and then fires as any other."""
    from saga_celery._celery.recovery import recover

    failed_once(engine, "repaired", 20 * 60)
    (timer,) = engine.store.claim_timers(epoch_ms(T0 + timedelta(minutes=20)), 1)
    engine.store.drop_timer(timer)  # as if never written
    sent = Sent()
    assert recover(engine, sent, grace=timedelta(minutes=1)) == 0  # type: ignore[arg-type]
    clock.now = T0 + timedelta(minutes=20)
    assert fire_due(engine, sent) == 1  # type: ignore[arg-type]
    assert sent.sent == [("repaired", f"step:{KEY}:2")]


class CutStore(SpyStore):
    """A store whose timer writes can be lost.  ``cut``: a creation's or commit's timers are
    left out (a Cluster pipeline cut after the script), then the write fails as the cut
    does; ``cut_adds``: every write of timers on their own fails (the connection is gone)."""

    def __init__(self, *, cut: bool = False, cut_adds: bool = False) -> None:
        super().__init__()
        self.cut, self.cut_adds = cut, cut_adds

    def create(self, run: SagaRun, events: Sequence[Any],  # type: ignore[override]
               timers: Sequence[Timer] = ()) -> bool:
        if self.cut and timers:
            super().create(run, events)
            raise SagaStoreUnavailableError("connection lost after the create script")
        if not timers:
            return super().create(run, events)
        return super().create(run, events, timers=timers)

    def commit(self, run: SagaRun, **kwargs: Any) -> bool:  # type: ignore[override]
        if self.cut and kwargs.get("timers"):
            super().commit(run, **{**kwargs, "timers": ()})
            raise SagaStoreUnavailableError("connection lost after the commit script")
        return super().commit(run, **kwargs)

    def add_timers(self, timers: Sequence[Timer]) -> None:
        if (self.cut or self.cut_adds) and timers:
            raise SagaStoreUnavailableError("connection lost")
        super().add_timers(timers)


def sleeping_plan() -> Plan:
    """A saga whose first stage is a one hour sleep."""
    return Plan(stages=[[StepSpec(key="nap#1", name="nap", count=1, stage=0, index=0,
                                  task="", policy=Policy(limit=1, delay_ms=0,
                                                         backoff=Backoff.CONSTANT,
                                                         timeout_ms=1000.0),
                                  wait=WaitSpec(kind=WaitKind.SLEEP,
                                                duration_ms=3_600_000.0))]])


def test_a_saga_that_starts_by_waiting_records_its_timer_with_its_creation(
        clock: Clock) -> None:
    """The first stage's timer is written by the creation itself, not by a second write
    that a crash or a lost connection can leave out (then only the sweep, which needs beat,
    would find the saga)."""
    store = CutStore(cut_adds=True)
    engine = Engine(store, clock=clock, max_countdown_s=lambda: 60.0)
    engine.submit(saga_id="napper", name="nap", plan=sleeping_plan(), params=None)
    assert store.claim_timers(epoch_ms(T0 + timedelta(hours=1)), CLAIM_HOLD_MS) != []


def test_a_redelivered_message_puts_back_the_timer_its_commit_lost(clock: Clock) -> None:
    """On Cluster a commit's timers are written beside it: a cut after the script leaves
    the commit in and the timer out, and the task hands its message back.  Its redelivery
    changes nothing, but records the timer again, so the retry fires without the sweep."""
    store = CutStore(cut=True)
    engine = Engine(store, clock=clock, max_countdown_s=lambda: 60.0)
    with pytest.raises(SagaStoreUnavailableError):
        failed_once(engine, "cut", 20 * 60)
    assert store.claim_timers(epoch_ms(T0 + timedelta(days=1)), 1) == []
    store.cut = False
    engine.handle("cut", AttemptFailed(kind=Kind.STEP, key=KEY, attempt=1,
                                       error=ErrorInfo(type="E", message="down")))
    clock.now = T0 + timedelta(minutes=20)
    sent = Sent()
    assert fire_due(engine, sent) == 1  # type: ignore[arg-type]
    assert sent.sent == [("cut", f"step:{KEY}:2")]


def test_a_creation_submitted_again_puts_back_a_lost_first_timer(clock: Clock) -> None:
    """Calling ``start`` again is how a caller retries a creation that failed: it records
    the first stage's timer again when the first attempt lost it."""
    store = CutStore(cut=True)
    engine = Engine(store, clock=clock, max_countdown_s=lambda: 60.0)
    with pytest.raises(SagaStoreUnavailableError):
        engine.submit(saga_id="again", name="nap", plan=sleeping_plan(), params=None)
    store.cut = False
    _, created = engine.submit(saga_id="again", name="nap", plan=sleeping_plan(), params=None)
    assert not created
    assert store.claim_timers(epoch_ms(T0 + timedelta(hours=1)), CLAIM_HOLD_MS) != []


def _due(at: datetime, kind: Kind = Kind.STEP) -> Dispatch:
    return Dispatch(kind=kind, key=KEY, attempt=1, due_at=at, retries=0, origin="saga")


def test_the_horizon_reads_the_clock_only_for_a_message_that_may_be_a_timer() -> None:
    """``Horizon.is_long`` answers as ``is_long`` does; a message due no later than a past
    reading of the clock plus the limit is answered without reading it again."""
    from saga_celery._engine import Horizon, is_long

    reads = [0]
    now = [T0]

    def clock() -> datetime:
        reads[0] += 1
        return now[0]

    horizon = Horizon()
    assert not horizon.is_long(_due(T0), clock, 60.0)  # first use reads the clock
    assert reads == [1]
    now[0] = T0 + timedelta(seconds=30)
    assert not horizon.is_long(_due(T0 + timedelta(seconds=30)), clock, 60.0)
    assert reads == [1]  # due before the horizon (T0 + 60 s): no reading
    assert not horizon.is_long(_due(T0 + timedelta(seconds=80)), clock, 60.0)
    assert reads == [2]  # past the horizon: read again (now + 60 s = T0 + 90 s)
    assert horizon.is_long(_due(T0 + timedelta(seconds=91)), clock, 60.0)
    assert horizon.is_long(_due(T0, Kind.WAKE), clock, 60.0)  # a wake-up always is
    assert not horizon.is_long(_due(T0 + timedelta(days=9)), clock, None)  # no limit
    # another limit, or another clock (the harness's virtual one), is a new horizon
    assert horizon.is_long(_due(T0 + timedelta(seconds=50)), clock, 10.0)
    assert horizon.is_long(_due(T0 + timedelta(seconds=50)), lambda: T0, 10.0)
    for due in (T0, T0 + timedelta(seconds=89), T0 + timedelta(seconds=95)):
        assert Horizon().is_long(_due(due), clock, 60.0) == is_long(_due(due), now[0], 60.0)
