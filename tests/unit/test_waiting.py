"""Waiting stages (SPEC section 8) on the in-memory store: sleep, wait_for_event and
send_event, driven event by event with a clock the test moves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from saga_celery import (
    SagaApp,
    SagaDefinitionError,
    SagaError,
    SagaNotFoundError,
    SagaStateError,
)
from saga_celery._celery.timers import fire_due
from saga_celery._core.events import AttemptStarted, AttemptSucceeded
from saga_celery._core.model import FORMAT, WAIT_FORMAT, Kind
from saga_celery._store.encoding import encode_plan

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(sagas: SagaApp) -> Clock:
    clock = Clock()
    sagas._engine.clock = clock
    sagas._dispatcher.clock = clock
    return clock


@pytest.fixture
def steps(sagas: SagaApp) -> dict[str, Any]:
    undone: list[str] = []

    @sagas.step(name="w.reserve")
    def reserve(order: int) -> dict[str, int]:
        return {"order": order}

    @reserve.rollback
    def release(ctx: Any) -> None:
        undone.append(ctx.saga_id)

    @sagas.step(name="w.ship")
    def ship(previous: Any) -> Any:
        return previous

    return {"reserve": reserve, "ship": ship, "undone": undone}


def run_step(sagas: SagaApp, saga_id: str, key: str, output: Any) -> None:
    """What a worker records for one attempt of ``key`` that returns ``output``."""
    engine = sagas._engine
    engine.handle(saga_id, AttemptStarted(kind=Kind.STEP, key=key, attempt=1))
    engine.handle(saga_id, AttemptSucceeded(kind=Kind.STEP, key=key, attempt=1, output=output))


def types(sagas: SagaApp, saga_id: str) -> list[str]:
    return [e["type"] for e in sagas.run(saga_id).events()]


def test_a_sleep_passes_the_previous_output_on_when_its_timer_fires(
        sagas: SagaApp, steps: dict[str, Any], clock: Clock) -> None:
    """A 30 s sleep between two steps: recorded as a running ``sleep`` entry with a timer;
    a poll before it is due changes nothing; at its due time it completes with the previous
    stage's output, and the next step is sent."""
    saga = sagas.saga("w.slept", [steps["reserve"].s(1), sagas.sleep("30 seconds",
                                                                     name="cool-off"),
                                  steps["ship"].s()])
    saga.apply_async(saga_id="s1")
    run_step(sagas, "s1", "w.reserve#1", {"order": 1})
    entry = sagas.run("s1").status().step("cool-off")
    assert (entry.kind, entry.status) == ("sleep", "running")
    clock.now = T0 + timedelta(seconds=29)
    fire_due(sagas._engine, sagas._dispatcher)
    assert sagas.run("s1").status().step("cool-off").status == "running"
    clock.now = T0 + timedelta(seconds=30)
    assert fire_due(sagas._engine, sagas._dispatcher) == 1
    state = sagas.run("s1").status()
    slept = state.step("cool-off")
    assert (slept.status, slept.output) == ("complete", {"order": 1})
    assert slept.attempts[0].ended_at == T0 + timedelta(seconds=30)
    assert "step:w.ship#1:1" in sagas._store.load("s1").run.outbox  # type: ignore[union-attr]
    sleeps = [t for t in types(sagas, "s1") if t.startswith("sleep")]
    assert sleeps == ["sleep_started", "sleep_completed"]


def test_an_event_sent_before_its_wait_began_is_kept_for_it(
        sagas: SagaApp, steps: dict[str, Any], clock: Clock) -> None:
    """Sent while the first step runs, the event waits in the inbox; the wait then ends at
    once with its payload, the oldest of two first."""
    saga = sagas.saga("w.approved", [steps["reserve"].s(2),
                                     sagas.wait_for_event("approval", timeout="1 hour"),
                                     steps["ship"].s()])
    handle = saga.apply_async(saga_id="e1")
    handle.send_event("approval", {"by": "ann"})
    handle.send_event("approval", {"by": "bob"})
    run_step(sagas, "e1", "w.reserve#1", {"order": 2})
    wait = handle.status().step("wait:approval")
    assert (wait.kind, wait.status, wait.output) == ("wait", "complete", {"by": "ann"})
    stored = sagas._store.load("e1")
    assert stored is not None and stored.run.inbox == {"approval": [{"by": "bob"}]}
    assert stored.run.format == max(WAIT_FORMAT, FORMAT)
    events = types(sagas, "e1")
    assert events.count("event_received") == 2
    assert events.index("wait_started") < events.index("wait_completed")


