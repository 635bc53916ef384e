"""Per-attempt timeouts on every pool (SPEC section 1): solo, threads, prefork.

On solo and threads Celery's soft and hard time limits do nothing, so the library enforces
the timeout itself; a step that overstays it fails as a timed-out attempt.  A body that
swallows the timeout and returns late is still a timed-out attempt, on every pool.

On threads a body stuck in one blocking call cannot be stopped: its attempt is recorded as
timed out at the deadline, but the step's compensation waits until the body has returned
(its lease stays held), so an effect it makes late is never left behind.
"""

from __future__ import annotations

import importlib
import os
import uuid
from types import ModuleType

import pytest

from tests.integration.harness import WorkerFactory

pytestmark = pytest.mark.integration

POOLS = "tests.integration.pools_app"
STALL_S = 10
"""How long the stalling step would run if nothing stopped it."""
ENDED_WITHIN_S = 8
"""The saga must have ended well before the stall would have."""


@pytest.fixture(scope="module")
def pools_env(redis_url: str) -> dict[str, str]:
    return {"SAGA_TEST_REDIS_URL": redis_url}


@pytest.fixture(scope="module")
def pools(pools_env: dict[str, str]) -> ModuleType:
    """The pools app module, imported in this process with the workers' settings."""
    os.environ.update(pools_env)
    return importlib.import_module(POOLS)


@pytest.fixture
def saga_id() -> str:
    return f"pools-{uuid.uuid4().hex[:12]}"


def assert_timed_out_and_rolled_back(pools: ModuleType, saga_id: str, mode: str) -> None:
    run = pools.reserve_then_stall.apply_async(saga_id=saga_id, params={"stall": mode})
    state = run.wait(timeout=STALL_S * 3)

    assert state.status == "errored"
    (attempt,) = state.step("pools.stall").attempts
    assert attempt.error is not None and attempt.error.type == "TimeoutError"
    assert state.error is not None and (state.error.type, state.error.step) == (
        "TimeoutError", "pools.stall")
    assert state.rollback is not None
    assert (state.rollback.outcome, state.rollback.completed_steps) == ("complete", 2)
    done = [(e["step"], e.get("output")) for e in pools.entries(saga_id)
            if e["kind"] == "rollback_done"]
    assert done == [("pools.stall", None), ("pools.reserve", {"reservation": "sku-1"})]
    assert state.ended_at is not None
    took = (state.ended_at - state.created_at).total_seconds()
    assert took < ENDED_WITHIN_S, f"the saga took {took:.1f} s to end"
    assert attempt.ended_at is not None
    assert (attempt.ended_at - attempt.started_at).total_seconds() < pools.TIMEOUT_S + 2


LOOP = f"loop:{STALL_S}"
"""A body that keeps running Python code (short sleeps in a loop)."""
SLEEP = f"sleep:{STALL_S}"
"""A body blocked in one call, as on a slow network request."""


@pytest.mark.parametrize("mode", [LOOP, SLEEP])
def test_solo_pool_enforces_the_step_timeout(pools: ModuleType, pools_env: dict[str, str],
                                             worker_factory: WorkerFactory, saga_id: str,
                                             mode: str) -> None:
    """On the solo pool a step past its 1 s timeout fails with TimeoutError and the saga rolls
    back long before the body would have finished."""
    worker_factory(POOLS, env=pools_env, pool="solo", concurrency=1)
    assert_timed_out_and_rolled_back(pools, saga_id, mode)


def test_threads_pool_enforces_the_step_timeout(pools: ModuleType, pools_env: dict[str, str],
                                                worker_factory: WorkerFactory,
                                                saga_id: str) -> None:
    """On the threads pool a step running Python past its 1 s timeout is stopped there: it
    fails with TimeoutError and the saga rolls back long before the body would have ended."""
    worker_factory(POOLS, env=pools_env, pool="threads", concurrency=2)
    assert_timed_out_and_rolled_back(pools, saga_id, LOOP)


def test_threads_pool_compensates_a_blocked_body_only_after_it_returns(
        pools: ModuleType, pools_env: dict[str, str], worker_factory: WorkerFactory,
        saga_id: str) -> None:
    """A body blocked in one call on the threads pool cannot be interrupted: its attempt is
    a timed-out one at 1 s, but its handler runs only once the body has returned from that
    call, never beside it."""
    worker_factory(POOLS, env=pools_env, pool="threads", concurrency=2)
    blocked_s = 4
    run = pools.reserve_then_stall.apply_async(saga_id=saga_id,
                                               params={"stall": f"sleep:{blocked_s}"})
    state = run.wait(timeout=40)
    assert state.status == "errored"
    (attempt,) = state.step("pools.stall").attempts
    assert attempt.error is not None and attempt.error.type == "TimeoutError"
    assert attempt.ended_at is not None
    assert (attempt.ended_at - attempt.started_at).total_seconds() < pools.TIMEOUT_S + 2
    ledger = pools.entries(saga_id)
    began = [e["t"] for e in ledger if e["kind"] == "step_start" and e["step"] == "pools.stall"]
    undone = [e["t"] for e in ledger
              if e["kind"] == "rollback_done" and e["step"] == "pools.stall"]
    assert began and undone, ledger
    assert undone[0] >= began[0] + blocked_s, "the handler ran while the body was blocked"
    assert state.rollback is not None and state.rollback.outcome == "complete"


@pytest.mark.parametrize("pool", ["solo", "threads", "prefork"])
def test_a_body_that_swallows_its_timeout_is_a_timed_out_attempt(
        pools: ModuleType, pools_env: dict[str, str], worker_factory: WorkerFactory,
        saga_id: str, pool: str) -> None:
    """``except Exception`` around the work swallows the timeout and the body returns late:
    the attempt is recorded as failed with TimeoutError, not as a success, on every pool."""
    worker_factory(POOLS, env=pools_env, pool=pool, concurrency=1)
    state = pools.reserve_then_swallow.apply_async(saga_id=saga_id).wait(timeout=30)
    assert state.status == "errored", state.status
    (attempt,) = state.step("pools.swallow").attempts
    assert attempt.error is not None and attempt.error.type == "TimeoutError"
    assert state.rollback is not None and state.rollback.outcome == "complete"


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_step_within_its_timeout_completes(pools: ModuleType, pools_env: dict[str, str],
                                           worker_factory: WorkerFactory, saga_id: str,
                                           pool: str) -> None:
    """A step that ends inside its timeout is not disturbed: the saga completes and nothing
    is rolled back."""
    worker_factory(POOLS, env=pools_env, pool=pool, concurrency=2 if pool == "threads" else 1)
    state = pools.reserve_then_stall.apply_async(
        saga_id=saga_id, params={"stall": "loop:0.3"}).wait(timeout=30)
    assert (state.status, state.output) == ("complete", "stalled")
    assert state.rollback is None
    assert [e["kind"] for e in pools.entries(saga_id)] == ["step_done", "step_start",
                                                           "step_done"]
