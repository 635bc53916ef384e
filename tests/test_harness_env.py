"""``saga_celery.testing.SagaTestEnv``: sagas in this process, on a virtual clock, with failures
injected per attempt, and the ``SagaApp`` given back as it was.

Every app here points its broker and its saga state at a port nothing listens on: a test
that completes proves the harness never needed either.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery, group

import saga_celery.testing
from saga_celery import (
    NonRetryableError,
    RetryLater,
    RollbackContext,
    SagaApp,
    SagaConfigError,
    SagaError,
    SagaNotFoundError,
    SagaState,
    SagaStateError,
    SagaStoreUnavailableError,
    current_step,
)
from saga_celery.testing import PendingMessage, SagaTestEnv

NOWHERE = "redis://127.0.0.1:1/0"
"""Nothing listens here: neither a broker nor saga state is reachable."""
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


@pytest.fixture
def app() -> Iterator[Celery]:
    celery = Celery("h", broker=NOWHERE, set_as_current=False)
    yield celery
    celery.close()


@pytest.fixture
def sagas(app: Celery) -> SagaApp:
    return SagaApp(app, redis_url=NOWHERE)


@pytest.fixture
def env(sagas: SagaApp) -> Iterator[SagaTestEnv]:
    with SagaTestEnv(sagas, start=T0) as test_env:
        yield test_env


class Shop:
    """Three steps with rollbacks (the middle one a parallel pair), and what ran, in order."""

    def __init__(self, sagas: SagaApp, *, retries: dict[str, Any] | None = None,
                 on_rollback_error: str = "halt") -> None:
        self.ran: list[tuple[str, int, Any]] = []
        policy = retries or {"limit": 2, "delay": "10 minutes", "backoff": "exponential"}
        quick = {"limit": 1, "delay": "1 minute", "backoff": "constant"}

        @sagas.step(name="reserve", retries=policy, timeout="30 seconds")
        def reserve(sku: str) -> dict[str, str]:
            self.ran.append(("reserve", current_step().attempt, sku))
            return {"reservation": f"r-{sku}"}

        @reserve.rollback(retries=quick, timeout="20 seconds")
        def release(ctx: RollbackContext) -> None:
            self.ran.append(("release", ctx.attempt, ctx.output))

        @sagas.step(name="email", retries=policy)
        def email(previous: Any) -> str:
            self.ran.append(("email", current_step().attempt, previous))
            return "emailed"

        @email.rollback(retries=quick)
        def unemail(ctx: RollbackContext) -> None:
            self.ran.append(("unemail", ctx.attempt, ctx.output))

        @sagas.step(name="sms", retries=policy)
        def sms(previous: Any) -> str:
            self.ran.append(("sms", current_step().attempt, previous))
            return "texted"

        @sms.rollback(retries=quick)
        def unsms(ctx: RollbackContext) -> None:
            self.ran.append(("unsms", ctx.attempt, ctx.output))

        @sagas.step(name="charge", retries=policy)
        def charge(previous: Any, amount: int) -> dict[str, int]:
            self.ran.append(("charge", current_step().attempt, previous))
            return {"charged": amount}

        @charge.rollback(retries=quick)
        def refund(ctx: RollbackContext) -> None:
            self.ran.append(("refund", ctx.attempt, ctx.output))

        self.charge = charge
        self.stages = [reserve.s("sku-1"), group(email.s(), sms.s()), charge.s(amount=30)]
        self.order = sagas.saga("order", self.stages, on_rollback_error=on_rollback_error)


def rollback_order(run_events: list[dict[str, Any]]) -> list[str]:
    return [e["step"] for e in run_events if e["type"] == "rollback_step_started"]


# --- running in process --------------------------------------------------------------------


def test_a_saga_completes_in_process_with_no_broker_and_no_redis(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """The whole saga runs here, the real bodies with the arguments a chain would pass, and
    its state and events read back as from a worker's run, in milliseconds."""
    shop = Shop(sagas)
    began = time.perf_counter()
    run = env.start(shop.order, saga_id="o-1", params={"customer": "c-7"})
    env.run_until_idle()
    elapsed = time.perf_counter() - began
    state = run.status()
    assert isinstance(state, SagaState)
    assert state.status == "complete"
    assert state.output == {"charged": 30}
    assert state.params == {"customer": "c-7"}
    assert [s.status for s in state.steps] == ["complete"] * 4
    assert ("charge", 1, ["emailed", "texted"]) in shop.ran
    assert ("email", 1, {"reservation": "r-sku-1"}) in shop.ran
    events = [e["type"] for e in run.events()]
    assert events[:2] == ["saga_queued", "saga_started"] and events[-1] == "saga_completed"
    assert elapsed < 5  # milliseconds in fact; generous for a loaded machine


