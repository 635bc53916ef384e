"""Saga state behind Sentinel (SPEC section 9): a master, a replica and three sentinels on
loopback ports (``tests/redis_servers.py``), a real ``celery worker`` whose
``SagaApp(app, redis=Sentinel(...).master_for(name))`` keeps saga state there, and the
master failed over in the middle of running sagas (``failover.py``), without and with
durable writes (``durable_replicas=1``).  The broker stays the ordinary Redis.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import pytest
import redis

from saga_celery import SagaStoreUnavailableError
from saga_celery._store import RedisStore
from saga_celery._store.durability import Durability
from tests.contract.conftest import make_event, make_run
from tests.integration.failover import Report, measure
from tests.integration.harness import WorkerProcess
from tests.integration.shop_fixtures import entries, import_shop_copy, module_shop_worker
from tests.integration.topology_env import deployment, sentinel_master, sentinel_state
from tests.redis_servers import SentinelServers, running, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RESERVE, CHARGE, TICKET = "shop.reserve", "shop.charge", "shop.ticket"


def _servers(factory: pytest.TempPathFactory) -> Iterator[SentinelServers]:
    with running(lambda: SentinelServers(factory.mktemp("sentinel"))) as servers:
        yield servers


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelServers]:
    """The module's Sentinel setup, never failed over."""
    yield from _servers(tmp_path_factory)


@pytest.fixture
def fresh_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelServers]:
    """A Sentinel setup of the test's own, for a test that fails it over."""
    yield from _servers(tmp_path_factory)


def master_client(servers: SentinelServers) -> redis.Redis:
    return sentinel_master(",".join(s.address for s in servers.sentinels), servers.master_name)


@pytest.fixture(scope="module")
def sentinel_env(sentinel: SentinelServers, redis_url: str) -> dict[str, str]:
    """The shop with saga state behind the sentinels; ledger and broker on the ordinary
    Redis."""
    return deployment(redis_url, "sentinel", **sentinel_state(
        [s.address for s in sentinel.sentinels], sentinel.master_name))


@pytest.fixture(scope="module")
def shop(sentinel_env: dict[str, str]) -> ModuleType:
    return import_shop_copy(sentinel_env, "sentinel")


@pytest.fixture(scope="module")
def worker(sentinel_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[WorkerProcess]:
    yield from module_shop_worker(sentinel_env, tmp_path_factory)


def test_sagas_complete_and_roll_back_through_a_sentinel_master_client(
        shop: ModuleType, worker: WorkerProcess, sentinel: SentinelServers) -> None:
    """A saga completes and a failing one rolls back in reverse start order, their state
    on the master the sentinels name, and replicated to its replica."""
    done, failed = (f"se-{uuid.uuid4().hex[:10]}" for _ in range(2))
    completed = shop.order.apply_async(saga_id=done).wait(timeout=60)
    errored = shop.order.apply_async(
        saga_id=failed, params={"fail": {TICKET: "nonretryable"}}).wait(timeout=60)

    assert completed.status == "complete" and completed.output == {"ticket": "t-1"}
    assert errored.status == "errored"
    assert [r["step"] for r in entries(shop, failed, "rollback_start")] == [
        TICKET, CHARGE, RESERVE]
    key = f"{shop.PREFIX}{{{done}}}:state"
    with sentinel.replica.client() as replica:
        wait_until(lambda: replica.hget(key, "t") == b"1", 5, "the replica has the saga")
    assert sentinel.master_port() == sentinel.master.port


def test_a_durable_write_waits_for_the_replica(sentinel: SentinelServers) -> None:
    """With durable_replicas=1 a commit is done once the replica has it; asking for more
    replicas than there are raises SagaStoreUnavailableError after the timeout, the write
    left on the master."""
    client = master_client(sentinel)
    durable = RedisStore(client, prefix="dw:", durability=Durability(1, 2000))
    greedy = RedisStore(client, prefix="dw:", durability=Durability(2, 100))
    run = make_run()
    key = f"dw:{{{run.id}}}:state"

    assert durable.create(run, [make_event(run, "saga_queued")]) is True
    assert durable.commit(run, version=1, events=[]) is True
    with sentinel.replica.client() as replica:
        assert replica.hget(key, "v") == b"2"  # no waiting: WAIT already did
    with pytest.raises(SagaStoreUnavailableError, match="1 of the 2 replica"):
        greedy.commit(run, version=2, events=[])
    snapshot = durable.load(run.id)
    assert snapshot is not None and snapshot.version == 3
    client.close()


def test_a_kept_connection_leaves_the_old_master_soon_after_a_failover(
        fresh_sentinel: SentinelServers) -> None:
    """After SENTINEL FAILOVER, the store's kept connection writes to the new master within
    a few seconds, long before Sentinel demotes the old one."""
    servers = fresh_sentinel
    client = master_client(servers)
    store = RedisStore(client, prefix="follow:")
    run = make_run()
    store.create(run, [])
    old = servers.master_port()

    servers.failover()
    started = time.monotonic()

    def on_new_master() -> bool:
        store.load(run.id)
        return bool(store._connections.get().port != old)

    wait_until(on_new_master, 8, "the kept connection is on the new master")
    assert time.monotonic() - started < 4
    assert servers.role(old) == "master"  # not demoted yet: the store did not wait for it
    snapshot = store.load(run.id)
    assert snapshot is not None
    assert store.commit(run, version=snapshot.version, events=[]) is True
    with servers.master_server().client() as new_master:
        assert new_master.hget(f"follow:{{{run.id}}}:state", "v") == b"2"
    client.close()


def _report(name: str, report: Report) -> None:
    """Put a failover's figures in the test output (``-s``, or the report of a failure)."""
    print(f"\n{name}: {json.dumps(asdict(report))}", file=sys.stderr)


def test_a_failover_without_durable_writes_is_reported_and_swept_up(
        fresh_sentinel: SentinelServers, redis_url: str, tmp_path: Path) -> None:
    """SENTINEL FAILOVER under running sagas, with asynchronous replication alone: the
    report counts the writes the old master acknowledged that the new one lacks and the
    sagas they left stuck (README, "Redis topologies"); a recovery sweep then ends every
    saga as it should."""
    report = measure(fresh_sentinel, redis_url, durable=0, log_dir=tmp_path)
    _report("failover without durable writes", report)

    assert report.in_flight_at_failover > 0
    assert report.acknowledged_writes > 0
    assert report.promoted_after_s < 5
    assert report.stuck == [] and report.wrong_outcome == []


def test_a_failover_with_durable_writes_loses_no_acknowledged_write(
        fresh_sentinel: SentinelServers, redis_url: str, tmp_path: Path) -> None:
    """With durable_replicas=1 the same failover loses no acknowledged write, and every
    saga ends as it should; some step bodies may run again (at least once), as after any
    write whose reply was lost."""
    report = measure(fresh_sentinel, redis_url, durable=1, log_dir=tmp_path)
    _report("failover with durable writes", report)

    assert report.in_flight_at_failover > 0
    assert report.lost_writes == 0
    assert report.stuck == [] and report.wrong_outcome == []
    assert report.all_ended_after_s is not None
