"""One set of scenarios run three ways, compared: on a real prefork worker against real Redis,
in process through ``saga_celery.testing`` with the same bodies failing as the params say,
and in process with those failures injected instead (``env.fail`` and the like).

Compared: the saga's status, output, error and rollback outcome; each step's status, output,
attempts (number, success, error) and rollback attempts; the stages in the order the
rollback ran them; how many events of each type; every retry delay.  The harness must agree
with the worker on all of it: the same core decides both.

Within a parallel stage a worker starts the steps in whichever order its processes take
them, so the rollback order is compared as stages, and checked in each run to be the
reverse of that run's own start order.  A step held in flight while its sibling fails (two
worker processes; ``SagaTestEnv.while_running`` in process) must end after the rollback began
in every run, and be compensated with its real output.

The waiting scenarios (SPEC section 8) wait in real time on the worker, briefly: a 2 s sleep
and a 2 s wait timeout, which the worker's timer bootstep fires (its log shows
``saga.timer_fired`` for the saga), an event sent (twice, with one ``event_id``) once the wait
has begun, and a saga held then redriven.  The harness waits the same on its virtual clock,
firing the store's timers through the same ``fire_due``.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from saga_celery import SagaHandle, SagaState
from saga_celery.testing import SagaTestEnv
from tests.integration.harness import WorkerProcess, import_copy, start_worker
from tests.integration.shop_fixtures import wait_for

pytestmark = pytest.mark.integration

APP = "tests.integration.scenario_app"
REASON = "stopped by the test"


@dataclass(frozen=True)
class Scenario:
    name: str
    saga: str
    """The saga's attribute in ``scenario_app``."""
    steps: dict[str, dict[str, str]] = field(default_factory=dict)
    rollbacks: dict[str, dict[str, str]] = field(default_factory=dict)
    terminate_after_failure_of: str | None = None
    """Terminate (with rollback) once this step's first attempt has failed."""
    retry_rollback: bool = False
    """Once the saga has ended with a failed rollback, resume it (``run.retry_rollback()``)."""
    in_flight: str | None = None
    """In process, run the next message while this step's first attempt runs: the worker's
    two processes run it beside its sibling (``until_rolling_back``)."""
    event_once_waiting: str | None = None
    """Once this wait has begun, send it its event (twice, with the same ``event_id``)."""
    redrive: bool = False
    """Once the saga is held, fix what failed and ``redrive()`` it."""
    fires_timers: bool = False
    """The worker's timer bootstep must fire a timer of this saga (a sleep, a wait's
    timeout)."""
    expect: dict[str, Any] = field(default_factory=dict)
    """Parts of the outcome (``outcome``) every run must show, beyond agreeing."""

    def params(self) -> dict[str, Any]:
        return {"steps": self.steps, "rollbacks": self.rollbacks}


SCENARIOS = [
    Scenario("success", "order"),
    Scenario("retried_then_complete", "order", steps={"sc.charge": {"1": "fail", "2": "fail"}}),
    Scenario("retries_spent_then_a_handler_fails_once", "order",
             steps={"sc.ship": {"1": "fail", "2": "fail", "3": "fail"}},
             rollbacks={"sc.charge": {"1": "fail"}}),
    Scenario("continue_on_rollback_error", "order_continue",
             steps={"sc.ship": {"1": "refuse"}},
             rollbacks={"sc.sms": {"1": "fail", "2": "fail"}}),
    # A handler outside the parallel stage fails: which of the pair a worker starts first
    # must not decide what the halt leaves undone.
    Scenario("halt_on_rollback_error", "order", steps={"sc.ship": {"1": "refuse"}},
             rollbacks={"sc.charge": {"1": "fail", "2": "refuse"}}),
    Scenario("retry_rollback_after_a_halt", "order", steps={"sc.ship": {"1": "refuse"}},
             rollbacks={"sc.charge": {"1": "fail", "2": "fail"}}, retry_rollback=True),
    Scenario("parallel_stage_rolled_back", "order", steps={"sc.ship": {"1": "refuse"}}),
    Scenario("sibling_in_flight_when_the_saga_fails", "order",
             steps={"sc.email": {"1": "until_rolling_back"},
                    "sc.sms": {"1": "refuse_once_started:sc.email"}},
             in_flight="sc.email"),
    Scenario("terminate_during_a_retry_delay", "order", steps={"sc.charge": {"1": "later"}},
             terminate_after_failure_of="sc.charge"),
    Scenario("timeout_then_success", "timed", steps={"sc.slow": {"1": "hang"}}),
    Scenario("a_short_sleep", "slept", fires_timers=True,
             expect={"status": "complete", "output": "shipped"}),
    Scenario("a_wait_ended_by_an_event_sent_twice", "approval",
             event_once_waiting="sc.approve",
             expect={"status": "complete", "event_received": 1, "wait_completed": 1}),
    Scenario("a_wait_timing_out_rolls_back", "approval_brief", fires_timers=True,
             expect={"status": "errored", "error_type": "EventTimeoutError",
                     "wait_timed_out": 1}),
    Scenario("held_then_redriven", "held",
             steps={"sc.ship": {"1": "fail", "2": "fail", "3": "fail"}}, redrive=True,
             expect={"status": "complete", "saga_held": 1, "saga_redriven": 1,
                     "rollback_started": 0}),
]
APPROVED = {"by": "ann"}
"""The payload of the event a waiting scenario sends."""


