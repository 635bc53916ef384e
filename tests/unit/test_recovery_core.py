"""The recovery sweep's rule in the pure core: what is re-sent, and how it backs off."""

from __future__ import annotations

from datetime import timedelta

from saga_celery._core.events import RecoverySwept
from saga_celery._core.model import Kind
from tests.unit.sim import Sim, plan

GRACE = timedelta(seconds=10)
GRACE_MS = GRACE.total_seconds() * 1000


def sweep(sim: Sim, after: timedelta, lapsed: list[tuple[Kind, str, int]] | None = None
          ) -> list[str]:
    sim.now += after
    return sim.sent(sim.feed(RecoverySwept(grace_ms=GRACE_MS, lapsed=lapsed or [])))


def test_an_overdue_message_is_resent_then_backs_off_exponentially() -> None:
    """A message not started after the grace is re-sent, next after 2x, then 4x the grace."""
    sim = Sim.start(plan("a"))
    assert sweep(sim, timedelta(seconds=5)) == []
    assert sweep(sim, timedelta(seconds=6)) == ["step:a#1:1"]
    assert sweep(sim, timedelta(seconds=15)) == []
    assert sweep(sim, timedelta(seconds=6)) == ["step:a#1:1"]
    assert sweep(sim, timedelta(seconds=39)) == []
    assert sweep(sim, timedelta(seconds=2)) == ["step:a#1:1"]
    assert sim.run.outbox["step:a#1:1"].resends == 3


def test_a_started_attempt_is_not_resent_from_the_outbox() -> None:
    """Once its attempt started, a message leaves the outbox and the sweep leaves it alone."""
    sim = Sim.start(plan("a"))
    sim.start_step("a")
    assert sweep(sim, timedelta(minutes=5)) == []


def test_a_lapsed_running_attempt_is_resent_with_its_attempt_number_and_backs_off() -> None:
    """A running attempt whose lease lapsed is re-sent as the same attempt, then backs off."""
    sim = Sim.start(plan("a", limit=2))
    sim.start_step("a")
    lapsed = [(Kind.STEP, "a#1", 1)]
    assert sweep(sim, timedelta(seconds=5), lapsed) == []
    assert sweep(sim, timedelta(seconds=6), lapsed) == ["step:a#1:1"]
    assert sweep(sim, timedelta(seconds=15), lapsed) == []
    assert sweep(sim, timedelta(seconds=6), lapsed) == ["step:a#1:1"]
    assert sim.run.steps["a#1"].attempts[0].resends == 2


def test_an_attempt_the_sweep_did_not_find_lapsed_is_not_resent() -> None:
    """Only attempts whose lease the sweep saw lapse are re-sent."""
    sim = Sim.start(plan("a"))
    sim.start_step("a")
    assert sweep(sim, timedelta(minutes=5)) == []
    assert sweep(sim, timedelta(minutes=5), [(Kind.STEP, "a#1", 2)]) == []


def test_a_finished_saga_is_left_alone() -> None:
    """The sweep never touches a terminal saga."""
    sim = Sim.start(plan("a"))
    sim.run_step("a")
    t = sim.feed(RecoverySwept(grace_ms=0, lapsed=[(Kind.STEP, "a#1", 1)]))
    assert not t.changed and t.dispatches == []
