"""Recovery: a saga whose next message the broker lost is found and sent again (SPEC section 1).

The broker is the test Redis, so "the broker lost it" is done by hand: the message is removed
from the ``saga.steps`` list before any worker takes it, or from kombu's ``unacked`` hash after
the worker that took it was SIGKILLed.  Every step body writes to the ledger, which shows
that nothing that ran is run again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from tests.integration.harness import REPO_ROOT, WorkerFactory, WorkerProcess, worker_env
from tests.integration.shop_fixtures import SHOP, entries, wait_for

pytestmark = pytest.mark.integration

RESERVE, CHARGE, TICKET = "shop.reserve", "shop.charge", "shop.ticket"
STEPS = ("shop.reserve", "shop.charge", "shop.ticket")


@pytest.fixture(autouse=True)
def _redis_broker(shop: ModuleType) -> None:
    """These tests lose messages by editing the Redis broker's keys: Redis only."""
    if not shop.BROKER_URL.startswith("redis"):
        pytest.skip(f"the broker is {shop.BROKER_URL.split('://')[0]}, not Redis")


@pytest.fixture
def recovery_env(shop_env: dict[str, str]) -> dict[str, str]:
    """Workers (and beat) that sweep every second and treat a second's delay as lost."""
    return {**shop_env, "SAGA_TEST_RECOVERY_INTERVAL": "1 second",
            "SAGA_TEST_RECOVERY_GRACE": "1 second"}


def _decode(raw: str | bytes) -> Any:
    return json.loads(raw)


def _is_for(message: dict[str, Any], saga_id: str, task: str) -> bool:
    headers = message.get("headers") or {}
    return headers.get("task") == task and f"'saga_id': '{saga_id}'" in str(
        headers.get("kwargsrepr"))


def _remove_queued(client: redis.Redis, queue: str, saga_id: str, task: str) -> int:
    """Take ``task``'s waiting message for ``saga_id`` out of ``queue``: the broker lost it."""
    removed = 0
    for raw in client.lrange(queue, 0, -1):
        if _is_for(_decode(raw), saga_id, task):
            removed += int(client.lrem(queue, 1, raw))
    return removed


def _remove_unacked(client: redis.Redis, saga_id: str, task: str) -> int:
    """Drop a delivered, unacknowledged message, so kombu never restores it to its queue."""
    removed = 0
    for tag, raw in client.hgetall("unacked").items():
        message = _decode(raw)[0]  # kombu stores [message, exchange, routing_key]
        if _is_for(message, saga_id, task):
            client.zrem("unacked_index", tag)
            removed += int(client.hdel("unacked", tag))
    return removed


def _recover(shop: ModuleType, saga_id: str, **grace: Any) -> list[str]:
    """One sweep in this process; the messages it re-sent for ``saga_id``."""
    with capture_logs() as logs:
        shop.sagas.recover(**grace)
    return [m for line in logs if line["event"] == "saga.recovered"
            and line["saga_id"] == saga_id for m in line["messages"]]


def _starts(shop: ModuleType, saga_id: str, step: str) -> list[int]:
    return [e["attempt"] for e in entries(shop, saga_id, "step_start", step)]


