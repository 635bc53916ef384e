"""A step's next message and the end commit that decided it.

A step publishes its next messages once its end commit's answer is in, so a message never
reaches a worker before its commit reaches the store, however the two are routed.  Here the
shop's saga store sits behind a proxy that holds back every end commit (the requests that
release a lease) for 400 ms while the broker is the same Redis reached directly: every saga
still completes, each step once, with no recovery sweep (none runs in these tests).

A message can still arrive ahead of the commit that sent it: one published by a 0.1.0
worker (it published while its commit's answer was on the way), or a commit delayed past
any wait (a NOSCRIPT reload after a Redis restart).  Such a message waits for its commit,
coming back with a growing countdown and using no attempt, and runs once the commit lands.
It used to be dropped after ~90 ms and left to the sweep.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from types import ModuleType
from urllib.parse import urlsplit, urlunsplit

import pytest

from saga_celery._celery.dispatch import build_message
from saga_celery._core.events import AttemptStarted, AttemptSucceeded
from saga_celery._core.machine import apply
from saga_celery._core.model import Kind
from tests.integration.harness import WorkerFactory, WorkerProcess
from tests.integration.proxy import TcpProxy
from tests.integration.shop_fixtures import SHOP, entries, import_shop_copy

pytestmark = [
    pytest.mark.integration,
    # Celery 5.6's Redis result backend retries a connection the proxy cut from a finalizer
    # (AsyncResult.__del__), which pytest reports as an unraisable exception; 5.7 does not.
    # The scenarios' own assertions are unaffected.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

END_COMMIT = b"|release|"
"""In the header argument of a commit that gives a lease back: the end of an attempt."""


class HoldingProxy(TcpProxy):
    """A TCP proxy that holds back each request carrying ``END_COMMIT`` for ``hold_s``."""

    def __init__(self, host: str, port: int) -> None:
        self.hold_s = 0.0
        self.held = 0
        super().__init__(host, port)

    def connected(self, client: socket.socket, server: socket.socket) -> None:
        threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
        threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, requests: bool) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                if requests and self.hold_s and END_COMMIT in data:
                    self.held += 1
                    time.sleep(self.hold_s)
                target.sendall(data)
        for sock in (source, target):
            with suppress(OSError):
                sock.close()


@pytest.fixture(scope="module")
def proxy(redis_url: str) -> Iterator[HoldingProxy]:
    parts = urlsplit(redis_url)
    held = HoldingProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    yield held
    held.close()


@pytest.fixture(scope="module")
def shop_env(redis_url: str, proxy: HoldingProxy) -> dict[str, str]:
    """Saga state through the proxy, the broker direct, queues of this module's own."""
    parts = urlsplit(redis_url)
    behind = urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy.port}"))
    return {"SAGA_TEST_REDIS_URL": behind, "SAGA_TEST_BROKER_URL": redis_url,
            "SAGA_TEST_QUEUE_PREFIX": "overtake."}


@pytest.fixture(scope="module")
def shop(shop_env: dict[str, str]) -> Iterator[ModuleType]:
    module = import_shop_copy(shop_env, "overtaking")
    yield module
    module.app.close()


@pytest.fixture
def worker(worker_factory: WorkerFactory, shop_env: dict[str, str]) -> WorkerProcess:
    return worker_factory(SHOP, env=shop_env, concurrency=2)


def _order(shop: ModuleType) -> str:
    saga_id = f"o-{uuid.uuid4().hex[:12]}"
    shop.order.apply_async(saga_id=saga_id)
    return saga_id


def _each_step_ran_once(shop: ModuleType, saga_id: str) -> None:
    done = [e["step"] for e in entries(shop, saga_id, "step_done")]
    assert sorted(done) == ["shop.charge", "shop.reserve", "shop.ticket"], done


def test_no_message_overtakes_an_end_commit_held_back(
        shop: ModuleType, worker: WorkerProcess, proxy: HoldingProxy) -> None:
    """End commits held back 400 ms: the next step's message goes out after its commit, and
    every saga completes with each step run once and no delivery dropped."""
    proxy.hold_s, proxy.held = 0.4, 0
    try:
        for _ in range(2):
            saga_id = _order(shop)
            state = shop.sagas.run(saga_id).wait(timeout=30)
            assert state.status == "complete", (saga_id, state.status)
            _each_step_ran_once(shop, saga_id)
    finally:
        proxy.hold_s = 0.0
    assert proxy.held >= 4  # two step ends per saga sent a next step
    assert "decision=behind" not in worker.log()
    assert "decision=skip" not in worker.log()


def test_a_message_ahead_of_its_commit_waits_for_it_and_runs_with_no_sweep(
        shop: ModuleType, worker: WorkerProcess) -> None:
    """A next-step message published 2 s before the commit that makes it due (as a 0.1.0
    worker could) comes back until the commit lands, then runs: the saga completes with no
    recovery sweep, each step once."""
    saga_id = f"o-{uuid.uuid4().hex[:12]}"
    engine = shop.sagas._engine
    engine.submit(saga_id=saga_id, name="order", plan=shop.order.plan, params={})
    reserve = AttemptStarted(kind=Kind.STEP, key="shop.reserve#1", attempt=1)
    started = engine.handle(saga_id, reserve)  # the first step "runs" here: version 2
    ended = AttemptSucceeded(kind=Kind.STEP, key="shop.reserve#1", attempt=1,
                             output={"reservation_id": "r-1"})
    ahead = apply(started.run, ended, now=engine.clock())  # what the end commit will decide
    (charge,) = ahead.dispatches
    message = build_message(ahead.run, charge, engine.clock(), after=3)
    shop.app.send_task(message.task, message.args, message.kwargs, task_id=message.task_id)
    time.sleep(2.0)
    assert shop.sagas.run(saga_id).status().step("shop.charge").attempts == []
    shop.ledger.rpush(shop.ledger_key(saga_id), json.dumps(
        {"kind": "step_done", "step": "shop.reserve"}))  # the effect the step would record
    engine.handle(saga_id, ended)  # the commit lands: version 3, charge due
    state = shop.sagas.run(saga_id).wait(timeout=30)
    assert state.status == "complete", state.status
    _each_step_ran_once(shop, saga_id)
    assert "decision=behind" in worker.log()  # it came back while the commit was missing
    assert "decision=skip" not in worker.log()  # and was never dropped
