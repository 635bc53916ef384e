"""The three Redis topologies the store runs on, and what differs between them.

``RedisStore`` (``SagaApp(app, redis=client)``) takes any of these redis-py clients:

- a ``redis.Redis`` on one server: each thread keeps one connection (``connections.py``);
- a ``redis.Redis`` from ``Sentinel(...).master_for(name)``: the same, and its connections
  ask the sentinels where the master is each time they connect.  A failover closes them:
  Sentinel kills the clients of a master it demotes, and a write answered ``READONLY``
  closes the connection too (redis-py's ``SentinelManagedConnection``), so the command
  is sent again, as the client's retry policy says, to the new master;
- a ``redis.cluster.RedisCluster``: every command goes through the client, which routes it
  by its key's slot; one saga's keys share one slot (``keys.py``), so each of its scripts
  runs on one node, and the global index sets are written by commands of their own.

This module tells them apart and describes them for messages.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import redis
from redis.cluster import RedisCluster
from redis.sentinel import SentinelConnectionPool

from saga_celery._errors import SagaConfigError

StoreClient: TypeAlias = redis.Redis | RedisCluster
"""A client the store runs on: one Redis, a Sentinel master client, or a Redis Cluster."""


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


def check_client(client: object) -> StoreClient:
    """``client`` if the store can run on it, else ``SagaConfigError`` saying what can."""
    if isinstance(client, redis.Redis | RedisCluster):
        return client
    raise SagaConfigError(
        f"SagaApp(redis=...) takes a redis.Redis, a Sentinel master client "
        f"(Sentinel(...).master_for(name)) or a redis.cluster.RedisCluster, not "
        f"{type(client).__module__}.{type(client).__qualname__}")


def describe(client: StoreClient) -> str:
    """Where the client connects, for messages; never a password."""
    if isinstance(client, RedisCluster):
        primaries: list[Any] = client.get_primaries()  # type: ignore[no-untyped-call]
        nodes = sorted(node.name for node in primaries)
        return f"Redis Cluster {','.join(nodes)}"
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    db = kwargs.get("db", 0)
    if isinstance(pool, SentinelConnectionPool):
        sentinels = ",".join(_address(s) for s in pool.sentinel_manager.sentinels)
        return f"Sentinel master {pool.service_name!r} (sentinels {sentinels}) db {db}"
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={db}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"


def socket_timeout_of(client: StoreClient) -> float | None:
    """The client's socket timeout in seconds (None: it waits for ever)."""
    if isinstance(client, RedisCluster):
        kwargs: dict[str, Any] = client.get_connection_kwargs()  # type: ignore[no-untyped-call]
    else:
        kwargs = client.connection_pool.connection_kwargs
    timeout: float | None = kwargs.get("socket_timeout")
    return timeout


def _address(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 26379)}"
