"""The pure saga state machine: ordering, retries, rollback modes, duplicates, terminate."""

from __future__ import annotations

from datetime import timedelta

from saga_celery._core.events import AttemptFailed, Decision
from saga_celery._core.machine import stage_output
from saga_celery._core.model import (
    ErrorInfo,
    Kind,
    OnRollbackError,
    RollbackMode,
    RollbackOutcome,
    RollbackStatus,
    SagaStatus,
    StepStatus,
)
from tests.unit.sim import Sim, plan


def test_happy_path_runs_stages_in_order_and_completes_with_last_output() -> None:
    """Each stage is sent only when the previous one completed; the saga's output is the last."""
    sim = Sim.start(plan("a", "b"))
    assert sim.sent() == ["step:a#1:1"]
    sim.start_step("a")
    assert sim.run.status == SagaStatus.RUNNING
    sim.ok("a", output=1)
    assert sim.sent() == ["step:b#1:1"]
    sim.run_step("b", output={"done": True})
    assert sim.run.status == SagaStatus.COMPLETE
    assert sim.run.output == {"done": True}
    assert sim.run.rollback is None
    assert sim.types()[-1] == "saga_completed"


def test_group_stage_output_is_list_in_declaration_order() -> None:
    """A parallel stage's output lists its steps' outputs in declaration order, not finish order."""
    sim = Sim.start(plan("a", ["b", "c"]))
    sim.run_step("a", output=0)
    assert sorted(sim.sent()) == ["step:b#1:1", "step:c#1:1"]
    sim.start_step("c")
    sim.start_step("b")
    sim.ok("c", output="C")
    assert sim.run.status == SagaStatus.RUNNING
    sim.ok("b", output="B")
    assert sim.run.output == ["B", "C"]
    assert stage_output(sim.run, 0) == 0


def test_rollback_runs_in_reverse_start_order_one_at_a_time() -> None:
    """Handlers run newest start first, the next only after the previous one finished."""
    sim = Sim.start(plan("a", "b", "c"))
    sim.run_step("a", output="A")
    sim.run_step("b", output="B")
    sim.start_step("c")
    sim.fail("c")
    assert sim.run.status == SagaStatus.ROLLING_BACK
    assert sim.sent() == ["rollback:c#1:1"]
    sim.rollback("c")
    assert sim.sent() == ["rollback:b#1:1"]
    sim.rollback("b")
    assert sim.sent() == ["rollback:a#1:1"]
    sim.rollback("a")
    assert sim.run.status == SagaStatus.ERRORED
    assert sim.run.rollback is not None
    assert sim.run.rollback.outcome == RollbackOutcome.COMPLETE
    assert sim.run.rollback.completed_steps == 3
    assert sim.run.error is not None and sim.run.error.step == "c"


def test_order_follows_start_order_not_declaration_order() -> None:
    """In a parallel stage, the sibling that started last is compensated first."""
    sim = Sim.start(plan(["a", "b"], "c"))
    sim.start_step("b")
    sim.start_step("a")
    sim.ok("a")
    sim.ok("b")
    sim.start_step("c")
    sim.fail("c")
    assert sim.run.rollback is not None
    assert sim.run.rollback.order == ["c#1", "a#1", "b#1"]


def test_sibling_in_flight_is_compensated_after_it_ends_with_its_real_output() -> None:
    """A sibling still running when its turn comes is compensated only after it finishes."""
    sim = Sim.start(plan(["a", "b"]))
    sim.start_step("a")
    sim.start_step("b")
    sim.fail("b")
    assert sim.sent() == ["rollback:b#1:1"]
    sim.rollback("b")
    assert sim.sent() == []  # a is still running: wait for it
    assert sim.run.status == SagaStatus.ROLLING_BACK
    sim.ok("a", output="late effect")
    assert sim.sent() == ["rollback:a#1:1"]
    assert sim.run.steps["a#1"].output == "late effect"
    sim.rollback("a")
    assert sim.run.status == SagaStatus.ERRORED


