"""One store contract, run against every ``SagaStore``: memory, fakeredis, real Redis, and
a real 3-master Redis Cluster started for the module (``tests/redis_servers.py``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import fakeredis
import pytest
import redis
from redis.cluster import RedisCluster

from saga_celery._core.model import Backoff, Plan, Policy, SagaRun, StepRun, StepSpec
from saga_celery._store import MemoryStore, RedisStore, SagaStore
from tests.redis_servers import ClusterServers, running

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
EPOCH = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """A monotonic clock the test moves by hand, in seconds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1000


@dataclass
class Backend:
    """A store under test, and what a test needs to reach behind it."""

    kind: str
    store: SagaStore
    elapse_ms: Callable[[float], None]
    """Let that much time pass for leases and retention (a fake clock, or a real sleep)."""
    client: redis.Redis | RedisCluster | None = None
    prefix: str = "saga:"


def _sleep_ms(ms: float) -> None:
    time.sleep(ms / 1000)


def _memory_backend() -> Iterator[Backend]:
    clock = FakeClock()
    yield Backend("memory", MemoryStore(clock=clock), clock.advance_ms)


def _fakeredis_backend() -> Iterator[Backend]:
    client = fakeredis.FakeRedis()
    yield Backend("fakeredis", RedisStore(client), _sleep_ms, client)
    client.close()


def _redis_backend() -> Iterator[Backend]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5.0)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        client.close()
        message = f"Redis at {REDIS_URL} is not reachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    prefix = f"sagatest-{uuid4().hex[:8]}:"
    yield Backend("redis", RedisStore(client, prefix=prefix), _sleep_ms, client, prefix)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def cluster_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServers]:
    """Three Redis Cluster masters on loopback ports, stopped after the module."""
    with running(lambda: ClusterServers(tmp_path_factory.mktemp("cluster"))) as servers:
        yield servers


def _cluster_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    servers: ClusterServers = request.getfixturevalue("cluster_servers")
    client = RedisCluster.from_url(servers.url, socket_timeout=5.0)
    prefix = f"sagatest-{uuid4().hex[:8]}:"
    yield Backend("cluster", RedisStore(client, prefix=prefix), _sleep_ms, client, prefix)
    for key in list(client.scan_iter(match=f"{prefix}*")):
        client.delete(key)
    client.close()


_BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Iterator[Backend]]] = {
    "memory": lambda _: _memory_backend(),
    "fakeredis": lambda _: _fakeredis_backend(),
    "redis": lambda _: _redis_backend(),
    "cluster": _cluster_backend,
}


@pytest.fixture(params=["memory", "fakeredis", "redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    yield from _BACKENDS[request.param](request)


@pytest.fixture(params=["fakeredis", "redis", "cluster"])
def redis_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Only the Redis-backed stores: for what lives in Redis keys (TTLs, types, hash tags)."""
    yield from _BACKENDS[request.param](request)


@pytest.fixture
def cluster_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Only the Redis Cluster store: for what depends on slots and nodes."""
    yield from _cluster_backend(request)


@pytest.fixture(params=["fakeredis", "redis"])
def one_node_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The Redis-backed stores on one server: for what one connection does."""
    yield from _BACKENDS[request.param](request)


@pytest.fixture
def real_redis_backend() -> Iterator[Backend]:
    """Only real Redis: for what fakeredis does not model (sockets, timeouts)."""
    yield from _redis_backend()


@pytest.fixture
def store(backend: Backend) -> SagaStore:
    return backend.store


def make_run(saga_id: str | None = None, *, created: int = 0, **fields: Any) -> SagaRun:
    """A one-step ``SagaRun``, created ``created`` seconds after a fixed epoch."""
    policy = Policy(limit=2, delay_ms=10.0, backoff=Backoff.EXPONENTIAL, timeout_ms=1000.0)
    spec = StepSpec(
        key="reserve#1",
        name="reserve",
        count=1,
        stage=0,
        index=0,
        task="shop.reserve",
        args=[1, "two"],
        kwargs={"sku": "A-1"},
        policy=policy,
        rollback_task="shop.release",
        rollback_policy=policy,
    )
    step = StepRun(key="reserve#1", name="reserve", count=1, stage=0)
    values: dict[str, Any] = {
        "id": saga_id or f"order-{uuid4().hex[:8]}",
        "name": "checkout",
        "params": {"order": 42},
        "created_at": EPOCH + timedelta(seconds=created),
        "plan": Plan(stages=[[spec]]),
        "steps": {"reserve#1": step},
    }
    return SagaRun(**(values | fields))


def make_event(run: SagaRun, kind: str, **fields: Any) -> dict[str, Any]:
    """A lifecycle event dict as the core records it."""
    return {
        "type": kind,
        "saga_id": run.id,
        "event_id": uuid4().hex,
        "timestamp": "2026-06-01T12:00:00+00:00",
        **fields,
    }