def test_timestamps_are_the_virtual_clocks(sagas: SagaApp, env: SagaTestEnv) -> None:
    """A saga started on a virtual clock at T0 records T0, not the wall clock."""
    shop = Shop(sagas)
    run = env.start(shop.order, saga_id="o-2")
    env.run_until_idle()
    state = run.status()
    assert state.created_at == T0 and state.ended_at == T0
    assert all(e["timestamp"].startswith("2026-01-05T09:00:00") for e in run.events())


def test_retry_delays_take_virtual_time_only(sagas: SagaApp, env: SagaTestEnv) -> None:
    """Two failed attempts under an exponential policy of 10 minutes: the retries start 10
    and then 20 minutes later on the virtual clock, and the test takes no real time."""
    shop = Shop(sagas)
    env.fail("reserve", attempt=[1, 2])
    began = time.perf_counter()
    run = env.start(shop.order, saga_id="o-3")
    env.run_until_idle()
    assert time.perf_counter() - began < 5
    attempts = run.status().step("reserve").attempts
    assert [a.success for a in attempts] == [False, False, True]
    starts = [a.started_at for a in attempts]
    assert [b - a for a, b in itertools.pairwise(starts)] == [
        timedelta(minutes=10), timedelta(minutes=20)]
    assert run.status().status == "complete"
    assert env.now == T0 + timedelta(minutes=30)
    assert [r for r in shop.ran if r[0] == "reserve"] == [("reserve", 3, "sku-1")]


def test_advance_runs_only_what_falls_due(sagas: SagaApp, env: SagaTestEnv) -> None:
    """``advance`` moves the clock and runs what falls due on the way: a retry due in 10
    minutes is still pending after 9, and has run after 10."""
    shop = Shop(sagas)
    env.fail("reserve", attempt=1)
    run = env.start(shop.order, saga_id="o-4")
    env.advance(timedelta(0))  # the first attempt is due now
    assert env.pending() == [PendingMessage(due_at=T0 + timedelta(minutes=10), saga_id="o-4",
                                            kind="step", step="reserve", count=1, attempt=2)]
    env.advance("9 minutes")
    assert env.now == T0 + timedelta(minutes=9)
    assert run.status().status == "running"
    env.advance("1 minute")
    assert env.now == T0 + timedelta(minutes=10)
    assert run.status().step("reserve").status == "complete"
    env.run_until_idle()
    assert run.status().status == "complete"


def test_run_next_runs_one_message_at_a_time(sagas: SagaApp, env: SagaTestEnv) -> None:
    """``run_next`` runs the next message only, and says False once none is left."""
    shop = Shop(sagas)
    run = env.start(shop.order, saga_id="o-5")
    assert env.run_next() is True
    state = run.status()
    assert state.step("reserve").status == "complete"
    assert state.step("email").status == "pending"
    assert [p.step for p in env.pending()] == ["email", "sms"]
    while env.run_next():
        pass
    assert run.status().status == "complete"
    assert env.run_next() is False


# --- failures injected per attempt ----------------------------------------------------------