def test_never_started_and_handlerless_steps_are_not_compensated() -> None:
    """Only started steps with a handler are eligible; never-started steps end cancelled."""
    sim = Sim.start(plan("a", "b", "c", "d", rollback={"a", "c", "d"}))
    sim.run_step("a")
    sim.run_step("b")
    sim.start_step("c")
    sim.fail("c")
    assert sim.run.rollback is not None
    assert sim.run.rollback.order == ["c#1", "a#1"]
    assert sim.run.steps["d#1"].status == StepStatus.CANCELLED
    assert sim.run.steps["b#1"].rollback is None
    assert sim.run.steps["d#1"].rollback is None


def test_failure_with_no_eligible_step_runs_no_rollback() -> None:
    """No eligible step: no rollback, no rollback event, the saga just errors."""
    sim = Sim.start(plan("a", "b", rollback=set()))
    sim.run_step("a")
    sim.start_step("b")
    sim.fail("b")
    assert sim.run.status == SagaStatus.ERRORED
    assert sim.run.rollback is None
    assert not [t for t in sim.types() if t.startswith("rollback")]


def test_retry_then_success_keeps_the_saga_running() -> None:
    """A failed attempt with retries left sends the next attempt after the policy's delay."""
    sim = Sim.start(plan("a", limit=2))
    sim.start_step("a")
    t = sim.fail("a")
    assert sim.sent(t) == ["step:a#1:2"]
    assert t.dispatches[0].retries == 1
    assert t.events[-1]["retry_delay_ms"] == 100
    sim.start_step("a", 2)
    sim.ok("a", 2, output="x")
    assert sim.run.status == SagaStatus.COMPLETE
    assert [a.success for a in sim.run.steps["a#1"].attempts] == [False, True]


def test_last_attempt_failure_reports_no_retry_delay() -> None:
    """The final failed attempt's event says it will not be retried (retry_delay_ms null)."""
    sim = Sim.start(plan("a", limit=1))
    sim.start_step("a")
    sim.fail("a")
    sim.start_step("a", 2)
    t = sim.fail("a", 2)
    errored = [e for e in t.events if e["type"] == "attempt_errored"]
    assert errored[0]["retry_delay_ms"] is None


def test_non_retryable_failure_skips_remaining_retries() -> None:
    """A non-retryable failure fails the step at once despite its retry budget."""
    sim = Sim.start(plan("a", "b", limit=5))
    sim.run_step("a")
    sim.start_step("b")
    sim.fail("b", retryable=False, error="NonRetryableError")
    assert len(sim.run.steps["b#1"].attempts) == 1
    assert sim.run.status == SagaStatus.ROLLING_BACK


def test_halt_mode_stops_at_a_failed_handler() -> None:
    """By default a handler that fails for good halts the rollback with outcome failed."""
    sim = Sim.start(plan("a", "b", "c"))
    sim.run_step("a")
    sim.run_step("b")
    sim.start_step("c")
    sim.fail("c")
    sim.rollback("c")
    sim.rollback("b", ok=False)
    assert sim.sent() == []
    assert sim.run.status == SagaStatus.ERRORED
    assert sim.run.rollback is not None
    assert sim.run.rollback.outcome == RollbackOutcome.FAILED
    assert sim.run.rollback.error is not None and sim.run.rollback.error.step == "b"
    assert sim.run.steps["a#1"].rollback is not None
    assert sim.run.steps["a#1"].rollback.status == RollbackStatus.PENDING


def test_continue_mode_goes_on_after_a_failed_handler() -> None:
    """With on_rollback_error=continue the remaining handlers still run; outcome is failed."""
    sim = Sim.start(plan("a", "b", "c", on_rollback_error=OnRollbackError.CONTINUE))
    sim.run_step("a")
    sim.run_step("b")
    sim.start_step("c")
    sim.fail("c")
    sim.rollback("c")
    sim.rollback("b", ok=False)
    assert sim.sent() == ["rollback:a#1:1"]
    sim.rollback("a")
    assert sim.run.rollback is not None
    assert sim.run.rollback.outcome == RollbackOutcome.FAILED
    assert sim.run.rollback.completed_steps == 2


def test_parallel_rollback_sends_all_handlers_at_once() -> None:
    """rollback_mode=parallel dispatches every eligible handler together."""
    sim = Sim.start(plan("a", "b", "c", rollback_mode=RollbackMode.PARALLEL))
    sim.run_step("a")
    sim.run_step("b")
    sim.start_step("c")
    t = sim.fail("c")
    assert sorted(sim.sent(t)) == ["rollback:a#1:1", "rollback:b#1:1", "rollback:c#1:1"]
    sim.rollback("a")
    sim.rollback("c")
    assert sim.run.status == SagaStatus.ROLLING_BACK
    sim.rollback("b")
    assert sim.run.status == SagaStatus.ERRORED


