"""Saga semantics on a real prefork worker and real Redis (SPEC sections 2, 4, 5, 6)."""

from __future__ import annotations

import itertools
from types import ModuleType

import pytest

from saga_celery import SagaConflictError, SagaStateError
from tests.integration.harness import WorkerProcess
from tests.integration.shop_fixtures import entries, ledger, wait_for

pytestmark = pytest.mark.integration

RESERVE, CHARGE, TICKET = "shop.reserve", "shop.charge", "shop.ticket"


def test_happy_path_completes_with_chained_outputs(shop: ModuleType, shop_worker: WorkerProcess,
                                                   saga_id: str) -> None:
    """Each step gets the previous output; the saga completes with the last step's output."""
    state = shop.order.apply_async(saga_id=saga_id).wait(timeout=30)
    assert state.status == "complete"
    assert state.output == {"ticket": "t-1"}
    assert state.step(CHARGE).output == {"charge": "c-100", "for": {"reservation": "r-sku-1-2"}}
    assert [s.start_seq for s in state.steps] == [1, 2, 3]
    assert state.rollback is None
    assert not entries(shop, saga_id, "rollback_start")
    types = [e["type"] for e in shop.sagas.run(saga_id).events()]
    assert types[:3] == ["saga_queued", "saga_started", "step_started"]
    assert types[-1] == "saga_completed"


