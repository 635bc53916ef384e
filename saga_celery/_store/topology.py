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

This module tells them apart, describes them for messages, and builds the clients the
worker deployment configures (``SAGA_REDIS_CLUSTER``, ``SAGA_REDIS_SENTINELS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import redis
from redis.cluster import RedisCluster
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from saga_celery._errors import SagaConfigError, SagaStoreUnavailableError

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


def cluster_client(url: str, *, timeout_s: float, retry: Retry) -> RedisCluster:
    """A Redis Cluster client that starts from the node at ``url``.

    redis-py asks that node for the cluster's layout at once, so an unreachable cluster is a
    ``SagaStoreUnavailableError`` here, not later."""
    try:
        return RedisCluster.from_url(url, socket_connect_timeout=timeout_s,
                                     socket_timeout=timeout_s, retry=retry)
    except ValueError as exc:
        raise SagaConfigError(f"Invalid Redis URL for the saga store: {exc}") from exc
    except redis.RedisError as exc:
        raise SagaStoreUnavailableError(
            f"Redis Cluster at {_without_password(url)} cannot be reached ({exc}). Check "
            "SAGA_REDIS_URL (any node of the cluster) and that the cluster is up.") from exc


def sentinel_client(sentinels: Sequence[tuple[str, int]], master: str, url: str, *,
                    timeout_s: float, retry: Retry) -> redis.Redis:
    """A client of the master Sentinel names ``master``.

    ``url`` gives what the master's connections use besides its address: the database, the
    user and password, and TLS (``rediss://``); its host and port are not used.  Nothing
    connects until the first command."""
    try:
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise SagaConfigError(f"Invalid Redis URL for the saga store: {exc}") from exc
    for name in ("host", "port", "path", "connection_class"):
        options.pop(name, None)
    timeouts: dict[str, Any] = {"socket_connect_timeout": timeout_s,
                                "socket_timeout": timeout_s}
    manager = Sentinel(list(sentinels), sentinel_kwargs=timeouts)
    client: redis.Redis = manager.master_for(master, ssl=url.startswith("rediss://"),
                                             retry=retry, **timeouts, **options)
    return client


def parse_sentinels(text: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` as addresses; ``ValueError`` naming a bad one."""
    addresses = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not a host:port sentinel address: {part!r}")
        addresses.append((host.strip("[]"), int(port)))
    if not addresses:
        raise ValueError("no sentinel address given")
    return addresses


def _address(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 26379)}"


def _without_password(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"
