"""A real ``celery worker`` refuses to start when a saga step no longer fits the visibility
timeout its settings put in force after ``SagaApp()`` (SPEC section 1)."""

from __future__ import annotations

import pytest

from tests.integration.harness import WorkerFactory, WorkerStartError

pytestmark = pytest.mark.integration

LATE = "tests.integration.late_settings_app"


def test_worker_refuses_to_start_when_a_step_breaks_a_late_visibility_timeout(
        redis_url: str, worker_factory: WorkerFactory) -> None:
    """The worker exits before consuming, and its log names the step, the timeout and why."""
    with pytest.raises(WorkerStartError, match="exited with status") as info:
        worker_factory(LATE, env={"SAGA_TEST_REDIS_URL": redis_url}, pool="solo",
                       concurrency=1, ready_timeout=30)
    log = str(info.value)
    assert "this worker cannot start" in log
    assert "'late.slow'" in log and "visibility_timeout (30 s)" in log


def test_worker_starts_when_the_late_visibility_timeout_fits(
        redis_url: str, worker_factory: WorkerFactory) -> None:
    """With a visibility timeout the step fits, the same app's worker starts."""
    worker_factory(LATE, env={"SAGA_TEST_REDIS_URL": redis_url,
                              "LATE_VISIBILITY_TIMEOUT_S": "120"},
                   pool="solo", concurrency=1, ready_timeout=30)
