"""A saga task acknowledges its own message on kombu's Redis transport (``_celery/acks.py``).

Saga tasks are ``acks_late``.  One that returns normally sends its ack from the process that
ran it, once the messages it publishes are out, so the worker's main process only forgets
the message in memory; a task that raises or retries leaves its ack to the main process, as
Celery does it, and so does every task when the fast path is off (``kombu.own_ack`` of
``saga_celery._internals.kombu``).  Either way every delivered message is acknowledged
exactly once.  How the ack follows the task's messages: ``test_dispatch.py``.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from celery import Celery

from saga_celery._celery.acks import acks_in_task, late_ack
from saga_celery._celery.dispatch import Dispatcher
from saga_celery._internals import FAST_PATHS_ENV
from tests.integration.harness import WorkerFactory, import_copy
from tests.integration.shop_fixtures import SHOP
from workers.processes import free_port

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 29, tzinfo=UTC)


def test_only_kombus_redis_transport_on_one_broker_lets_tasks_ack(redis_url: str) -> None:
    """The ack must reach the Redis the message came from, in kombu's Redis layout."""
    same = Celery("acks-same", broker=redis_url, set_as_current=False)
    split = Celery("acks-split", broker=redis_url, set_as_current=False)
    split.conf.broker_read_url = redis_url.rsplit("/", 1)[0] + "/15"
    memory = Celery("acks-memory", broker="memory://", set_as_current=False)

    assert acks_in_task(same)
    assert not acks_in_task(split)
    assert not acks_in_task(memory)
    assert Dispatcher(memory, clock=lambda: NOW).late_ack(
        SimpleNamespace(properties={"delivery_tag": "tag-4"})) is None


def test_a_call_without_a_delivery_tag_owes_no_ack() -> None:
    """An eager or direct call has no message to acknowledge."""
    assert late_ack(SimpleNamespace(properties={})) is None
    assert late_ack(SimpleNamespace()) is None
    owed = late_ack(SimpleNamespace(properties={"delivery_tag": "tag-5"}))
    assert owed is not None and (owed.tag, owed.pending) == ("tag-5", True)


# --- in a real worker ---------------------------------------------------------------------


def _unacked(client: redis.Redis) -> tuple[int, int]:
    return int(client.hlen("unacked")), int(client.zcard("unacked_index"))


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own, so that MONITOR sees only this test's traffic."""
    port = free_port(6800)
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        server.terminate()
        server.wait(10)


@dataclass
class Acks:
    """What MONITOR showed of kombu's bookkeeping, by delivery tag."""

    delivered: list[str] = field(default_factory=list)
    in_transaction: list[str] = field(default_factory=list)
    """Acked the way the worker's main process acks: inside MULTI/EXEC."""
    bare: list[str] = field(default_factory=list)
    """Acked the way a saga task acks itself: in a plain pipeline."""


@contextlib.contextmanager
def monitored(url: str) -> Iterator[Acks]:
    acks = Acks()
    stop = threading.Event()
    client = redis.Redis.from_url(url)

    def watch() -> None:
        open_multi: set[str] = set()
        with client.monitor() as monitor:
            while not stop.is_set():
                seen = monitor.next_command()
                who = f"{seen['client_address']}:{seen['client_port']}"
                words = seen["command"].split()
                name = words[0].upper()
                if name == "MULTI":
                    open_multi.add(who)
                elif name in ("EXEC", "DISCARD"):
                    open_multi.discard(who)
                elif name == "HSET" and words[1] == "unacked":
                    acks.delivered.append(words[2])
                elif name == "ZREM" and words[1] == "unacked_index":
                    (acks.in_transaction if who in open_multi else acks.bare).append(words[2])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.3)  # MONITOR is on
    try:
        yield acks
    finally:
        time.sleep(0.3)  # the last commands reach the monitor
        stop.set()
        with redis.Redis.from_url(url) as waker:
            waker.ping()  # one more line for the monitor, which then sees ``stop``
        watcher.join(5)
        client.close()


@pytest.mark.parametrize("fast_paths", ["on", "off"])
def test_saga_tasks_ack_their_own_messages_and_the_main_process_acks_what_raised(
        private_redis: str, worker_factory: WorkerFactory, fast_paths: str) -> None:
    """In a real prefork worker: each delivered message is acked once; the ones whose task
    raised (a retry, a failure) by the main process, all the others by their task, or, with
    the fast paths off (``SAGA_CELERY_FAST_PATHS=off``), every one by the main process."""
    env = {"SAGA_TEST_REDIS_URL": private_redis, FAST_PATHS_ENV: fast_paths}
    shop = import_copy(str(Path(__file__).with_name("shop.py")), f"shop_acks_{fast_paths}", env)
    worker_factory(SHOP, env=env, concurrency=2)
    probe = redis.Redis.from_url(private_redis)

    with monitored(private_redis) as acks:
        ok = shop.order.apply_async(saga_id=f"ok-{uuid.uuid4().hex[:8]}",
                                    params={"fail": {"shop.charge": "times:1"}})
        bad = shop.order.apply_async(saga_id=f"bad-{uuid.uuid4().hex[:8]}",
                                     params={"fail": {"shop.ticket": "nonretryable"}})
        assert ok.wait(timeout=30).status == "complete"
        failed = bad.wait(timeout=30)
        assert failed.status == "errored"
        deadline = time.monotonic() + 10
        while _unacked(probe) != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
    probe.close()

    assert _unacked(redis.Redis.from_url(private_redis)) == (0, 0)
    acked = acks.in_transaction + acks.bare
    assert sorted(acked) == sorted(set(acks.delivered))  # each one, once
    assert failed.rollback is not None and failed.rollback.outcome == "complete"
    # ok: reserve, charge twice, ticket; bad: reserve, charge, ticket, and the rollbacks
    assert len(acks.delivered) >= 9
    if fast_paths == "off":
        assert acks.bare == []
        return
    # raised: charge's first attempt (a retry) and ticket's only attempt (a failure)
    assert len(acks.in_transaction) == 2
    assert len(acks.bare) == len(acks.delivered) - 2