def test_failure_rolls_back_in_reverse_start_order_with_outputs_and_error(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """A failing last step rolls back ticket, charge, reserve, each with its own output."""
    run = shop.order.apply_async(saga_id=saga_id, params={"fail": {TICKET: "always"}})
    state = run.wait(timeout=30)
    assert state.status == "errored"
    assert state.error is not None
    assert (state.error.type, state.error.step) == ("RuntimeError", TICKET)
    assert state.rollback is not None
    assert (state.rollback.outcome, state.rollback.completed_steps) == ("complete", 3)
    assert len(state.step(TICKET).attempts) == 3  # limit 2: three attempts
    rollbacks = entries(shop, saga_id, "rollback_start")
    assert [r["step"] for r in rollbacks] == [TICKET, CHARGE, RESERVE]
    assert rollbacks[0]["output"] is None
    assert rollbacks[1]["output"] == {"charge": "c-100", "for": {"reservation": "r-sku-1-2"}}
    assert rollbacks[2]["output"] == {"reservation": "r-sku-1-2"}
    assert all(r["error"] == {"type": "RuntimeError", "message": "step failed on purpose"}
               for r in rollbacks)
    assert len({r["key"] for r in rollbacks}) == 3
    types = [e["type"] for e in run.events()]
    assert types.count("rollback_step_completed") == 3
    assert types[-2:] == ["rollback_completed", "saga_errored"]


def test_parallel_sibling_in_flight_is_compensated_after_it_finishes(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """One sibling fails while the other still runs; the runner is undone only once it ended."""
    params = {"fail": {CHARGE: "nonretryable", "shop.slow": "sleep:0.7"}}
    state = shop.fan_out.apply_async(saga_id=saga_id, params=params).wait(timeout=30)
    assert state.status == "errored"
    assert state.step("shop.slow").status == "complete"
    assert state.step("shop.notify").status == "cancelled"
    slow_done = entries(shop, saga_id, "step_done", "shop.slow")[0]
    slow_undo = entries(shop, saga_id, "rollback_start", "shop.slow")[0]
    assert slow_undo["t"] >= slow_done["t"]
    assert slow_undo["output"] == "slow-done"
    seqs = {s.name: s.start_seq for s in state.steps if s.start_seq}
    expected = sorted(seqs, key=lambda n: seqs[n], reverse=True)
    assert [r["step"] for r in entries(shop, saga_id, "rollback_start")] == expected
    assert not entries(shop, saga_id, "step_start", "shop.notify")


def _gaps(state: object, step: str) -> list[float]:
    attempts = state.step(step).rollback.attempts  # type: ignore[attr-defined]
    starts = [a.started_at for a in attempts]
    return [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]


def test_rollback_retry_gaps_follow_linear_and_exponential_delays(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """Measured gaps between rollback attempts follow d·n (linear) and d·2^(n-1) (exponential)."""
    params = {"fail": {TICKET: "nonretryable"},
              "rollback_fail": {"shop.linear": "times:3", "shop.exponential": "times:3"}}
    state = shop.backoffs.apply_async(saga_id=saga_id, params=params).wait(timeout=60)
    assert state.rollback is not None and state.rollback.outcome == "complete"
    for step, expected in (("shop.linear", [0.3, 0.6, 0.9]),
                           ("shop.exponential", [0.2, 0.4, 0.8])):
        gaps = _gaps(state, step)
        assert len(gaps) == 3
        for gap, want in zip(gaps, expected, strict=True):
            assert want * 0.95 <= gap < want + 1.5, (step, gaps)


def test_non_retryable_error_in_step_skips_its_retries(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """NonRetryableError in a step: one attempt, then the saga fails and rolls back."""
    params = {"fail": {CHARGE: "nonretryable"}}
    state = shop.order.apply_async(saga_id=saga_id, params=params).wait(timeout=30)
    assert len(state.step(CHARGE).attempts) == 1
    assert state.error is not None and state.error.type == "NonRetryableError"
    assert [r["step"] for r in entries(shop, saga_id, "rollback_start")] == [CHARGE, RESERVE]


def test_non_retryable_error_in_rollback_skips_its_retries_and_halts(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """NonRetryableError in a handler: one rollback attempt, outcome failed, earlier not run."""
    params = {"fail": {TICKET: "nonretryable"}, "rollback_fail": {CHARGE: "nonretryable"}}
    state = shop.order.apply_async(saga_id=saga_id, params=params).wait(timeout=30)
    assert state.status == "errored"
    assert state.rollback is not None and state.rollback.outcome == "failed"
    charge = state.step(CHARGE).rollback
    assert charge is not None and len(charge.attempts) == 1 and charge.status == "errored"
    assert state.step(RESERVE).rollback is not None
    assert state.step(RESERVE).rollback.status == "pending"  # type: ignore[union-attr]
    assert not entries(shop, saga_id, "rollback_start", RESERVE)


def test_halt_then_retry_rollback_resumes_with_fresh_budget(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """A halted rollback resumes on retry_rollback(): attempts continue, then it completes."""
    params = {"fail": {TICKET: "nonretryable"}, "rollback_fail": {CHARGE: "times:3"}}
    run = shop.order.apply_async(saga_id=saga_id, params=params)
    state = run.wait(timeout=30)
    assert state.rollback is not None and state.rollback.outcome == "failed"
    assert state.rollback.error is not None and state.rollback.error.step == CHARGE
    resumed = run.retry_rollback()
    assert resumed.status == "rolling_back" and resumed.rollback is not None
    assert resumed.rollback.outcome is None
    state = run.wait(timeout=30)
    assert state.status == "errored"
    assert state.rollback is not None and state.rollback.outcome == "complete"
    charge = state.step(CHARGE).rollback
    assert charge is not None and [a.attempt for a in charge.attempts] == [1, 2, 3, 4]
    assert [r["step"] for r in entries(shop, saga_id, "rollback_done")] == [TICKET, CHARGE,
                                                                            RESERVE]
    started = [e for e in run.events() if e["type"] == "rollback_started"]
    assert [e["resumed"] for e in started] == [False, True]
    with pytest.raises(SagaStateError):
        run.retry_rollback()


def test_continue_mode_compensates_the_rest_after_a_failed_handler(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """on_rollback_error=continue: the reserve rollback still runs after charge's failed."""
    params = {"fail": {TICKET: "nonretryable"}, "rollback_fail": {CHARGE: "always"}}
    state = shop.order_continue.apply_async(saga_id=saga_id, params=params).wait(timeout=30)
    assert state.rollback is not None
    assert (state.rollback.outcome, state.rollback.completed_steps) == ("failed", 2)
    assert [r["step"] for r in entries(shop, saga_id, "rollback_done")] == [TICKET, RESERVE]


def test_parallel_rollback_mode_runs_every_handler(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """rollback_mode=parallel compensates every started step."""
    params = {"fail": {TICKET: "nonretryable"}}
    state = shop.order_parallel_rollback.apply_async(saga_id=saga_id,
                                                     params=params).wait(timeout=30)
    assert state.rollback is not None and state.rollback.outcome == "complete"
    assert sorted(r["step"] for r in entries(shop, saga_id, "rollback_done")) == [
        CHARGE, RESERVE, TICKET]


def test_terminate_with_rollback_lets_running_step_finish_then_compensates(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """terminate(rollback=True) mid-step: the step finishes, both started steps are undone."""
    run = shop.order.apply_async(saga_id=saga_id, params={"fail": {CHARGE: "sleep:1.5"}})
    wait_for(lambda: bool(entries(shop, saga_id, "step_start", CHARGE)))
    assert run.terminate(rollback=True).status == "rolling_back"
    state = run.wait(timeout=30)
    assert state.status == "terminated"
    assert state.error is not None and state.error.type == "Terminated"
    assert state.step(CHARGE).status == "complete"
    assert state.step(TICKET).status == "cancelled"
    rollbacks = entries(shop, saga_id, "rollback_start")
    assert [r["step"] for r in rollbacks] == [CHARGE, RESERVE]
    assert rollbacks[0]["output"] is not None
    assert rollbacks[0]["error"]["type"] == "Terminated"
    with pytest.raises(SagaStateError):
        run.terminate()


def test_same_saga_id_twice_returns_the_existing_run(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """Same id and params: the same run, nothing started twice; other params: a conflict."""
    first = shop.order.apply_async(saga_id=saga_id, params={"n": 1})
    second = shop.order.apply_async(saga_id=saga_id, params={"n": 1})
    assert second.id == first.id == saga_id
    assert first.wait(timeout=30).status == "complete"
    assert len(entries(shop, saga_id, "step_start", RESERVE)) == 1
    assert [e["type"] for e in first.events()].count("saga_queued") == 1
    with pytest.raises(SagaConflictError, match=saga_id):
        shop.order.apply_async(saga_id=saga_id, params={"n": 2})
    assert first.status().params == {"n": 1}


def test_unserializable_output_fails_the_saga_and_rolls_back(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """A non-JSON output fails the saga (no retry) and the step is rolled back with no output."""
    state = shop.order.apply_async(saga_id=saga_id,
                                   params={"fail": {CHARGE: "unserializable"}}).wait(timeout=30)
    assert state.status == "errored"
    assert state.error is not None
    assert state.error.type == "OutputNotSerializableError"
    assert "JSON" in state.error.message
    assert len(state.step(CHARGE).attempts) == 1
    rollbacks = entries(shop, saga_id, "rollback_start")
    assert [r["step"] for r in rollbacks] == [CHARGE, RESERVE]
    assert rollbacks[0]["output"] is None
    assert ledger(shop, saga_id)
