"""Hold and redrive on real prefork workers and real Redis (SPEC section 8)."""

from __future__ import annotations

import uuid
from types import ModuleType

import pytest
import redis

from saga_celery import SagaHandle
from tests.integration.harness import WorkerFactory, wait_until
from tests.integration.waiting_fixtures import env, ledger, start, timers, waiting

pytestmark = pytest.mark.integration

__all__ = ["env", "waiting"]  # fixtures


def _held(waiting: ModuleType, definition: str) -> tuple[str, SagaHandle]:
    saga_id = f"t-{uuid.uuid4().hex[:10]}"
    handle = getattr(waiting, definition).apply_async(saga_id=saga_id)
    assert wait_until(lambda: handle.status().status == "held", timeout=40)
    return saga_id, handle


def _kinds(waiting: ModuleType, saga_id: str) -> list[str]:
    return [e["kind"] for e in ledger(waiting, saga_id)]


def test_a_held_saga_redriven_after_a_fixed_deploy_completes_without_rerunning_steps(
        waiting: ModuleType, worker_factory: WorkerFactory, env: dict[str, str],
        prefix: str) -> None:
    """The step fails for good: held, nothing undone.  The worker is replaced by one with
    the fix; ``redrive()`` runs the step as registered now (attempt 3, a fresh budget) and
    the saga completes; the booked step ran once."""
    broken = start(worker_factory, env, prefix)
    saga_id, handle = _held(waiting, "held")
    state = handle.status()
    assert state.error is not None and state.error.type == "RuntimeError"
    assert "unbook" not in _kinds(waiting, saga_id)
    broken.stop()
    start(worker_factory, {**env, "WAITING_FIXED": "1"}, prefix)
    assert handle.redrive().status == "running"
    final = handle.wait(timeout=40)
    assert (final.status, final.output) == ("complete", "fixed")
    assert [a.attempt for a in final.step("waiting.fixable").attempts] == [1, 2, 3]
    assert _kinds(waiting, saga_id) == ["book", "fixable", "fixable", "fixable", "ship"]
    assert [e["type"] for e in handle.events()].count("saga_redriven") == 1


def test_rollback_of_a_held_saga_undoes_what_ran(
        waiting: ModuleType, worker_factory: WorkerFactory, env: dict[str, str],
        prefix: str) -> None:
    """``rollback()`` of a held saga compensates the booked step and ends ``errored``."""
    start(worker_factory, env, prefix)
    saga_id, handle = _held(waiting, "held")
    handle.rollback()
    final = handle.wait(timeout=40)
    assert final.status == "errored"
    assert _kinds(waiting, saga_id)[-1] == "unbook"


def test_a_hold_that_times_out_rolls_back_by_itself(
        waiting: ModuleType, worker_factory: WorkerFactory, env: dict[str, str],
        prefix: str, redis_client: redis.Redis) -> None:
    """Neither redrive nor rollback within ``hold_timeout`` (6 s): the rollback starts on
    its own, and no timer is left over."""
    start(worker_factory, env, prefix)
    saga_id, handle = _held(waiting, "held_briefly")
    final = handle.wait(timeout=40)
    assert final.status == "errored"
    assert _kinds(waiting, saga_id)[-1] == "unbook"
    assert timers(redis_client, prefix) == 0


def test_terminate_of_a_held_saga(
        waiting: ModuleType, worker_factory: WorkerFactory, env: dict[str, str],
        prefix: str) -> None:
    """``terminate(rollback=True)`` works on a held saga as on a running one."""
    start(worker_factory, env, prefix)
    saga_id, handle = _held(waiting, "held")
    handle.terminate(rollback=True)
    final = handle.wait(timeout=40)
    assert final.status == "terminated"
    assert _kinds(waiting, saga_id)[-1] == "unbook"
