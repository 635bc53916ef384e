"""Where the deployment keeps saga state: one Redis, a Redis Cluster, or behind Sentinel.

``state_options(settings)`` gives ``SagaApp`` its ``redis_url=`` (one Redis, the default) or
its ``redis=`` client, built here with redis-py's own API as a user would build it:

- ``SAGA_REDIS_CLUSTER=true``: a ``RedisCluster`` that starts from the node at
  ``SAGA_REDIS_URL``.  It asks that node for the cluster's layout at once, so a cluster
  that cannot be reached stops the process when ``workers.app`` is imported;
- ``SAGA_REDIS_SENTINELS`` and ``SAGA_REDIS_SENTINEL_MASTER``: the master's client, which
  asks the sentinels where the master is whenever it connects.  ``SAGA_REDIS_URL`` gives the
  database, user, password and TLS of the master's connections, not their address.

Either way a command whose connection broke (a failover closes them) is sent again, a few
times with a short backoff, as ``RedisStore.from_url`` does for one Redis.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.connection import parse_url
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from saga_celery import SagaStoreUnavailableError
from workers.settings import WorkerSettings

TIMEOUT_S = 5.0
"""Socket timeouts of the saga state's connections, in seconds."""


def state_options(settings: WorkerSettings) -> dict[str, Any]:
    """``SagaApp`` keyword arguments: where saga state lives, and how durable its writes."""
    options: dict[str, Any] = {
        "durable_replicas": settings.durable_replicas,
        "durable_timeout": timedelta(milliseconds=settings.durable_timeout_ms)}
    if settings.redis_cluster:
        return {**options, "redis": cluster_client(settings.state_url)}
    if settings.redis_sentinels and settings.redis_sentinel_master:
        return {**options, "redis": sentinel_client(
            settings.redis_sentinels, settings.redis_sentinel_master, settings.state_url)}
    return {**options, "redis_url": settings.state_url}


def reconnecting() -> Retry:
    """Send a command again over a new connection when its connection broke."""
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), 3,
                 supported_errors=(redis.ConnectionError,))


def cluster_client(url: str) -> RedisCluster:
    """A Redis Cluster client starting from the node at ``url``."""
    try:
        return RedisCluster.from_url(url, socket_connect_timeout=TIMEOUT_S,
                                     socket_timeout=TIMEOUT_S, retry=reconnecting())
    except (redis.RedisError, RedisClusterException) as exc:
        where = url.partition("://")[2].rpartition("@")[2]
        raise SagaStoreUnavailableError(
            f"the Redis Cluster at {where} (SAGA_REDIS_URL) cannot be reached ({exc}): check "
            "that the cluster is up and that the URL names one of its nodes") from exc


def sentinel_client(sentinels: tuple[tuple[str, int], ...], master: str, url: str
                    ) -> redis.Redis:
    """The client of the master the sentinels name ``master``; connects on first use."""
    options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    for name in ("host", "port", "path", "connection_class"):
        options.pop(name, None)
    timeouts: dict[str, Any] = {"socket_connect_timeout": TIMEOUT_S,
                                "socket_timeout": TIMEOUT_S}
    manager = Sentinel(list(sentinels), sentinel_kwargs=timeouts)
    client: redis.Redis = manager.master_for(master, ssl=url.startswith("rediss://"),
                                             retry=reconnecting(), **timeouts, **options)
    return client