def test_a_step_failing_for_good_rolls_back_in_reverse_start_order(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """Every attempt of the last step fails: the saga rolls back the failed step (output
    None), then the parallel pair in reverse start order, then the first step, through the
    real handlers."""
    shop = Shop(sagas)
    env.fail(shop.charge, attempt=[1, 2, 3], error=ValueError("card declined"))
    run = env.start(shop.order, saga_id="o-6")
    env.run_until_idle()
    state = run.status()
    assert state.status == "errored"
    assert state.error is not None
    assert (state.error.type, state.error.message, state.error.step) == (
        "ValueError", "card declined", "charge")
    assert rollback_order(run.events()) == ["charge", "sms", "email", "reserve"]
    assert [r[0] for r in shop.ran if r[0] in {"refund", "unsms", "unemail", "release"}] == [
        "refund", "unsms", "unemail", "release"]
    assert ("refund", 1, None) in shop.ran
    assert ("release", 1, {"reservation": "r-sku-1"}) in shop.ran
    assert state.rollback is not None and state.rollback.outcome == "complete"
    assert not any(r[0] == "charge" for r in shop.ran)  # injected: the body never ran


def test_non_retryable_error_skips_the_retries(sagas: SagaApp, env: SagaTestEnv) -> None:
    """An injected ``NonRetryableError`` fails the step at its first attempt."""
    shop = Shop(sagas)
    env.fail("reserve", error=NonRetryableError("sku withdrawn"))
    run = env.start(shop.order, saga_id="o-7")
    env.run_until_idle()
    state = run.status()
    assert len(state.step("reserve").attempts) == 1
    assert state.status == "errored" and env.now == T0
    assert state.step("email").status == "cancelled"


def test_retry_later_sets_the_next_delay(sagas: SagaApp, env: SagaTestEnv) -> None:
    """An injected ``RetryLater("45 seconds")`` makes the next attempt start 45 s later,
    and the event says so."""
    shop = Shop(sagas)
    env.fail("reserve", error=RetryLater("45 seconds", "rate limited"))
    run = env.start(shop.order, saga_id="o-8")
    env.run_until_idle()
    errored = [e for e in run.events() if e["type"] == "attempt_errored"]
    assert [e["retry_delay_ms"] for e in errored] == [45_000]
    first, second = run.status().step("reserve").attempts
    assert second.started_at - first.started_at == timedelta(seconds=45)


def test_an_injected_timeout_is_a_timeout_attempt_that_lasts_the_timeout(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """``timeout``: the attempt fails with ``TimeoutError``, as a worker records it, and
    ends 30 s (the step's timeout) after it began."""
    shop = Shop(sagas)
    env.timeout("reserve", attempt=1)
    run = env.start(shop.order, saga_id="o-9")
    env.run_until_idle()
    first = run.status().step("reserve").attempts[0]
    assert first.error is not None
    assert (first.error.type, first.error.message) == (
        "TimeoutError", "the attempt exceeded its timeout of 30 s")
    assert first.ended_at is not None and first.ended_at - first.started_at == timedelta(
        seconds=30)
    assert run.status().status == "complete"


def test_a_rollback_failing_then_succeeding_compensates(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """The handler's first attempt fails and its retry, a minute later, runs the handler."""
    shop = Shop(sagas)
    env.fail("reserve", attempt=[1, 2, 3])
    env.fail_rollback("reserve", attempt=1, error=ConnectionError("inventory down"))
    run = env.start(shop.order, saga_id="o-10")
    env.run_until_idle()
    rollback = run.status().step("reserve").rollback
    assert rollback is not None and rollback.status == "complete"
    assert [a.success for a in rollback.attempts] == [False, True]
    assert rollback.attempts[0].error is not None
    assert rollback.attempts[0].error.type == "ConnectionError"
    assert rollback.attempts[1].started_at - rollback.attempts[0].started_at == timedelta(
        minutes=1)
    assert ("release", 2, None) in shop.ran


def test_a_rollback_timing_out_for_good_halts_and_retry_rollback_resumes_it(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """Both attempts of ``release`` time out (20 s each): the rollback ends ``failed``;
    ``retry_rollback`` runs it again with attempt numbers going on (3)."""
    shop = Shop(sagas)
    env.fail("reserve", attempt=[1, 2, 3])
    env.timeout_rollback("reserve", attempt=[1, 2])
    run = env.start(shop.order, saga_id="o-11")
    env.run_until_idle()
    state = run.status()
    assert state.rollback is not None and state.rollback.outcome == "failed"
    handler = state.step("reserve").rollback
    assert handler is not None
    assert [a.error.type for a in handler.attempts if a.error] == ["TimeoutError"] * 2
    run.retry_rollback()
    env.run_until_idle()
    state = run.status()
    assert state.rollback is not None and state.rollback.outcome == "complete"
    assert ("release", 3, None) in shop.ran


def test_continue_on_error_goes_on_past_a_failed_handler(sagas: SagaApp) -> None:
    """With ``on_rollback_error="continue"`` the handlers before a failed one still run."""
    shop = Shop(sagas, on_rollback_error="continue")
    with SagaTestEnv(sagas, start=T0) as env:
        env.fail("charge", error=NonRetryableError("no"))
        env.fail_rollback("sms", attempt=[1, 2])
        run = env.start(shop.order, saga_id="o-12")
        env.run_until_idle()
        state, events = run.status(), run.events()  # read while the env holds the state
    assert state.rollback is not None and state.rollback.outcome == "failed"
    assert rollback_order(events) == ["charge", "sms", "email", "reserve"]
    sms_rollback = state.step("sms").rollback
    assert sms_rollback is not None and sms_rollback.status == "errored"
    assert [r[0] for r in shop.ran if r[0] in {"unemail", "release"}] == ["unemail", "release"]


def test_terminate_stops_it_between_messages(sagas: SagaApp, env: SagaTestEnv) -> None:
    """Terminated after its first step: nothing more starts, the first step is rolled back
    with the ``Terminated`` error, and the saga ends ``terminated``."""
    shop = Shop(sagas)
    run = env.start(shop.order, saga_id="o-13")
    env.run_next()
    run.terminate(rollback=True, reason="customer cancelled")
    env.run_until_idle()
    state = run.status()
    assert state.status == "terminated"
    assert state.step("email").status == "cancelled"
    assert rollback_order(run.events()) == ["reserve"]
    assert [r[0] for r in shop.ran] == ["reserve", "release"]


def test_a_sibling_in_flight_when_the_saga_fails_is_compensated_with_its_real_output(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """``while_running``: ``sms`` fails while ``email`` is in flight; the rollback waits for
    ``email``'s attempt to end, records its output, and compensates it with that output."""
    shop = Shop(sagas)
    env.fail("sms", error=NonRetryableError("no signal"))
    env.while_running("email", env.run_next)  # the next message (sms) runs inside email's
    run = env.start(shop.order, saga_id="o-20")
    env.run_until_idle()
    state = run.status()
    assert state.step("email").status == "complete"
    assert ("unemail", 1, "emailed") in shop.ran
    events = [(e["type"], e.get("step")) for e in run.events()]
    assert events.index(("rollback_started", None)) < events.index(("step_completed", "email"))
    assert events.index(("step_completed", "email")) < events.index(
        ("rollback_step_started", "email"))
    assert rollback_order(run.events()) == ["sms", "email", "reserve"]


def test_terminate_while_an_attempt_runs_lets_it_finish(sagas: SagaApp,
                                                        env: SagaTestEnv) -> None:
    """Terminated during ``charge``'s attempt: the attempt finishes and is recorded, nothing
    after it starts, and it is compensated with its output."""
    shop = Shop(sagas)
    run = env.start(shop.order, saga_id="o-21")
    env.while_running(shop.charge, lambda: run.terminate(rollback=True))
    env.run_until_idle()
    state = run.status()
    assert state.status == "terminated"
    assert state.step("charge").status == "complete"
    assert ("refund", 1, {"charged": 30}) in shop.ran
    assert rollback_order(run.events()) == ["charge", "sms", "email", "reserve"]


def test_a_parallel_rollback_sends_every_handler_at_once(sagas: SagaApp,
                                                         env: SagaTestEnv) -> None:
    """``rollback_mode="parallel"``: the failure queues all four handlers together (the
    harness then runs them one after another, in the order they were sent)."""
    shop = Shop(sagas)
    parallel = sagas.saga("order-par", shop.stages, rollback_mode="parallel")
    env.fail(shop.charge, error=NonRetryableError("no"))
    run = env.start(parallel, saga_id="o-22")
    for _ in range(4):  # reserve, email, sms, charge (failing)
        env.run_next()
    assert sorted((p.kind, p.step) for p in env.pending()) == [
        ("rollback", "charge"), ("rollback", "email"), ("rollback", "reserve"),
        ("rollback", "sms")]
    env.run_until_idle()
    state = run.status()
    assert state.status == "errored"
    assert state.rollback is not None and state.rollback.completed_steps == 4


def test_a_step_used_twice_is_injected_by_count(sagas: SagaApp, env: SagaTestEnv) -> None:
    """``count=2`` fails the second occurrence of a step only."""
    shop = Shop(sagas)
    twice = sagas.saga("twice", [shop.charge.s({}, amount=1), shop.charge.s(amount=2)])
    env.fail(shop.charge, count=2, error=NonRetryableError("second"))
    run = env.start(twice, saga_id="o-14")
    env.run_until_idle()
    state = run.status()
    assert state.step("charge", 1).status == "complete"
    assert state.step("charge", 2).status == "errored"


def test_a_real_body_failure_and_an_unserializable_output_go_through_the_runtime(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """Not injected: a body that raises is retried by its policy, and an output with no JSON
    form fails the saga with ``OutputNotSerializableError``, as on a worker."""
    calls: list[int] = []

    @sagas.step(name="flaky", retries={"limit": 1, "delay": "1 second"})
    def flaky() -> object:
        calls.append(current_step().attempt)
        if len(calls) == 1:
            raise KeyError("first")
        return {1, 2}

    run = env.start(sagas.saga("odd", [flaky.s()]), saga_id="o-15")
    env.run_until_idle()
    attempts = run.status().step("flaky").attempts
    assert [a.error.type if a.error else None for a in attempts] == [
        "KeyError", "OutputNotSerializableError"]
    assert run.status().status == "errored"


def test_the_same_seed_draws_the_same_jittered_delays(sagas: SagaApp) -> None:
    """Full jitter draws from the environment's seeded random: a run repeats exactly."""
    @sagas.step(name="jit", retries={"limit": 3, "delay": "1 minute", "jitter": True})
    def jit() -> None:
        raise RuntimeError("always")

    saga = sagas.saga("jittered", [jit.s()])

    def delays(seed: int) -> list[Any]:
        with SagaTestEnv(sagas, start=T0, seed=seed) as env:
            run = env.start(saga, saga_id="j")
            env.run_until_idle()
            return [e["retry_delay_ms"] for e in run.events() if e["type"] == "attempt_errored"]

    assert delays(7) == delays(7)
    assert delays(7) != delays(8)


# --- waiting: sleeps, events, holds (SPEC section 8) -----------------------------------------


class Waiting:
    """A booking step with a rollback, a step that may be made to fail, and a shipping step
    that records what it got; sagas that sleep, wait for an event, or hold."""

    def __init__(self, sagas: SagaApp) -> None:
        self.ran: list[tuple[str, int, Any]] = []

        @sagas.step(name="book", timeout="10 seconds")
        def book(order: int) -> int:
            self.ran.append(("book", current_step().attempt, order))
            return order

        @book.rollback()
        def unbook(ctx: RollbackContext) -> None:
            self.ran.append(("unbook", ctx.attempt, ctx.output))

        @sagas.step(name="export", retries={"limit": 2, "delay": "1 minute",
                                            "backoff": "constant"})
        def export(previous: Any) -> str:
            self.ran.append(("export", current_step().attempt, previous))
            return "exported"

        @sagas.step(name="ship")
        def ship(previous: Any) -> Any:
            self.ran.append(("ship", current_step().attempt, previous))
            return previous

        self.export = export
        self.sleeping = sagas.saga("sleeping", [book.s(9), sagas.sleep("1 day",
                                                                       name="cool-off"),
                                                ship.s()])
        self.approval = sagas.saga("approval", [
            book.s(10), sagas.wait_for_event("approval", timeout="2 days", name="approve"),
            ship.s()])
        self.two_approvals = sagas.saga("two-approvals", [
            book.s(11), sagas.wait_for_event("approval", name="first"),
            sagas.wait_for_event("approval", name="second"), ship.s()])
        self.held = sagas.saga("held", [book.s(12), export.s(), ship.s()], on_failure="hold")
        self.held_briefly = sagas.saga("held-briefly", [book.s(13), export.s()],
                                       on_failure="hold", hold_timeout="1 day")

    def names(self) -> list[str]:
        return [name for name, _, _ in self.ran]


def event_types(run_events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in run_events]


def test_a_one_day_sleep_passes_on_the_virtual_clock(sagas: SagaApp, env: SagaTestEnv) -> None:
    """A day's sleep is a timer in the store: pending as a ``wake`` due a day later, not
    over after 23 hours, over at the day, with the booking's output passed on, in
    milliseconds of real time."""
    waiting = Waiting(sagas)
    began = time.perf_counter()
    run = env.start(waiting.sleeping, saga_id="s-1")
    env.advance(0)
    assert env.pending() == [PendingMessage(due_at=T0 + timedelta(days=1), saga_id="s-1",
                                            kind="wake", step="cool-off", count=1, attempt=1)]
    env.advance("23 hours")
    assert run.status().step("cool-off").status == "running"
    assert waiting.names() == ["book"]
    env.advance("1 hour")
    state = run.status()
    assert (state.status, state.output) == ("complete", 9)
    assert state.ended_at == T0 + timedelta(days=1)
    assert state.step("cool-off").kind == "sleep"
    assert waiting.ran[-1] == ("ship", 1, 9)
    assert {"sleep_started", "sleep_completed"} <= set(event_types(run.events()))
    assert env.pending() == []
    assert time.perf_counter() - began < 5  # milliseconds in fact


def test_run_until_idle_sleeps_through_and_stops_at_a_wait_without_timeout(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """``run_until_idle`` fires a sleep's timer however far ahead; a wait with no timeout
    and no event leaves nothing due, so it returns with the saga still waiting."""
    waiting = Waiting(sagas)
    sleeping = env.start(waiting.sleeping, saga_id="s-2")
    waits = env.start(waiting.two_approvals, saga_id="s-3")
    env.run_until_idle()
    assert sleeping.status().status == "complete"
    assert env.now == T0 + timedelta(days=1)
    assert waits.status().status == "running"
    assert waits.status().step("first").status == "running"
    assert env.pending() == []


def test_terminating_a_sleeping_saga_cancels_the_sleep_and_moves_no_clock(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """Terminated (with rollback) during its day's sleep, the saga undoes the booking at
    once; the sleep's timer fires nothing, so it is not pending and the clock stays put."""
    waiting = Waiting(sagas)
    run = env.start(waiting.sleeping, saga_id="s-4")
    env.advance("1 hour")
    run.terminate(rollback=True, reason="customer withdrew")
    assert env.pending()[0].kind == "rollback"
    env.run_until_idle()
    state = run.status()
    assert state.status == "terminated"
    assert state.step("cool-off").status == "cancelled"
    assert waiting.names() == ["book", "unbook"]
    assert env.now == T0 + timedelta(hours=1)
    assert env.pending() == []


def test_an_event_sent_while_the_saga_waits_ends_the_wait(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """An hour into a two-day wait, ``env.send_event`` ends it: the payload is the wait's
    output and the next step's input, and the dropped timeout never moves the clock."""
    waiting = Waiting(sagas)
    run = env.start(waiting.approval, saga_id="e-1")
    env.advance("1 hour")
    assert [p.kind for p in env.pending()] == ["wake"]
    env.send_event("e-1", "approval", {"by": "ann"})
    env.run_until_idle()
    state = run.status()
    assert (state.status, state.output) == ("complete", {"by": "ann"})
    assert state.step("approve").output == {"by": "ann"}
    assert state.ended_at == env.now == T0 + timedelta(hours=1)
    assert waiting.ran[-1] == ("ship", 1, {"by": "ann"})
    assert "wait_timed_out" not in event_types(run.events())


def test_an_event_sent_before_the_wait_began_is_kept_for_it(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """Sent before the booking even ran, the event waits in the saga's inbox and the wait
    ends as it begins."""
    waiting = Waiting(sagas)
    run = env.start(waiting.approval, saga_id="e-2")
    state = env.send_event("e-2", "approval", {"by": "bob"}, event_id="mail-1")
    assert state.step("approve").status == "pending"
    env.run_until_idle()
    final = run.status()
    assert (final.status, final.output) == ("complete", {"by": "bob"})
    assert env.now == T0
    assert event_types(run.events()).count("event_received") == 1


def test_the_same_event_id_twice_counts_once(sagas: SagaApp, env: SagaTestEnv) -> None:
    """Two waits for ``approval``: the same ``event_id`` sent twice ends only the first; a
    new id ends the second."""
    waiting = Waiting(sagas)
    run = env.start(waiting.two_approvals, saga_id="e-3")
    env.run_until_idle()
    env.send_event("e-3", "approval", "yes", event_id="mail-1")
    env.send_event("e-3", "approval", "yes again", event_id="mail-1")
    env.run_until_idle()
    state = run.status()
    assert state.step("first").output == "yes"
    assert state.step("second").status == "running"
    env.send_event("e-3", "approval", "second yes", event_id="mail-2")
    env.run_until_idle()
    state = run.status()
    assert (state.status, state.output) == ("complete", "second yes")
    assert event_types(run.events()).count("event_received") == 2


def test_a_wait_timing_out_rolls_back_with_event_timeout_error(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """No event within two days: the wait errs with ``EventTimeoutError`` (no retries), the
    booking is undone, all at the virtual two days; an event sent afterwards is refused."""
    waiting = Waiting(sagas)
    run = env.start(waiting.approval, saga_id="e-4")
    env.advance("47 hours")
    assert run.status().status == "running"
    env.run_until_idle()
    state = run.status()
    assert state.status == "errored"
    assert state.error is not None and state.error.type == "EventTimeoutError"
    assert state.rollback is not None and state.rollback.outcome == "complete"
    assert waiting.names() == ["book", "unbook"]
    assert env.now == T0 + timedelta(days=2)
    assert "wait_timed_out" in event_types(run.events())
    with pytest.raises(SagaStateError):
        env.send_event("e-4", "approval", "too late")


def test_a_held_saga_is_redriven_after_the_failure_is_fixed(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """The export fails for good: the saga is held, nothing undone, nothing due.  Once the
    injected failure is fixed, ``redrive()`` runs the export again (attempt 4, a fresh
    budget) and the saga completes; the booking ran once."""
    waiting = Waiting(sagas)
    env.fail(waiting.export, attempt=range(1, 10))
    run = env.start(waiting.held, saga_id="h-1")
    env.run_until_idle()
    state = run.status()
    assert state.status == "held"
    assert state.error is not None and state.error.type == "RuntimeError"
    assert waiting.names() == ["book"]
    assert env.pending() == []
    env.fix(waiting.export)
    assert run.redrive().status == "running"
    env.run_until_idle()
    state = run.status()
    assert (state.status, state.output) == ("complete", "exported")
    assert [a.attempt for a in state.step("export").attempts] == [1, 2, 3, 4]
    assert waiting.names() == ["book", "export", "ship"]
    assert event_types(run.events()).count("saga_redriven") == 1


def test_a_held_saga_rolled_back_on_request_undoes_what_ran(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """``rollback()`` of a held saga compensates the booking and ends ``errored``."""
    waiting = Waiting(sagas)
    env.fail(waiting.export, attempt=[1, 2, 3])
    run = env.start(waiting.held, saga_id="h-2")
    env.run_until_idle()
    assert run.status().status == "held"
    run.rollback()
    env.run_until_idle()
    assert run.status().status == "errored"
    assert waiting.names() == ["book", "unbook"]


def test_a_hold_that_times_out_rolls_back_by_itself(sagas: SagaApp, env: SagaTestEnv) -> None:
    """Held with ``hold_timeout="1 day"`` and left alone: a day after the hold began, the
    rollback starts on its own."""
    waiting = Waiting(sagas)
    env.fail(waiting.export, attempt=[1, 2, 3])
    run = env.start(waiting.held_briefly, saga_id="h-3")
    while run.status().status != "held":
        assert env.run_next(), "ran out of work before the saga was held"
    held_at = env.now
    assert env.pending() == [PendingMessage(due_at=held_at + timedelta(days=1), saga_id="h-3",
                                            kind="wake", step="hold", count=1, attempt=1)]
    env.run_until_idle()
    state = run.status()
    assert state.status == "errored"
    assert state.rollback is not None and state.rollback.outcome == "complete"
    assert waiting.names() == ["book", "unbook"]
    assert env.now == held_at + timedelta(days=1)


def test_a_retry_delay_longer_than_max_countdown_waits_as_a_timer(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """``RetryLater("1 day")`` is beyond the app's ``max_countdown`` (5 minutes): the retry
    is a timer, pending as the step's next attempt, and runs a virtual day later."""
    shop = Shop(sagas)
    env.fail("reserve", error=RetryLater("1 day", "come back tomorrow"))
    run = env.start(shop.order, saga_id="r-1")
    env.advance(0)
    assert env.pending() == [PendingMessage(due_at=T0 + timedelta(days=1), saga_id="r-1",
                                            kind="step", step="reserve", count=1, attempt=2)]
    env.run_until_idle()
    starts = [a.started_at for a in run.status().step("reserve").attempts]
    assert starts == [T0, T0 + timedelta(days=1)]
    assert run.status().status == "complete"


def test_send_event_and_fix_refuse_bad_input(sagas: SagaApp, env: SagaTestEnv) -> None:
    """``send_event`` to an unknown saga raises ``SagaNotFoundError``; ``fix`` of something
    that is not a step, ``SagaConfigError``."""
    Waiting(sagas)
    with pytest.raises(SagaNotFoundError):
        env.send_event("nobody", "approval")
    with pytest.raises(SagaConfigError, match="'exprt' is not a saga step"):
        env.fix("exprt")


# --- bad input, and giving the app back ------------------------------------------------------


def test_bad_injections_are_refused_with_errors_naming_them(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """A typo in a step name, a rollback of a step that has none, attempt 0, a non-exception
    error and a clock going backwards are each refused, naming the problem."""
    Shop(sagas)

    @sagas.step(name="bare")
    def bare() -> None: ...

    with pytest.raises(SagaConfigError, match="'reserv' is not a saga step"):
        env.fail("reserv")
    with pytest.raises(SagaConfigError, match="'bare' has no rollback handler"):
        env.fail_rollback(bare)
    with pytest.raises(SagaConfigError, match="attempt numbers start at 1"):
        env.timeout("reserve", attempt=0)
    with pytest.raises(SagaConfigError, match="count must be 1 or more, not 0"):
        env.while_running("reserve", env.run_next, count=0)
    with pytest.raises(SagaConfigError, match="exception instance"):
        env.fail("reserve", error="boom")  # type: ignore[arg-type]
    with pytest.raises(SagaConfigError, match="advance: a duration cannot be negative"):
        env.advance(timedelta(seconds=-1))
    with pytest.raises(SagaConfigError, match="takes a saga"):
        env.start(bare)  # type: ignore[arg-type]


def test_run_until_idle_gives_up_on_a_saga_that_never_goes_idle(
        sagas: SagaApp, env: SagaTestEnv) -> None:
    """``max_messages`` bounds the run, with an error saying what was still queued."""
    shop = Shop(sagas)
    env.start(shop.order, saga_id="o-16")
    with pytest.raises(SagaError, match="still busy after 2 messages"):
        env.run_until_idle(max_messages=2)


def test_one_environment_at_a_time_and_the_app_given_back(sagas: SagaApp) -> None:
    """A second environment on an app in use is refused; once the first is closed, the app
    uses its own (here unreachable) Redis again, and a closed environment refuses to run."""
    shop = Shop(sagas)
    env = SagaTestEnv(sagas, start=T0)
    with pytest.raises(SagaConfigError, match="already runs its sagas in process"):
        SagaTestEnv(sagas)
    env.close()
    with pytest.raises(SagaConfigError, match="closed"):
        env.run_next()
    with pytest.raises(SagaStoreUnavailableError):
        shop.order.apply_async(saga_id="after-close")
    with SagaTestEnv(sagas, start=T0) as again:  # and it can be used again
        run = again.start(shop.order, saga_id="o-17")
        again.run_until_idle()
        assert run.status().status == "complete"


def test_a_naive_start_time_and_a_non_app_are_refused(app: Celery, sagas: SagaApp) -> None:
    """The virtual clock is UTC-aware, as every saga timestamp is; the environment takes a
    ``SagaApp``, not the Celery app under it."""
    with pytest.raises(SagaConfigError, match="timezone-aware"):
        SagaTestEnv(sagas, start=datetime(2026, 1, 1))
    with pytest.raises(SagaConfigError, match="takes your SagaApp, got <Celery"):
        SagaTestEnv(app)


# --- living in a test process ------------------------------------------------------------


@pytest.fixture
def outer_alarm() -> Iterator[list[int]]:
    """A ``SIGALRM`` timer of the test's own, as pytest-timeout sets one around a test: the
    signals it delivered; whatever timer ran before is set again afterwards."""
    fired: list[int] = []
    handler = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    before = signal.setitimer(signal.ITIMER_REAL, 0)
    began = time.monotonic()
    yield fired
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, handler)
    if before[0] > 0:
        signal.setitimer(signal.ITIMER_REAL, max(before[0] - (time.monotonic() - began), 0.001),
                         before[1])


def test_attempts_leave_an_outer_alarm_set(sagas: SagaApp, env: SagaTestEnv,
                                           outer_alarm: list[int]) -> None:
    """Each attempt's timeout alarm (main thread, as on the solo pool) gives a timer set
    before it back for what is left of it, so pytest-timeout still guards the test."""
    shop = Shop(sagas)
    signal.setitimer(signal.ITIMER_REAL, 100)
    run = env.start(shop.order, saga_id="o-18")
    env.run_until_idle()
    assert run.status().status == "complete"
    left, _ = signal.getitimer(signal.ITIMER_REAL)
    assert 50 < left <= 100
    assert outer_alarm == []


def test_an_outer_alarm_due_during_a_body_goes_off_after_it(
        sagas: SagaApp, env: SagaTestEnv, outer_alarm: list[int]) -> None:
    """An outer timer that fell due while a body ran is not lost: it goes off right after."""
    @sagas.step(name="nap", retries={"limit": 0})
    def nap() -> None:
        time.sleep(0.2)

    signal.setitimer(signal.ITIMER_REAL, 0.05)
    env.start(sagas.saga("napping", [nap.s()]), saga_id="o-19")
    env.run_until_idle()
    deadline = time.monotonic() + 5
    while not outer_alarm and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outer_alarm == [signal.SIGALRM]


def test_the_module_exports_exactly_its_api() -> None:
    """``saga_celery.testing.__all__`` is the harness's public surface: a change is a choice."""
    assert saga_celery.testing.__all__ == ["PendingMessage", "SagaTestEnv"]
