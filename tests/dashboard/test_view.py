"""What the dashboard draws, from a ``SagaState`` as JSON and its events (pure, in memory)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from saga_celery._celery.definition import sleep_stage, wait_stage
from saga_celery._celery.dispatch import task_id
from saga_celery._core.events import EventSent, RedriveRequested, WakeUp
from saga_celery._core.model import Kind, OnFailure, Plan
from saga_celery._core.state import to_state
from saga_celery.dashboard.fields import held_periods
from saga_celery.dashboard.server import parse_users
from saga_celery.dashboard.view import (
    flower_link,
    list_row,
    rollback_budgets,
    step_lines,
    timeline,
)
from tests.unit.sim import plan
from tests.unit.test_engine import Clock, Driver, new_engine, stored_events, submit, with_waits

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def at(ms: int) -> str:
    return (T0 + timedelta(milliseconds=ms)).isoformat()


def attempt(n: int, start: int, end: int | None, success: bool | None,
            error: str | None = None) -> dict[str, Any]:
    return {"attempt": n, "started_at": at(start), "ended_at": None if end is None else at(end),
            "success": success,
            "error": None if error is None else {"type": "RuntimeError", "message": error}}


def step(name: str, seq: int | None, status: str, attempts: list[dict[str, Any]],
         rollback: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "count": 1, "stage": (seq or 1) - 1, "start_seq": seq,
            "status": status, "output": None, "attempts": attempts, "rollback": rollback,
            **extra}


def saga(status: str, steps: list[dict[str, Any]], ended: int | None) -> dict[str, Any]:
    return {"id": "order-42", "name": "order", "status": status, "params": None,
            "output": None, "error": None, "created_at": at(0), "started_at": at(1),
            "ended_at": None if ended is None else at(ended), "rollback": None, "steps": steps}


ROLLED_BACK = saga("errored", [
    step("reserve", 1, "complete", [attempt(1, 10, 20, True)],
         {"status": "complete", "error": None, "attempts": [attempt(1, 300, 310, True)]}),
    step("charge", 2, "errored", [attempt(1, 30, 40, False, "declined"),
                                  attempt(2, 100, 110, False, "declined")],
         {"status": "complete", "error": None,
          "attempts": [attempt(1, 200, 210, False, "refund down"), attempt(2, 250, 260, True)]}),
    step("ticket", None, "cancelled", []),
], ended=320)

EVENTS = [
    {"type": "rollback_step_started", "step": "charge", "count": 1},
    {"type": "rollback_attempt_started", "step": "charge", "count": 1, "attempt": 1},
    {"type": "rollback_attempt_started", "step": "charge", "count": 1, "attempt": 2},
    {"type": "rollback_step_started", "step": "reserve", "count": 1},
    {"type": "rollback_attempt_started", "step": "reserve", "count": 1, "attempt": 1},
]


def test_bars_run_forward_then_the_rollback_beneath_in_the_order_it_ran() -> None:
    """Forward bars in start order, one row per step; rollback rows ordered by when each
    handler first ran (here charge's before reserve's); a step never started has none."""
    drawn = timeline(ROLLED_BACK, EVENTS, now=T0 + timedelta(hours=1))
    assert [(b.lane, b.row, b.name, b.attempt, b.outcome) for b in drawn.bars] == [
        ("forward", 0, "reserve", 1, "complete"),
        ("forward", 1, "charge", 1, "failed"),
        ("forward", 1, "charge", 2, "failed"),
        ("rollback", 0, "charge", 1, "failed"),
        ("rollback", 0, "charge", 2, "complete"),
        ("rollback", 1, "reserve", 1, "complete"),
    ]
    assert (drawn.forward_rows, drawn.rollback_rows) == (2, 2)
    assert drawn.end == T0 + timedelta(milliseconds=320)  # a finished saga: not `now`


def test_bars_sit_on_one_axis_from_creation_to_the_end() -> None:
    """Left and width are percent of created_at..ended_at; a tiny attempt keeps a visible
    width; the title carries the attempt, the outcome and the error."""
    drawn = timeline(ROLLED_BACK, EVENTS, now=T0)
    first, charge2 = drawn.bars[0], drawn.bars[2]
    assert first.left_pct == pytest.approx(10 / 320 * 100, abs=0.01)
    assert first.width_pct == pytest.approx(10 / 320 * 100, abs=0.01)
    assert charge2.label == "charge #2"
    assert "attempt 2: failed" in charge2.title
    assert "RuntimeError: declined" in charge2.title
    assert drawn.ticks[0] == (0.0, "0 ms") and drawn.ticks[-1][0] == 100.0


def test_a_running_attempt_reaches_now() -> None:
    """While the saga runs, the axis ends at ``now`` and an open attempt runs up to it."""
    running = saga("running", [step("reserve", 1, "running", [attempt(1, 10, None, None)])],
                   ended=None)
    drawn = timeline(running, [], now=T0 + timedelta(milliseconds=110))
    [bar] = drawn.bars
    assert bar.outcome == "running"
    assert bar.left_pct + bar.width_pct == pytest.approx(100)


def test_entries_of_another_kind_draw_by_their_generic_fields() -> None:
    """Entries of another kind with their own started_at/ended_at (a later release's) are
    drawn with no code of their own: a sleep or a wait grey, sleeping or waiting, whether
    still going or over; red when it timed out."""
    state = saga("running", [
        step("reserve", 1, "complete", [attempt(1, 10, 20, True)]),
        step("cool-off", 2, "complete", [], kind="sleep", started_at=at(20), ended_at=at(60)),
        step("approval", 3, "running", [], kind="wait", started_at=at(60), ended_at=None),
        step("timed-out", 4, "errored", [], kind="wait", started_at=at(5), ended_at=at(9)),
    ], ended=None)
    drawn = timeline(state, [], now=T0 + timedelta(milliseconds=100))
    assert [(b.kind, b.name, b.outcome) for b in drawn.bars] == [
        ("wait", "timed-out", "failed"),
        ("step", "reserve", "complete"),
        ("sleep", "cool-off", "waiting"),
        ("wait", "approval", "waiting"),
    ]
    lines = step_lines(state, [], flower_url="http://f")
    assert [(line.name, line.kind, line.task_urls != []) for line in lines][:3] == [
        ("reserve", "step", True), ("cool-off", "sleep", False), ("approval", "wait", False)]


def real_saga(saga_plan: Plan, drive: Callable[[Driver, Clock], None]
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A saga run by the real engine and core (in memory), as the reading API returns it:
    ``run.status()`` as JSON and ``run.events()``."""
    clock = Clock()
    engine, store = new_engine(clock)
    driver = submit(engine, "order-42", saga_plan)
    drive(driver, clock)
    state = to_state(engine.load("order-42").run).model_dump(mode="json")
    return state, stored_events(store, "order-42")


def sleep_then_wait(driver: Driver, clock: Clock) -> None:
    driver.run("a", "A")
    clock.advance(60)
    driver.feed(WakeUp(key="nap#1"))
    clock.advance(5)
    driver.feed(EventSent(event_type="ok", payload=1))
    driver.run("b", "B")


def test_a_real_sleep_and_wait_are_grey_bars_in_the_order_they_ran() -> None:
    """A saga that slept and then waited for an event, as the core records it (one attempt
    per waiting stage): their bars are "sleeping or waiting", between the steps around
    them on the axis, with no attempt number (waits are not retried) and their kind."""
    waits = with_waits(plan("a"), sleep_stage("60 seconds", "nap"),
                       wait_stage("ok", "1 hour", None))
    [[b]] = plan("b").stages
    stages = [*waits.stages, [b.model_copy(update={"stage": len(waits.stages)})]]
    state, events = real_saga(waits.model_copy(update={"stages": stages}), sleep_then_wait)
    assert state["status"] == "complete"
    drawn = timeline(state, events, now=T0)
    assert [(b.kind, b.name, b.attempt, b.outcome, b.label) for b in drawn.bars] == [
        ("step", "a", 1, "complete", "a #1"), ("sleep", "nap", None, "waiting", "nap"),
        ("wait", "wait:ok", None, "waiting", "wait:ok"), ("step", "b", 1, "complete", "b #1")]
    assert [b.row for b in drawn.bars] == [0, 1, 2, 3]
    assert all(a.ended_at is not None and a.ended_at <= b.started_at
               and a.left_pct <= b.left_pct for a, b in itertools.pairwise(drawn.bars))
    assert drawn.bars[1].width_pct == pytest.approx(60 / 65 * 100, abs=0.01)
    assert drawn.bars[1].title.startswith("sleep nap: sleeping or waiting, 60.00 s from +")
    assert drawn.bars[2].title.startswith("wait wait:ok: sleeping or waiting, 5.00 s")


def test_a_held_saga_has_a_held_row_up_to_now_then_up_to_its_redrive() -> None:
    """The times a saga stood held come from its events: while held, an amber bar from
    ``saga_held`` up to now, with the failure that held it; once redriven, up to then."""
    def hold(driver: Driver, clock: Clock) -> None:
        driver.start("a")
        clock.advance(1)
        driver.fail("a", retryable=False)
        clock.advance(30)

    held_plan = plan("a").model_copy(update={"on_failure": OnFailure.HOLD})
    state, events = real_saga(held_plan, hold)
    assert state["status"] == "held"
    now = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=40)
    drawn = timeline(state, events, now=now)
    assert [(b.kind, b.row, b.outcome) for b in drawn.bars] == [
        ("step", 0, "failed"), ("hold", 1, "held")]
    held = drawn.bars[1]
    assert held.ended_at is None and held.left_pct + held.width_pct == pytest.approx(100)
    assert held.label == "held" and "held: held, 39.00 s from +1.00 s" in held.title
    assert "RuntimeError: boom" in held.title

    def redrive(driver: Driver, clock: Clock) -> None:
        hold(driver, clock)
        driver.feed(RedriveRequested())
        driver.start("a", 2)
        driver.ok("a", "A", 2)

    state, events = real_saga(held_plan, redrive)
    assert state["status"] == "complete"
    [period] = held_periods(events)
    assert (period.outcome, (period.ended_at - period.started_at).total_seconds()) == (
        "redriven", 30.0)
    bars = timeline(state, events, now=now).bars
    assert [(b.kind, b.attempt, b.outcome) for b in bars] == [
        ("step", 1, "failed"), ("step", 2, "complete"), ("hold", None, "held")]
    assert "then redriven" in bars[2].title


