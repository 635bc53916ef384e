"""A step's next message overtakes the end commit that sent it.

A step publishes its next messages while its end commit's answer is on the way.  When the
broker and the saga store are reached by different routes (other servers, other hosts),
the message can reach a worker before the commit reaches the store.  Here the shop's saga
store sits behind a proxy that holds back every end commit (the requests that release a
lease) for a while, and the broker is the same Redis reached directly.  So each next step's
message reaches the other pool process before the commit that sent it.

- Held back 40 ms: the start reads the saga again until the commit is there, and every
  saga completes with no recovery sweep (none runs in these tests).
- Held back 400 ms, past the start's ~90 ms of reading again: the start drops the message
  as not due, and the recovery sweep sends it again.  Every step still runs once.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from types import ModuleType
from urllib.parse import urlsplit, urlunsplit

import pytest

from saga_celery._engine import BEHIND_PAUSES_S
from tests.integration.harness import WorkerFactory, WorkerProcess
from tests.integration.proxy import TcpProxy
from tests.integration.shop_fixtures import SHOP, entries, import_shop_copy, wait_for

pytestmark = pytest.mark.integration

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


def test_a_start_waits_for_the_commit_its_message_overtook(
        shop: ModuleType, worker: WorkerProcess, proxy: HoldingProxy) -> None:
    proxy.hold_s, proxy.held = 0.04, 0
    try:
        for _ in range(3):  # one at a time: the other pool process is free to take it
            saga_id = _order(shop)
            state = shop.sagas.run(saga_id).wait(timeout=30)
            assert state.status == "complete", (saga_id, state.status)
            _each_step_ran_once(shop, saga_id)
    finally:
        proxy.hold_s = 0.0
    assert proxy.held >= 6  # two step ends per saga sent a next step
    assert "saga.start_waits_for_commit" in worker.log()  # the other process read again
    assert "saga.delivery_skipped" not in worker.log()


def test_a_message_whose_commit_is_later_still_is_sent_again_by_the_sweep(
        shop: ModuleType, worker: WorkerProcess, proxy: HoldingProxy) -> None:
    assert sum(BEHIND_PAUSES_S) < 0.4
    proxy.hold_s, proxy.held = 0.4, 0
    try:
        saga_id = _order(shop)
        run = shop.sagas.run(saga_id)
        resent = 0

        def complete() -> bool:
            nonlocal resent
            if run.status().status == "complete":
                return True
            resent += shop.sagas.recover(grace="0 seconds")
            time.sleep(0.5)
            return False

        wait_for(complete, timeout=60)
    finally:
        proxy.hold_s = 0.0
    assert resent >= 1
    assert "saga.delivery_skipped" in worker.log()  # dropped as not due yet
    _each_step_ran_once(shop, saga_id)