def test_the_same_event_id_twice_counts_once(
        sagas: SagaApp, steps: dict[str, Any], clock: Clock) -> None:
    """A resent event (same ``event_id``) is neither kept nor delivered twice."""
    saga = sagas.saga("w.once", [steps["reserve"].s(3), sagas.wait_for_event("paid"),
                                 sagas.wait_for_event("paid", name="second-payment")])
    handle = saga.apply_async(saga_id="d1")
    handle.send_event("paid", 10, event_id="pay-1")
    handle.send_event("paid", 10, event_id="pay-1")
    run_step(sagas, "d1", "w.reserve#1", None)
    state = handle.status()
    assert state.step("wait:paid").status == "complete"
    assert state.step("second-payment").status == "running"
    assert types(sagas, "d1").count("event_received") == 1
    handle.send_event("paid", 11, event_id="pay-2")
    final = handle.status()
    assert (final.status, final.output) == ("complete", 11)


def test_a_wait_that_times_out_fails_with_event_timeout_error_and_rolls_back(
        sagas: SagaApp, steps: dict[str, Any], clock: Clock) -> None:
    """No event within the timeout: the wait errs with ``EventTimeoutError`` (no retry), the
    saga rolls back what started, and an event sent afterwards is refused once it ended."""
    saga = sagas.saga("w.late", [steps["reserve"].s(4),
                                 sagas.wait_for_event("approval", timeout="10 minutes")])
    handle = saga.apply_async(saga_id="t1")
    run_step(sagas, "t1", "w.reserve#1", None)
    clock.now = T0 + timedelta(minutes=10)
    fire_due(sagas._engine, sagas._dispatcher)
    state = handle.status()
    wait = state.step("wait:approval")
    assert wait.status == "errored" and len(wait.attempts) == 1
    assert state.error is not None and state.error.type == "EventTimeoutError"
    assert state.status == "rolling_back"
    assert "wait_timed_out" in types(sagas, "t1")
    engine = sagas._engine
    engine.handle("t1", AttemptStarted(kind=Kind.ROLLBACK, key="w.reserve#1", attempt=1))
    engine.handle("t1", AttemptSucceeded(kind=Kind.ROLLBACK, key="w.reserve#1", attempt=1))
    assert handle.status().status == "errored"
    with pytest.raises(SagaStateError, match="errored"):
        handle.send_event("approval", "too late")


def test_terminate_cancels_a_sleep(sagas: SagaApp, steps: dict[str, Any],
                                   clock: Clock) -> None:
    """Terminated while sleeping: the sleep is cancelled, the saga ends, the timer that
    fires later does nothing."""
    saga = sagas.saga("w.stopped", [sagas.sleep("1 day"), steps["ship"].s()])
    handle = saga.apply_async(saga_id="x1")
    assert handle.status().step("sleep").status == "running"
    state = handle.terminate()
    assert state.status == "terminated"
    assert state.step("sleep").status == "cancelled"
    clock.now = T0 + timedelta(days=2)
    assert fire_due(sagas._engine, sagas._dispatcher) == 0
    assert "sleep_completed" not in types(sagas, "x1")


def test_send_event_to_an_unknown_saga_is_not_found(sagas: SagaApp) -> None:
    """``send_event`` on an id that never started raises ``SagaNotFoundError``."""
    from saga_celery._celery.handle import SagaHandle

    handle = SagaHandle(sagas.reader, sagas._coordinator, "nobody")
    with pytest.raises(SagaNotFoundError):
        handle.send_event("approval")