def shows(found: dict[str, Any], expect: dict[str, Any]) -> dict[str, Any]:
    """What ``expect`` names, read from an outcome: its keys, the error's type, or a count of
    events of a type."""
    error = found["error"]
    named = {"status": found["status"], "output": found["output"],
             "error_type": error and error["type"]}
    return {key: named[key] if key in named else found["event_types"][key] for key in expect}


@pytest.fixture(scope="module")
def scenario_env(redis_url: str) -> dict[str, str]:
    return {"SAGA_TEST_REDIS_URL": redis_url}


@pytest.fixture(scope="module")
def scenarios(scenario_env: dict[str, str]) -> ModuleType:
    """``scenario_app`` imported here with the worker's settings (a client of its own)."""
    spec = importlib.util.find_spec(APP)
    assert spec is not None and spec.origin is not None
    return import_copy(spec.origin, f"{APP}_client", scenario_env)


@pytest.fixture(scope="module")
def worker(scenario_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[WorkerProcess]:
    """One prefork worker (2 processes) for every scenario of the module."""
    log_dir: Path = tmp_path_factory.mktemp("scenario-logs")
    with start_worker(APP, env=scenario_env, concurrency=2, log_dir=log_dir) as process:
        yield process


# --- running a scenario ------------------------------------------------------------------


def failed_once(handle: SagaHandle, step: str) -> bool:
    return any(e["type"] == "attempt_errored" and e["step"] == step for e in handle.events())


def waiting(handle: SagaHandle, step: str) -> bool:
    return handle.status().step(step).status == "running"


def send_twice(scenarios: ModuleType, send: Callable[..., SagaState]) -> None:
    """The approval, and the same again (one ``event_id``): counted once."""
    for _ in range(2):
        send(scenarios.APPROVAL, APPROVED, event_id="mail-1")


def on_worker(scenarios: ModuleType, scenario: Scenario) -> tuple[SagaState, list[Any]]:
    handle = getattr(scenarios, scenario.saga).apply_async(
        saga_id=f"w-{uuid.uuid4().hex[:10]}", params=scenario.params())
    if scenario.terminate_after_failure_of is not None:
        step = scenario.terminate_after_failure_of
        wait_for(lambda: failed_once(handle, step), timeout=30)
        handle.terminate(rollback=True, reason=REASON)
    if scenario.event_once_waiting is not None:
        wait = scenario.event_once_waiting
        wait_for(lambda: waiting(handle, wait), timeout=30)
        send_twice(scenarios, handle.send_event)
    if scenario.redrive:
        wait_for(lambda: handle.status().status == "held", timeout=60)
        handle.redrive()  # the params fail only attempts 1 to 3: attempt 4 is "fixed"
    state = handle.wait(timeout=90)
    if scenario.retry_rollback:
        handle.retry_rollback()
        state = handle.wait(timeout=90)
    return state, handle.events()


def in_process(scenarios: ModuleType, scenario: Scenario, *, inject: bool
               ) -> tuple[SagaState, list[Any]]:
    """The scenario through the harness: failures from the params (the same bodies as the
    worker's), or, with ``inject``, injected and the params left without them."""
    with SagaTestEnv(scenarios.sagas) as env:
        if inject:
            inject_failures(env, scenarios, scenario)
        if scenario.in_flight is not None:
            env.while_running(scenario.in_flight, env.run_next)
        handle = env.start(getattr(scenarios, scenario.saga), saga_id="h-1",
                           params={} if inject else scenario.params())
        if scenario.terminate_after_failure_of is not None:
            step = scenario.terminate_after_failure_of
            while not failed_once(handle, step):
                assert env.run_next(), "ran out of messages before the step failed"
            handle.terminate(rollback=True, reason=REASON)
        if scenario.event_once_waiting is not None:
            wait = scenario.event_once_waiting
            while not waiting(handle, wait):
                assert env.run_next(), "ran out of messages before the wait began"
            send_twice(scenarios, lambda *a, **kw: env.send_event(handle.id, *a, **kw))
        env.run_until_idle()
        if scenario.redrive:
            assert handle.status().status == "held"
            for step in scenario.steps:
                env.fix(step)
            handle.redrive()
            env.run_until_idle()
        if scenario.retry_rollback:
            handle.retry_rollback()
            env.run_until_idle()
        return handle.status(), handle.events()


def inject_failures(env: SagaTestEnv, scenarios: ModuleType, scenario: Scenario) -> None:
    for section, failures in (("steps", scenario.steps), ("rollbacks", scenario.rollbacks)):
        for step, acts in failures.items():
            for attempt, given in acts.items():
                n = int(attempt)
                if given == "until_rolling_back":
                    continue  # it succeeds: the harness holds it in flight (``in_flight``)
                act = "refuse" if given.startswith("refuse_once_started:") else given
                if act == "hang" and section == "steps":
                    env.timeout(step, attempt=n)
                elif section == "steps":
                    env.fail(step, attempt=n, error=scenarios.error_of(act, step, n))
                else:
                    env.fail_rollback(step, attempt=n, error=scenarios.error_of(act, step, n))


# --- what is compared --------------------------------------------------------------------


def _attempts(attempts: list[Any]) -> list[tuple[Any, ...]]:
    return [(a.attempt, a.success, a.error and a.error.model_dump()) for a in attempts]


def outcome(state: SagaState, events: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything a run decided, free of ids, timestamps and the order of parallel starts."""
    stage = {s.name: s.stage for s in state.steps}
    return {
        "status": state.status,
        "output": state.output,
        "error": state.error and state.error.model_dump(),
        "rollback": state.rollback and state.rollback.model_dump(),
        "steps": {
            f"{s.name}#{s.count}": {
                "status": s.status, "output": s.output, "started": s.start_seq is not None,
                "attempts": _attempts(s.attempts),
                "rollback": s.rollback and (s.rollback.status, _attempts(s.rollback.attempts),
                                            s.rollback.error and s.rollback.error.model_dump()),
            } for s in state.steps},
        "rollback_stages": [stage[e["step"]] for e in events
                            if e["type"] == "rollback_step_started"],
        "ended_after_rollback_began": ended_after_rollback_began(events),
        "event_types": Counter(e["type"] for e in events),
        "retry_delays": sorted((e["type"], e["step"], e["attempt"], e["retry_delay_ms"])
                               for e in events if e["type"].endswith("attempt_errored")),
    }


def ended_after_rollback_began(events: list[dict[str, Any]]) -> set[str]:
    """The steps whose attempt was still in flight when the rollback began."""
    types = [e["type"] for e in events]
    if "rollback_started" not in types:
        return set()
    begun = types.index("rollback_started")
    return {e["step"] for e in events[begun:] if e["type"] in ("step_completed", "step_errored")}


def assert_rollback_in_reverse_start_order(state: SagaState, events: list[dict[str, Any]]
                                           ) -> None:
    started = {s.name: s.start_seq for s in state.steps}
    order = [e["step"] for e in events if e["type"] == "rollback_step_started"]
    assert order == sorted(order, key=lambda name: -(started[name] or 0)), (order, started)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_the_harness_decides_as_a_real_worker_does(
        scenario: Scenario, scenarios: ModuleType, worker: WorkerProcess) -> None:
    """The scenario's outcome through the harness, with real failing bodies and with
    injected failures, is the outcome a prefork worker against Redis records."""
    runs = {
        "worker": on_worker(scenarios, scenario),
        "harness, failing bodies": in_process(scenarios, scenario, inject=False),
        "harness, injected failures": in_process(scenarios, scenario, inject=True),
    }
    for state, events in runs.values():
        assert state.is_terminal
        assert_rollback_in_reverse_start_order(state, events)
    if scenario.fires_timers:
        saga_id = runs["worker"][0].id
        assert any("saga.timer_fired" in line and saga_id in line
                   for line in worker.log().splitlines()), "no timer fired by the worker"
    expected = outcome(*runs["worker"])
    assert shows(expected, scenario.expect) == scenario.expect
    if scenario.in_flight is not None:
        assert expected["ended_after_rollback_began"] == {scenario.in_flight}
    for how in ("harness, failing bodies", "harness, injected failures"):
        assert outcome(*runs[how]) == expected, how
