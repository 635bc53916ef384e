"""Timeouts and dying workers on real prefork workers (SPEC section 1)."""

from __future__ import annotations

from types import ModuleType

import pytest

from saga_celery._celery.routing import restore_options_read
from tests.integration.harness import WorkerFactory, WorkerProcess
from tests.integration.shop_fixtures import SHOP, entries, wait_for

pytestmark = pytest.mark.integration

CHARGE, TICKET = "shop.charge", "shop.ticket"
RESTORED_WITHIN_S = 90.0 if restore_options_read() else 90.0 + 110.0
"""How long a killed worker's message may take to come back: the shop's visibility timeout
plus seconds; before kombu 5.7, plus its fixed restore period (a scan every 100 s)."""


def test_soft_time_limit_fails_the_attempt_as_a_timeout(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """A step past its timeout fails with TimeoutError (Celery's soft limit) and rolls back."""
    params = {"fail": {"shop.slow": "sleep:5"}}
    state = shop.with_slow.apply_async(saga_id=saga_id, params=params).wait(timeout=30)
    assert state.status == "errored"
    attempt = state.step("shop.slow").attempts[0]
    assert attempt.error is not None and attempt.error.type == "TimeoutError"
    assert attempt.ended_at is not None
    assert (attempt.ended_at - attempt.started_at).total_seconds() < 3
    assert [r["step"] for r in entries(shop, saga_id, "rollback_start")] == [
        "shop.slow", "shop.reserve"]


def test_hard_time_limit_is_recorded_for_the_killed_pool_process(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """A body that ignores the soft limit is killed at the hard one; the parent records it."""
    params = {"fail": {"shop.slow": "hang:10"}}
    state = shop.with_slow.apply_async(saga_id=saga_id, params=params).wait(timeout=40)
    assert state.status == "errored"
    attempt = state.step("shop.slow").attempts[0]
    assert attempt.error is not None and attempt.error.type == "TimeoutError"
    assert "hard time limit" in attempt.error.message
    assert state.step("shop.slow").rollback is not None
    assert [r["step"] for r in entries(shop, saga_id, "rollback_done")] == [
        "shop.slow", "shop.reserve"]


def test_killed_pool_process_is_redelivered_and_next_step_runs_once(
        shop: ModuleType, shop_worker: WorkerProcess, saga_id: str) -> None:
    """SIGKILL of the pool process mid-step: same attempt runs again, the saga completes."""
    params = {"fail": {CHARGE: "kill:1"}}
    state = shop.order.apply_async(saga_id=saga_id, params=params).wait(timeout=60)
    assert state.status == "complete"
    charge = state.step(CHARGE)
    assert [a.attempt for a in charge.attempts] == [1]
    starts = entries(shop, saga_id, "step_start", CHARGE)
    assert [s["attempt"] for s in starts] == [1, 1]
    assert len(entries(shop, saga_id, "step_start", TICKET)) == 1
    events = shop.sagas.run(saga_id).events()
    assert sum(1 for e in events if e["type"] == "step_started" and e["step"] == CHARGE) == 1


@pytest.mark.timeout(RESTORED_WITHIN_S + 60)
def test_whole_worker_killed_mid_step_and_a_new_worker_finishes(
        shop: ModuleType, worker_factory: WorkerFactory, shop_env: dict[str, str],
        saga_id: str) -> None:
    """SIGKILL of the whole worker mid-step: a new worker gets the message back and finishes."""
    first = worker_factory(SHOP, env=shop_env)
    run = shop.order.apply_async(saga_id=saga_id, params={"fail": {CHARGE: "sleep:2"}})
    wait_for(lambda: bool(entries(shop, saga_id, "step_start", CHARGE)))
    first.kill()
    worker_factory(SHOP, env=shop_env)
    state = run.wait(timeout=RESTORED_WITHIN_S)
    assert state.status == "complete"
    assert [a.attempt for a in state.step(CHARGE).attempts] == [1]
    assert len(entries(shop, saga_id, "step_start", TICKET)) == 1
    assert len(entries(shop, saga_id, "step_done", TICKET)) == 1