def test_bad_waiting_stages_and_events_are_refused(sagas: SagaApp, steps: dict[str, Any]
                                                   ) -> None:
    """A sleep without a positive duration, a wait inside a group, an empty event type and a
    payload that is not JSON are refused with errors that say so."""
    from celery import group

    with pytest.raises(SagaDefinitionError, match="positive"):
        sagas.sleep("0 seconds")
    with pytest.raises(SagaDefinitionError, match="event_type"):
        sagas.wait_for_event("")
    with pytest.raises(SagaDefinitionError, match="stage of its own"):
        sagas.saga("w.bad", [group(steps["reserve"].s(1), sagas.sleep(5))])
    handle = sagas.saga("w.ok", [steps["reserve"].s(1), sagas.wait_for_event("x")]
                        ).apply_async(saga_id="b1")
    with pytest.raises(SagaError, match="JSON-serializable"):
        handle.send_event("x", object())


def test_a_saga_that_does_not_wait_is_stored_as_before(sagas: SagaApp,
                                                       steps: dict[str, Any]) -> None:
    """The default format and a plan JSON without the ``wait`` field: with
    ``write_format=2`` (an upgrade from 0.2.0), readable by a release that reads only
    formats 1 and 2."""
    saga = sagas.saga("w.plain", [steps["reserve"].s(1), steps["ship"].s()])
    saga.apply_async(saga_id="p1")
    stored = sagas._store.load("p1")
    assert stored is not None and stored.run.format == FORMAT
    assert '"wait"' not in encode_plan(saga.plan)


def test_during_an_upgrade_from_0_2_a_saga_that_waits_is_format_3_the_others_format_2(
        app: Any) -> None:
    """``write_format=2``: a saga that waits needs format 3 (0.2.0 workers hand its messages
    back); one that does not stays in format 2, which 0.2.0 runs."""
    from saga_celery._store import MemoryStore

    sagas = SagaApp(app, store=MemoryStore(), write_format=2)

    @sagas.step(name="w2.reserve")
    def reserve(order: int) -> dict[str, int]:
        return {"order": order}

    sagas.saga("w2.waits", [reserve.s(1), sagas.sleep(5)]).apply_async(saga_id="u1")
    sagas.saga("w2.plain", [reserve.s(1)]).apply_async(saga_id="u2")
    formats = [sagas._store.load(i).run.format for i in ("u1", "u2")]  # type: ignore[union-attr]
    assert formats == [WAIT_FORMAT, 2]


# --- hold and redrive ---------------------------------------------------------------------


@pytest.fixture
def flaky(sagas: SagaApp) -> Any:
    @sagas.step(name="w.flaky", retries={"limit": 1, "delay": "1 second"})
    def flaky(previous: Any) -> None:
        raise RuntimeError("down")

    return flaky


def fail_for_good(sagas: SagaApp, saga_id: str, key: str, attempts: range) -> None:
    from saga_celery._core.events import AttemptFailed
    from saga_celery._core.model import ErrorInfo

    for n in attempts:
        sagas._engine.handle(saga_id, AttemptStarted(kind=Kind.STEP, key=key, attempt=n))
        sagas._engine.handle(saga_id, AttemptFailed(kind=Kind.STEP, key=key, attempt=n,
                                                    error=ErrorInfo(type="E", message="down")))


def held_saga(sagas: SagaApp, steps: dict[str, Any], flaky: Any, saga_id: str,
              **options: Any) -> Any:
    saga = sagas.saga("w.held", [steps["reserve"].s(5), flaky.s(), steps["ship"].s()],
                      on_failure="hold", **options)
    handle = saga.apply_async(saga_id=saga_id)
    run_step(sagas, saga_id, "w.reserve#1", {"order": 5})
    fail_for_good(sagas, saga_id, "w.flaky#1", range(1, 3))
    return handle


def test_a_step_failing_for_good_holds_the_saga_and_nothing_is_undone(
        sagas: SagaApp, steps: dict[str, Any], flaky: Any, clock: Clock) -> None:
    """Retries spent under ``on_failure="hold"``: status ``held`` with the step's error, no
    rollback sent, ``saga_held`` recorded."""
    handle = held_saga(sagas, steps, flaky, "h1")
    state = handle.status()
    assert state.status == "held"
    assert state.error is not None and state.error.type == "E"
    assert state.rollback is None and steps["undone"] == []
    stored = sagas._store.load("h1")
    assert stored is not None and not stored.run.outbox
    assert "saga_held" in types(sagas, "h1")