def test_rollback_handler_retries_follow_its_own_policy() -> None:
    """A failing handler is retried within its own budget before it counts as failed."""
    sim = Sim.start(plan("a", "b", rb_limit=1))
    sim.run_step("a")
    sim.start_step("b")
    sim.fail("b")
    sim.start_step("b", kind=Kind.ROLLBACK)
    t = sim.fail("b", kind=Kind.ROLLBACK)
    assert sim.sent(t) == ["rollback:b#1:2"]
    sim.rollback("b", 2)
    assert sim.sent() == ["rollback:a#1:1"]


def test_retry_rollback_resumes_with_fresh_budget_and_continued_attempts() -> None:
    """retry_rollback re-runs unfinished handlers in order, attempt numbers continuing."""
    sim = Sim.start(plan("a", "b", "c"))
    sim.run_step("a")
    sim.run_step("b")
    sim.start_step("c")
    sim.fail("c")
    sim.rollback("c")
    sim.rollback("b", ok=False)
    assert sim.run.status == SagaStatus.ERRORED
    t = sim.retry_rollback()
    assert t.refusal is None
    assert sim.run.status == SagaStatus.ROLLING_BACK
    assert sim.run.ended_at is None
    assert t.events[0]["type"] == "rollback_started" and t.events[0]["resumed"] is True
    assert sim.sent() == ["rollback:b#1:2"]
    assert t.dispatches[0].retries == 0
    sim.rollback("b", 2)
    sim.rollback("a")
    assert sim.run.status == SagaStatus.ERRORED
    assert sim.run.rollback is not None
    assert sim.run.rollback.outcome == RollbackOutcome.COMPLETE


def test_retry_rollback_is_refused_unless_the_outcome_is_failed() -> None:
    """Only a failed rollback can be resumed."""
    sim = Sim.start(plan("a"))
    sim.run_step("a")
    t = sim.retry_rollback()
    assert t.refusal is not None and "failed" in t.refusal
    assert not t.changed


def test_duplicate_start_of_running_attempt_waits_while_lease_is_live() -> None:
    """A second delivery of a running attempt waits; it never runs beside the first."""
    sim = Sim.start(plan("a"))
    assert sim.start_step("a").decision == Decision.RUN
    t = sim.start_step("a", lease_live=True)
    assert t.decision == Decision.WAIT
    assert not t.changed
    assert sim.types().count("attempt_started") == 1


def test_redelivery_after_worker_loss_reruns_the_same_attempt() -> None:
    """Lease gone: the same attempt number runs again, counted once in events."""
    sim = Sim.start(plan("a"))
    sim.start_step("a")
    t = sim.start_step("a")
    assert t.decision == Decision.RUN
    assert sim.run.steps["a#1"].attempts[0].losses == 1
    assert sim.types().count("attempt_started") == 1
    assert sim.run.next_seq == 2


def test_three_worker_losses_fail_the_attempt_as_worker_lost() -> None:
    """After three worker losses the attempt fails with WorkerLost instead of looping."""
    sim = Sim.start(plan("a", limit=1))
    sim.start_step("a")
    sim.start_step("a")
    sim.start_step("a")
    t = sim.start_step("a")
    assert t.decision == Decision.SKIP
    attempt = sim.run.steps["a#1"].attempts[0]
    assert attempt.error is not None and attempt.error.type == "WorkerLost"
    assert sim.sent(t) == ["step:a#1:2"]
    assert not t.dispatches[0].via_retry


def test_duplicate_of_finished_attempt_is_dropped_and_resends_what_it_sent() -> None:
    """A redelivered finished attempt does not run; it re-sends its unstarted messages."""
    sim = Sim.start(plan("a", "b"))
    sim.run_step("a")
    t = sim.start_step("a")
    assert t.decision == Decision.SKIP
    assert not t.changed
    assert sim.sent(t) == ["step:b#1:1"]
    sim.start_step("b")
    assert sim.sent(sim.start_step("a")) == []


