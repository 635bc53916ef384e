"""``saga-celery`` as a real subprocess, against real Redis and a real shop worker."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pytest
from celery import Celery

from saga_celery import SagaApp, SagaState
from saga_celery._engine import utcnow
from tests.integration.harness import REPO_ROOT, WorkerProcess, wait_until, worker_env
from tests.integration.shop_fixtures import entries

pytestmark = pytest.mark.integration

COMMAND_TIMEOUT_S = 60


def saga_celery() -> list[str]:
    """The installed console script, or the module when the venv has none."""
    script = Path(sys.executable).parent / "saga-celery"
    return [str(script)] if script.exists() else [sys.executable, "-m", "saga_celery.cli"]


def store_args(shop: ModuleType) -> list[str]:
    """Options pointing a bare app at the shop's saga store."""
    return ["--redis-url", shop.URL, "--prefix", shop.PREFIX]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*saga_celery(), *args], cwd=REPO_ROOT, env=worker_env(env),
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)


def test_status_json_of_a_finished_saga(shop: ModuleType, shop_worker: WorkerProcess,
                                        saga_id: str) -> None:
    """``saga-celery status ID --json`` prints the finished saga's ``SagaState``."""
    state = shop.order.apply_async(saga_id=saga_id,
                                   params={"fail": {"shop.ticket": "always"}}).wait(timeout=30)

    done = run_cli(*store_args(shop), "status", saga_id, "--json")

    assert done.returncode == 0, done.stderr
    assert SagaState.model_validate_json(done.stdout) == state
    assert state.status == "errored"

    table = run_cli(*store_args(shop), "status", saga_id)
    assert table.returncode == 0, table.stderr
    assert ("rolled back in reverse start order: shop.ticket -> shop.charge -> shop.reserve"
            in table.stdout)


def test_events_follow_ends_when_the_saga_ends(shop: ModuleType, shop_worker: WorkerProcess,
                                               saga_id: str) -> None:
    """``events ID --follow`` prints events as they happen and exits 0 once the saga ended."""
    run = shop.order.apply_async(saga_id=saga_id,
                                 params={"fail": {"shop.charge": "sleep:1.5"}})
    follow = subprocess.Popen([*saga_celery(), *store_args(shop), "events", saga_id, "--follow"],
                              cwd=REPO_ROOT, env=worker_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        out, err = follow.communicate(timeout=COMMAND_TIMEOUT_S)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()

    assert follow.returncode == 0, err
    printed = [json.loads(line) for line in out.splitlines()]
    assert printed == run.events()
    assert printed[-1]["type"] == "saga_completed"


def test_terminate_with_rollback_through_the_users_app(shop: ModuleType,
                                                       shop_worker: WorkerProcess,
                                                       saga_id: str) -> None:
    """``--app tests.integration.shop:sagas terminate ID --rollback`` stops a running saga and
    its worker rolls back what started."""
    run = shop.order.apply_async(saga_id=saga_id, params={"fail": {"shop.charge": "sleep:2"}})
    charging = wait_until(lambda: bool(entries(shop, saga_id, "step_start", "shop.charge")),
                          timeout=20)
    assert charging, "shop.charge never started"

    done = run_cli("--app", "tests.integration.shop:sagas", "terminate", saga_id, "--rollback",
                   env={"SAGA_TEST_REDIS_URL": shop.URL, "SAGA_TEST_PREFIX": shop.PREFIX})

    assert done.returncode == 0, done.stderr
    assert f"saga {saga_id}: terminate requested (with rollback)" in done.stdout
    state = run.wait(timeout=30)
    assert state.status == "terminated"
    assert state.rollback is not None and state.rollback.outcome == "complete"
    assert [s.rollback.status for s in state.steps[:2] if s.rollback] == ["complete", "complete"]


def test_unreachable_redis_is_one_line_and_exit_status_1() -> None:
    """Against a Redis nobody listens on: exit status 1, one line on stderr naming where."""
    done = run_cli("--redis-url", "redis://:hunter2@127.0.0.1:1/3", "list")

    assert done.returncode == 1
    assert done.stderr.startswith("Error: Redis at 127.0.0.1:1/3 cannot be reached")
    assert len(done.stderr.strip().splitlines()) == 1
    assert "hunter2" not in done.stderr


def _left_waiting(redis_url: str, prefix: str, saga_id: str, *, ago: timedelta) -> None:
    """Start a one-step saga ``ago`` in the past whose first message never went out (the
    broker is in memory, gone with this app)."""
    celery = Celery("left-waiting", broker="memory://", set_as_current=False)
    sagas = SagaApp(celery, redis_url=redis_url, prefix=prefix)

    @sagas.step(name="health.reserve")
    def reserve() -> None:
        return None

    sagas._engine.clock = lambda: utcnow() - ago
    sagas.saga("refill", [reserve.s()]).apply_async(saga_id=saga_id)
    celery.close()


def test_health_before_a_sweep_after_one_and_with_a_saga_left_waiting(
        redis_url: str, prefix: str) -> None:
    """``health`` exits 1 saying the sweep never ran before any sweep, 0 after ``recover``,
    and 1 naming the saga once a sweep saw one whose first message never went out 10 minutes
    ago (over the default 5); each time one line."""
    bare = ["--redis-url", redis_url, "--prefix", prefix, "--broker-url", "memory://"]

    never = run_cli(*bare, "health")
    assert run_cli(*bare, "recover").returncode == 0
    ok = run_cli(*bare, "health")
    _left_waiting(redis_url, prefix, "left-1", ago=timedelta(minutes=10))
    assert run_cli(*bare, "recover").stdout == "re-sent 1 message\n"  # lost again: memory://
    late = run_cli(*bare, "health")

    assert (never.returncode, never.stdout) == (1, "")
    assert never.stderr.startswith("unhealthy: the recovery sweep has never run")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: the recovery sweep ran ")
    assert (late.returncode, late.stdout) == (1, "")
    assert late.stderr.startswith("unhealthy: 1 overdue message, the oldest waiting 10m")
    assert "of saga left-1;" in late.stderr
    assert [len(r.stderr.splitlines()) for r in (never, late)] == [1, 1]
    assert len(ok.stdout.splitlines()) == 1