def test_redrive_runs_the_failed_step_with_a_fresh_budget_and_attempts_going_on(
        sagas: SagaApp, steps: dict[str, Any], flaky: Any, clock: Clock) -> None:
    """``redrive()`` sends attempt 3 with a fresh budget of two; it succeeds and the saga
    goes on forward, the completed step never running again."""
    handle = held_saga(sagas, steps, flaky, "h2")
    state = handle.redrive()
    assert state.status == "running"
    stored = sagas._store.load("h2")
    assert stored is not None and list(stored.run.outbox) == ["step:w.flaky#1:3"]
    assert stored.run.outbox["step:w.flaky#1:3"].retries == 0
    fail_for_good(sagas, "h2", "w.flaky#1", range(3, 4))  # retried within the new budget
    stored = sagas._store.load("h2")
    assert stored is not None and list(stored.run.outbox) == ["step:w.flaky#1:4"]
    run_step_attempt = AttemptStarted(kind=Kind.STEP, key="w.flaky#1", attempt=4)
    sagas._engine.handle("h2", run_step_attempt)
    sagas._engine.handle("h2", AttemptSucceeded(kind=Kind.STEP, key="w.flaky#1", attempt=4,
                                                output="fixed"))
    run_step(sagas, "h2", "w.ship#1", "shipped")
    final = handle.status()
    assert (final.status, final.output) == ("complete", "shipped")
    assert [a.attempt for a in final.step("w.reserve").attempts] == [1]
    assert "saga_redriven" in types(sagas, "h2")


def test_rollback_of_a_held_saga_compensates_as_for_a_failure(
        sagas: SagaApp, steps: dict[str, Any], flaky: Any, clock: Clock) -> None:
    """``rollback()`` starts the rollback; a second one, or a redrive, is refused."""
    handle = held_saga(sagas, steps, flaky, "h3")
    assert handle.rollback().status == "rolling_back"
    with pytest.raises(SagaStateError, match="only a held saga"):
        handle.rollback()
    with pytest.raises(SagaStateError, match="only a held saga"):
        handle.redrive()


def test_a_hold_timing_out_rolls_back_by_itself(
        sagas: SagaApp, steps: dict[str, Any], flaky: Any, clock: Clock) -> None:
    """``hold_timeout="1 hour"`` passing with neither redrive nor rollback: its timer starts
    the rollback."""
    handle = held_saga(sagas, steps, flaky, "h4", hold_timeout="1 hour")
    clock.now = T0 + timedelta(minutes=59)
    fire_due(sagas._engine, sagas._dispatcher)
    assert handle.status().status == "held"
    clock.now = T0 + timedelta(hours=1, seconds=1)
    assert fire_due(sagas._engine, sagas._dispatcher) == 1
    assert handle.status().status == "rolling_back"


def test_terminate_works_on_a_held_saga_and_a_redrive_leaves_the_hold_timer_idle(
        sagas: SagaApp, steps: dict[str, Any], flaky: Any, clock: Clock) -> None:
    """A held saga terminates as a running one; the hold timer firing later does nothing."""
    handle = held_saga(sagas, steps, flaky, "h5", hold_timeout="1 hour")
    assert handle.terminate().status == "terminated"
    clock.now = T0 + timedelta(hours=2)
    fire_due(sagas._engine, sagas._dispatcher)
    assert handle.status().status == "terminated"


def test_output_errors_never_hold(sagas: SagaApp, steps: dict[str, Any], clock: Clock) -> None:
    """An output that cannot be stored rolls back even under ``hold``."""
    from saga_celery._core.events import AttemptFailed
    from saga_celery._core.model import ErrorInfo

    saga = sagas.saga("w.output", [steps["reserve"].s(1), steps["ship"].s()],
                      on_failure="hold")
    saga.apply_async(saga_id="h6")
    run_step(sagas, "h6", "w.reserve#1", 1)
    sagas._engine.handle("h6", AttemptStarted(kind=Kind.STEP, key="w.ship#1", attempt=1))
    sagas._engine.handle("h6", AttemptFailed(
        kind=Kind.STEP, key="w.ship#1", attempt=1, retryable=False,
        error=ErrorInfo(type="OutputTooLargeError", message="too big")))
    assert sagas.run("h6").status().status == "rolling_back"