def test_an_attempt_without_an_end_in_a_finished_saga_is_marked_lost() -> None:
    """A finished saga whose attempt never recorded its end does not show it running."""
    state = saga("terminated", [step("reserve", 1, "cancelled", [attempt(1, 10, None, None)])],
                 ended=50)
    assert [b.outcome for b in timeline(state, [], now=T0).bars] == ["lost"]


def test_each_retry_budget_of_a_rollback_is_its_own_flower_task() -> None:
    """Step links use the step's one task id; rollback links the id of the attempt's retry
    budget, which ``retry_rollback()`` reopens (announced by ``rollback_step_started``)."""
    events = [*EVENTS,
              {"type": "rollback_step_started", "step": "charge", "count": 1},
              {"type": "rollback_attempt_started", "step": "charge", "count": 1, "attempt": 3}]
    assert rollback_budgets(events) == {("charge", 1): [1, 3], ("reserve", 1): [1]}
    state = saga("errored", [step("charge", 1, "errored", [attempt(1, 1, 2, False)], {
        "status": "complete", "error": None,
        "attempts": [attempt(1, 3, 4, False), attempt(2, 5, 6, False),
                     attempt(3, 7, 8, True)]})], ended=9)
    flower = "http://flower:5555/"
    drawn = timeline(state, events, now=T0, flower_url=flower)
    urls = [b.task_url for b in drawn.bars]
    step_task = task_id("order-42", Kind.STEP, "charge#1", 1)
    first, second = (task_id("order-42", Kind.ROLLBACK, "charge#1", n) for n in (1, 3))
    assert urls == [f"http://flower:5555/task/{step_task}", f"http://flower:5555/task/{first}",
                    f"http://flower:5555/task/{first}", f"http://flower:5555/task/{second}"]
    [line] = step_lines(state, events, flower_url=flower)
    assert [what for what, _ in line.task_urls] == ["step", "rollback from #1",
                                                    "rollback from #3"]
    assert timeline(state, events, now=T0).bars[0].task_url is None  # no --flower-url


def test_flower_links_quote_the_task_id() -> None:
    """The link is ``<flower>/task/<id>`` whatever the base's trailing slash."""
    assert flower_link("http://f/", "a b") == "http://f/task/a%20b"
    assert flower_link(None, "x") is None


def test_list_rows_say_how_long_a_saga_took() -> None:
    """A list row has the saga's times to the second, and how long it took once it ended."""
    row = list_row(saga_id="s", name="n", status="complete", rollback=None, created_at=T0,
                   ended_at=T0 + timedelta(seconds=2.5))
    assert (row.rollback, row.duration) == ("-", "2.50 s")
    assert row.ended_at == "2026-01-02T03:04:07+00:00"


def test_basic_auth_users_read_as_flowers() -> None:
    """Repeated options and Flower's comma-separated list both work; a malformed entry is
    refused by name, without echoing a password."""
    assert parse_users(["a:1", "b:2,c:x:y"]) == {"a": "1", "b": "2", "c": "x:y"}
    with pytest.raises(ValueError, match="'nocolon'"):
        parse_users(["nocolon"])
    with pytest.raises(ValueError, match="user:password"):
        parse_users([":secret"])