@contextmanager
def _beat(env: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    """A real ``celery beat`` on the shop app; yields its log file."""
    log_path = tmp_path / "beat.log"
    command = [sys.executable, "-m", "celery", "-A", SHOP, "beat", "--loglevel", "INFO",
               "-s", str(tmp_path / "beat-schedule"), "--pidfile", str(tmp_path / "beat.pid")]
    with log_path.open("wb") as log_file:
        beat = subprocess.Popen(command, cwd=REPO_ROOT, env=worker_env(env),
                                stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, process_group=0)
    try:
        yield log_path
    finally:
        beat.terminate()
        try:
            beat.wait(10)
        except subprocess.TimeoutExpired:
            beat.kill()
            beat.wait(10)


def _lose_next_stage_message(shop: ModuleType, worker: WorkerProcess, client: redis.Redis,
                             saga_id: str) -> Any:
    """Run ``order`` until charge's message is queued, then remove it; return the run."""
    run = shop.order.apply_async(saga_id=saga_id, params={"fail": {RESERVE: "sleep:2"}})
    wait_for(lambda: bool(_starts(shop, saga_id, RESERVE)))
    control, queue = shop.app.control, shop.sagas.router.steps_queue
    assert control.cancel_consumer(queue, destination=[worker.hostname], reply=True, timeout=5)
    removed = 0

    def lost() -> bool:
        nonlocal removed
        removed += _remove_queued(client, queue, saga_id, CHARGE)
        return removed > 0

    wait_for(lost)
    assert removed == 1
    assert control.add_consumer(queue, destination=[worker.hostname], reply=True, timeout=5)
    return run


@pytest.mark.parametrize("trigger", ["sweep", "beat"])
def test_lost_next_stage_message_is_resent_and_no_step_runs_twice(
        shop: ModuleType, worker_factory: WorkerFactory, recovery_env: dict[str, str],
        redis_client: redis.Redis, saga_id: str, tmp_path: Path, trigger: str) -> None:
    """A lost next-stage message leaves the saga stuck until recovery re-sends it, once."""
    worker = worker_factory(SHOP, env=recovery_env, concurrency=1)
    run = _lose_next_stage_message(shop, worker, redis_client, saga_id)
    assert _recover(shop, saga_id) == []  # default grace, 60 s: not late enough to be lost
    time.sleep(1.5)
    stuck = run.status()
    assert (stuck.status, stuck.step(RESERVE).status) == ("running", "complete")
    assert stuck.step(CHARGE).status == "pending" and not _starts(shop, saga_id, CHARGE)
    if trigger == "sweep":
        assert _recover(shop, saga_id, grace=0) == ["step:shop.charge#1:1"]
        state = run.wait(timeout=30)
    else:
        with _beat(recovery_env, tmp_path) as beat_log:
            state = run.wait(timeout=30)
        assert "Sending due task saga_celery.recover" in beat_log.read_text()
        recovered = [line for line in worker.log().splitlines() if "saga.recovered" in line]
        assert any(f"saga_id={saga_id}" in line for line in recovered)
        swept = shop.sagas._store.last_sweep()  # for saga-celery health: beat's interval
        assert swept is not None and swept.interval_ms == 1000
    assert state.status == "complete"
    assert state.output == {"ticket": "t-1"}
    for step in STEPS:
        assert _starts(shop, saga_id, step) == [1], step
        assert [a.attempt for a in state.step(step).attempts] == [1]
    assert len(entries(shop, saga_id, "step_done")) == 3


def test_lapsed_lease_of_a_killed_worker_with_a_lost_message_reruns_the_same_attempt(
        shop: ModuleType, worker_factory: WorkerFactory, shop_env: dict[str, str],
        redis_client: redis.Redis, saga_id: str) -> None:
    """A SIGKILLed worker's lost attempt is re-sent once its lease lapses, same attempt number."""
    first = worker_factory(SHOP, env=shop_env)
    run = shop.order.apply_async(saga_id=saga_id, params={"fail": {CHARGE: "sleep:2"}})
    wait_for(lambda: bool(_starts(shop, saga_id, CHARGE)))
    first.kill()
    assert _remove_unacked(redis_client, saga_id, CHARGE) == 1
    assert _recover(shop, saga_id, grace=0) == []  # the dead worker's lease is still live
    worker_factory(SHOP, env=shop_env)
    assert _starts(shop, saga_id, CHARGE) == [1]
    assert run.status().step(CHARGE).status == "running"
    resent: list[str] = []
    deadline = time.monotonic() + 15
    while not resent and time.monotonic() < deadline:  # the lease lapses within 3 s
        time.sleep(0.5)
        resent = _recover(shop, saga_id, grace=0)
    assert resent == ["step:shop.charge#1:1"]
    state = run.wait(timeout=30)
    assert state.status == "complete"
    assert _starts(shop, saga_id, CHARGE) == [1, 1]
    assert [a.attempt for a in state.step(CHARGE).attempts] == [1]
    assert len(entries(shop, saga_id, "step_done", CHARGE)) == 1
    assert _starts(shop, saga_id, TICKET) == [1]
    assert _starts(shop, saga_id, RESERVE) == [1]
    started = [e for e in run.events() if e["type"] == "step_started"]
    assert [e["step"] for e in started] == [RESERVE, CHARGE, TICKET]