def test_duplicate_end_events_change_nothing() -> None:
    """Recording the same completion twice neither double-counts nor advances twice."""
    sim = Sim.start(plan("a", "b"))
    sim.run_step("a", output=1)
    t = sim.ok("a", output=2)
    assert not t.changed
    assert sim.run.steps["a#1"].output == 1
    assert sim.run.next_seq == 2


def test_stale_and_unknown_messages_are_skipped() -> None:
    """A message for an attempt that was never sent, or a step not in the plan, does nothing."""
    sim = Sim.start(plan("a", "b"))
    assert sim.start_step("b").decision == Decision.SKIP
    assert sim.start_step("a", 3).decision == Decision.SKIP
    t = sim.start_step("zzz")
    assert t.decision == Decision.SKIP and t.refusal is not None
    assert sim.run.status == SagaStatus.QUEUED


def test_out_of_order_end_before_start_is_ignored() -> None:
    """An end event for an attempt that never started is ignored."""
    sim = Sim.start(plan("a"))
    t = sim.ok("a", output=1)
    assert not t.changed
    assert sim.run.steps["a#1"].status == StepStatus.PENDING


def test_no_forward_step_starts_once_rollback_began() -> None:
    """A forward message arriving after the failure is skipped and its step stays cancelled."""
    sim = Sim.start(plan("a", ["b", "c"]))
    sim.run_step("a")
    sim.start_step("b")
    sim.fail("b")
    assert sim.start_step("c").decision == Decision.SKIP
    assert sim.run.steps["c#1"].status == StepStatus.CANCELLED
    assert sim.run.steps["c#1"].start_seq is None


def test_pending_retry_is_cancelled_when_the_saga_fails() -> None:
    """A sibling waiting for its retry is not retried once the saga failed."""
    sim = Sim.start(plan(["a", "b"], limit=3))
    sim.start_step("a")
    sim.start_step("b")
    sim.fail("a")
    assert "step:a#1:2" in sim.outbox()
    sim.fail("b", retryable=False)
    assert "step:a#1:2" not in sim.outbox()
    assert sim.start_step("a", 2).decision == Decision.SKIP
    assert sim.run.steps["a#1"].status == StepStatus.ERRORED


def test_terminate_without_rollback_waits_for_in_flight_attempts() -> None:
    """terminate(rollback=False): nothing new starts, running attempts finish, then terminated."""
    sim = Sim.start(plan("a", "b"))
    sim.start_step("a")
    t = sim.terminate(rollback=False)
    assert t.events[0]["type"] == "terminate_requested"
    assert sim.run.status == SagaStatus.RUNNING
    sim.ok("a")
    assert sim.run.status == SagaStatus.TERMINATED
    assert sim.run.rollback is None
    assert sim.run.steps["b#1"].status == StepStatus.CANCELLED


def test_terminate_with_rollback_compensates_with_terminated_error() -> None:
    """terminate(rollback=True) rolls back what started; the saga ends terminated."""
    sim = Sim.start(plan("a", "b"))
    sim.run_step("a")
    sim.start_step("b")
    sim.terminate(rollback=True)
    assert sim.run.status == SagaStatus.ROLLING_BACK
    assert sim.run.rollback is not None
    assert sim.run.rollback.trigger_error.type == "Terminated"
    assert sim.sent() == []  # b is still running
    sim.ok("b", output="B")
    sim.rollback("b")
    sim.rollback("a")
    assert sim.run.status == SagaStatus.TERMINATED


def test_terminate_is_refused_once_terminal() -> None:
    """A terminal saga cannot be terminated."""
    sim = Sim.start(plan("a"))
    sim.run_step("a")
    t = sim.terminate(rollback=True)
    assert t.refusal is not None and "complete" in t.refusal


def test_terminate_before_any_start_ends_terminated_without_rollback() -> None:
    """A queued saga that is terminated never starts a step and runs no rollback."""
    sim = Sim.start(plan("a"))
    sim.terminate(rollback=True)
    assert sim.run.status == SagaStatus.TERMINATED
    assert sim.start_step("a").decision == Decision.SKIP


