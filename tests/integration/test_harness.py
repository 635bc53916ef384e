"""The integration harness itself: real worker subprocesses against the real Redis."""

from __future__ import annotations

import uuid

import pytest
import redis

from tests.integration.harness import WorkerFactory, celery_client, is_alive, wait_until

pytestmark = pytest.mark.integration

APP = "tests.integration.plain_app"


def test_worker_subprocess_runs_a_task_in_a_pool_process(
    redis_url: str, redis_client: redis.Redis, worker_factory: WorkerFactory
) -> None:
    """A started worker consumes a task sent through Redis and runs it in a prefork child."""
    worker = worker_factory(APP, env={"SAGA_TEST_REDIS_URL": redis_url})
    key = f"harness:{uuid.uuid4().hex}"

    with celery_client(redis_url) as client:
        result = client.send_task("plain_app.add", args=(2, 3), kwargs={"record_key": key})
        assert result.get(timeout=30) == 5
        del result  # unsubscribed while the client is open (``celery_client``)

    record = redis_client.hgetall(key)
    assert record["result"] == "5"
    assert record["runs"] == "1"
    assert int(record["pid"]) in worker.child_pids()
    assert f"{worker.hostname} ready." in worker.log()


def test_kill_child_is_replaced_by_a_new_pool_process(
    redis_url: str, worker_factory: WorkerFactory
) -> None:
    """kill_child() SIGKILLs one pool process and the worker forks a new one in its place."""
    worker = worker_factory(APP, env={"SAGA_TEST_REDIS_URL": redis_url}, concurrency=2)
    before = worker.wait_for_children(2)

    killed = worker.kill_child()

    assert killed in before
    after = worker.wait_for_children(2, exclude=[killed])
    assert set(after) - set(before), f"no new pool process: before={before} after={after}"
    assert wait_until(lambda: not is_alive(killed), timeout=5)
    assert worker.returncode is None


def test_kill_leaves_no_worker_process_behind(
    redis_url: str, worker_factory: WorkerFactory
) -> None:
    """kill() SIGKILLs the main process and every pool process of the worker's group."""
    worker = worker_factory(APP, env={"SAGA_TEST_REDIS_URL": redis_url})
    pids = [worker.pid, *worker.wait_for_children(2)]

    worker.kill()

    assert worker.returncode is not None
    assert not [pid for pid in pids if is_alive(pid)]
    assert worker.group_pids() == []


def test_stop_shuts_the_worker_down_warmly(redis_url: str, worker_factory: WorkerFactory) -> None:
    """stop() ends the worker through SIGTERM (Celery's warm shutdown) with exit status 0."""
    worker = worker_factory(APP, env={"SAGA_TEST_REDIS_URL": redis_url})

    worker.stop()

    assert worker.returncode == 0
    assert worker.group_pids() == []
