"""``RedisStore`` on real Redis: no connection outlives the thread that used it.

A thread keeps one connection for the store (``_store/connections.py``); when the
thread ends, that connection goes back to the client's pool, so a thread-per-request web
app or the threads pool's deadline timers reuse connections instead of leaving one open per
thread that ever ran.  Connections are counted the way an operator would, with
``CLIENT LIST``, by the client name each test gives its own client.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Iterator
from uuid import uuid4

import pytest
import redis

from saga_celery._store import RedisStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def named_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client whose connections carry a client name of their own."""
    client = redis.Redis.from_url(redis_url, client_name=f"saga-conn-{uuid4().hex[:8]}")
    yield client
    client.close()


def open_connections(observer: redis.Redis, name: str) -> int:
    """How many connections Redis has open under the client name ``name``."""
    gc.collect()
    return sum(1 for entry in observer.client_list() if entry.get("name") == name)


def in_threads(work: Callable[[], object], count: int) -> None:
    """Run ``work`` in ``count`` threads at once and wait for them all."""
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_short_threads_one_after_another_reuse_one_connection(
    named_client: redis.Redis, redis_client: redis.Redis
) -> None:
    """Fifty threads that each load a saga and end, one after another, leave one connection
    open, not fifty."""
    store = RedisStore(named_client, prefix=f"conn-{uuid4().hex[:8]}:")
    name = named_client.connection_pool.connection_kwargs["client_name"]
    for _ in range(50):
        in_threads(lambda: store.load("nobody"), 1)

    assert open_connections(redis_client, name) <= 2


def test_a_second_wave_of_threads_reuses_the_first_waves_connections(
    named_client: redis.Redis, redis_client: redis.Redis
) -> None:
    """Twenty threads at once, then twenty more once the first ended, open at most twenty
    connections between them."""
    store = RedisStore(named_client, prefix=f"conn-{uuid4().hex[:8]}:")
    name = named_client.connection_pool.connection_kwargs["client_name"]
    started = threading.Barrier(20)

    def load_together() -> None:
        started.wait()
        store.load("nobody")

    in_threads(load_together, 20)
    in_threads(load_together, 20)

    assert open_connections(redis_client, name) <= 20


def test_a_long_lived_thread_keeps_its_one_connection(
    named_client: redis.Redis, redis_client: redis.Redis
) -> None:
    """A thread that keeps working (a prefork child's main thread) uses one connection for
    every command, as before."""
    store = RedisStore(named_client, prefix=f"conn-{uuid4().hex[:8]}:")
    name = named_client.connection_pool.connection_kwargs["client_name"]
    for _ in range(20):
        store.load("nobody")

    assert open_connections(redis_client, name) == 1


def test_a_dropped_store_gives_its_threads_connections_back(
    named_client: redis.Redis, redis_client: redis.Redis
) -> None:
    """A store dropped while its thread's connection is kept hands that connection back to
    the pool, which a new store on the same client then reuses."""
    name = named_client.connection_pool.connection_kwargs["client_name"]
    for _ in range(5):
        RedisStore(named_client, prefix=f"conn-{uuid4().hex[:8]}:").load("nobody")

    assert open_connections(redis_client, name) == 1


def test_a_forked_child_takes_its_own_connection_and_leaves_the_parents_alone(
    named_client: redis.Redis,
) -> None:
    """A child forked while the parent's thread keeps a connection takes a new one, and its
    giving back the inherited one does not break the parent's."""
    store = RedisStore(named_client, prefix=f"conn-{uuid4().hex[:8]}:")
    store.load("nobody")
    pid = os.fork()
    if pid == 0:  # the child: load, drop the store (its finalizers run), exit at once
        code = 0
        try:
            store.load("nobody")
            del store
            gc.collect()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert store.load("nobody") is None
