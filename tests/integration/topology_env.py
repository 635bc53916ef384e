"""Where ``shop.py`` keeps saga state when a topology test asks (its environment).

- ``SAGA_TEST_CLUSTER_URL``: a ``RedisCluster`` client that starts from that node;
- ``SAGA_TEST_SENTINELS`` (``host:port,...``) and ``SAGA_TEST_SENTINEL_MASTER``: a Sentinel
  master client;
- ``SAGA_TEST_DURABLE_REPLICAS``: ``SagaApp(durable_replicas=...)``;
- ``SAGA_TEST_AUDIT_KEY``: every saga write the store reports done is appended to that list
  in the ledger's Redis (``audit``), so a failover test can look for acknowledged writes
  that the new master does not have.

Unset, the shop keeps saga state at ``SAGA_TEST_REDIS_URL`` as always.  The clients are built
with redis-py's own API, as a user would build them for ``SagaApp(app, redis=client)``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from saga_celery import SagaApp

TIMEOUT_S = 5.0


def deployment(redis_url: str, tag: str, **state: str) -> dict[str, str]:
    """A shop deployment's environment: saga state as ``state`` (the variables above) says,
    ledger and broker at ``redis_url``, queues and keys under prefixes of its own."""
    return {"SAGA_TEST_REDIS_URL": redis_url, "SAGA_TEST_QUEUE_PREFIX": f"{tag}.",
            "SAGA_TEST_PREFIX": f"{tag}-{uuid.uuid4().hex[:6]}:", **state}


def sentinel_state(addresses: list[str], master: str) -> dict[str, str]:
    """The variables that keep saga state on the master the sentinels at ``addresses``
    name ``master``."""
    return {"SAGA_TEST_SENTINELS": ",".join(addresses), "SAGA_TEST_SENTINEL_MASTER": master}


def state_options(url: str) -> dict[str, Any]:
    """``SagaApp`` keyword arguments that say where saga state lives."""
    durable = {"durable_replicas": int(os.environ.get("SAGA_TEST_DURABLE_REPLICAS") or 0),
               "durable_timeout": 500}
    cluster = os.environ.get("SAGA_TEST_CLUSTER_URL")
    if cluster:
        return {"redis": RedisCluster.from_url(cluster, socket_timeout=TIMEOUT_S)}
    sentinels = os.environ.get("SAGA_TEST_SENTINELS")
    if sentinels:
        return {"redis": sentinel_master(sentinels, os.environ["SAGA_TEST_SENTINEL_MASTER"]),
                **durable}
    return {"redis_url": url, **durable}


def sentinel_master(sentinels: str, name: str) -> redis.Redis:
    """The client of the master the sentinels at ``host:port,...`` name ``name``: a command
    whose connection a failover closed is sent again, to the new master."""
    addresses = [(host, int(port)) for host, _, port in
                 (a.strip().rpartition(":") for a in sentinels.split(","))]
    manager = Sentinel(addresses, socket_timeout=TIMEOUT_S)
    return manager.master_for(name, socket_timeout=TIMEOUT_S,
                              retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3))


def audit(sagas: SagaApp, ledger: redis.Redis) -> None:
    """With ``SAGA_TEST_AUDIT_KEY`` set, record each create and commit the store reports
    done: ``[saga id, new version, [event ids]]`` appended to that list."""
    key = os.environ.get("SAGA_TEST_AUDIT_KEY")
    if not key:
        return
    store: Any = sagas._store

    def audited(write: Callable[..., bool], created: bool) -> Callable[..., bool]:
        def call(run: Any, *args: Any, **kwargs: Any) -> bool:
            done = write(run, *args, **kwargs)
            if done:
                events = kwargs.get("events", args[0] if args else [])
                version = 1 if created else kwargs["version"] + 1
                ledger.rpush(key, json.dumps([run.id, version,
                                              [e["event_id"] for e in events]]))
            return done
        return call

    store.create = audited(store.create, True)
    store.commit = audited(store.commit, False)