def test_errored_only_after_every_started_attempt_ended() -> None:
    """With halt, a sibling still in flight keeps the saga from ending until it finishes."""
    sim = Sim.start(plan(["a", "b"], rollback={"b"}))
    sim.start_step("a")
    sim.start_step("b")
    sim.fail("b")
    sim.rollback("b")
    assert sim.run.rollback is not None
    assert sim.run.rollback.outcome == RollbackOutcome.COMPLETE
    assert sim.run.status == SagaStatus.ROLLING_BACK
    sim.ok("a")
    assert sim.run.status == SagaStatus.ERRORED


def test_same_step_twice_gets_counts_and_separate_compensation() -> None:
    """A step used twice is tracked per (name, count) and compensated per count."""
    sim = Sim.start(plan("a", "a", "b"))
    sim.run_step("a", count=1)
    sim.run_step("a", count=2)
    sim.start_step("b")
    sim.fail("b")
    assert sim.run.rollback is not None
    assert sim.run.rollback.order == ["b#1", "a#2", "a#1"]


def test_events_carry_saga_id_step_count_and_attempt() -> None:
    """Every event names its saga; step and attempt events name step, count and attempt."""
    sim = Sim.start(plan("a"))
    sim.run_step("a")
    events = [e for t in sim.log for e in t.events]
    assert all(e["saga_id"] == "s" and "timestamp" in e for e in events)
    started = next(e for e in events if e["type"] == "attempt_started")
    assert (started["step"], started["count"], started["attempt"]) == ("a", 1, 1)


def test_a_retry_due_while_the_attempt_before_still_holds_the_lease_waits() -> None:
    """A retry whose step's lease is still held (a killed attempt's, or a body that outlived
    its timeout) waits, changing nothing, and runs once the lease is gone."""
    sim = Sim.start(plan("a", limit=1))
    sim.start_step("a")
    sim.fail("a")
    t = sim.start_step("a", 2, lease_live=True)
    assert t.decision == Decision.WAIT
    assert not t.changed
    assert sim.start_step("a", 2).decision == Decision.RUN


def test_a_rollback_waits_while_its_step_still_holds_the_lease() -> None:
    """A handler never runs beside a body of its own step still running past its end."""
    sim = Sim.start(plan("a"))
    sim.start_step("a")
    sim.fail("a", error="TimeoutError")
    assert sim.run.status == SagaStatus.ROLLING_BACK
    t = sim.start_step("a", kind=Kind.ROLLBACK, lease_live=True)
    assert t.decision == Decision.WAIT and not t.changed
    assert sim.start_step("a", kind=Kind.ROLLBACK).decision == Decision.RUN


def test_retry_later_sets_the_next_delay_and_still_counts_against_the_limit() -> None:
    """``RetryLater``: the attempt's own delay replaces the policy's; the limit still holds."""
    sim = Sim.start(plan("a", limit=1))
    sim.start_step("a")
    t = sim.feed(AttemptFailed(kind=Kind.STEP, key="a#1", attempt=1, delay_ms=30_000,
                               error=ErrorInfo(type="RetryLater", message="rate limited")))
    assert t.dispatches[0].due_at == sim.now + timedelta(seconds=30)
    errored = [e for e in t.events if e["type"] == "attempt_errored"]
    assert errored[0]["retry_delay_ms"] == 30_000
    sim.start_step("a", 2)
    t = sim.feed(AttemptFailed(kind=Kind.STEP, key="a#1", attempt=2, delay_ms=30_000,
                               error=ErrorInfo(type="RetryLater", message="rate limited")))
    assert [d.kind for d in t.dispatches] == [Kind.ROLLBACK]  # no third attempt: compensate
    assert sim.run.steps["a#1"].status == StepStatus.ERRORED


def test_terminate_during_a_rollback_after_failure_is_recorded_and_changes_nothing_else() -> None:
    """SPEC 4: the request is recorded (terminate_requested); the rollback goes on and the
    saga still ends errored."""
    sim = Sim.start(plan("a", "b"))
    sim.run_step("a")
    sim.start_step("b")
    sim.fail("b")
    assert sim.run.status == SagaStatus.ROLLING_BACK
    t = sim.terminate(rollback=True)
    assert t.refusal is None
    assert [e["type"] for e in t.events] == ["terminate_requested"]
    assert sim.run.terminate is None and sim.run.status == SagaStatus.ROLLING_BACK
    sim.rollback("b")
    sim.rollback("a")
    assert sim.run.status == SagaStatus.ERRORED
