"""Saga state on a real Redis Cluster of three masters (SPEC section 9).

A real ``celery worker`` runs ``shop.py`` with ``SagaApp(app, redis=RedisCluster(...))``
(``topology_env.py``): every saga's keys sit on the node of its slot, the index sets on
theirs, and the broker stays the ordinary Redis.  The cluster is started for the module on
loopback ports (``tests/redis_servers.py``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from celery import Celery
from redis.cluster import RedisCluster

from saga_celery import SagaApp, SagaConfigError, SagaStoreUnavailableError
from saga_celery._engine import Engine
from saga_celery._store import RedisStore
from saga_celery._store.scripts import COMPACT
from tests.contract.conftest import make_run
from tests.integration.harness import WorkerProcess
from tests.integration.shop_fixtures import entries, import_shop_copy, module_shop_worker
from tests.integration.topology_env import deployment
from tests.redis_servers import ClusterServers, running
from tests.unit.test_history import run_to_end
from workers.settings import WorkerSettings
from workers.state import state_options

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RESERVE, CHARGE, TICKET = "shop.reserve", "shop.charge", "shop.ticket"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServers]:
    with running(lambda: ClusterServers(tmp_path_factory.mktemp("cluster"))) as servers:
        yield servers


@pytest.fixture(scope="module")
def cluster_client(cluster: ClusterServers) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(cluster.url, socket_timeout=5.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def cluster_env(cluster: ClusterServers, redis_url: str) -> dict[str, str]:
    """The shop with saga state on the cluster; ledger and broker on the ordinary Redis."""
    return deployment(redis_url, "cluster", SAGA_TEST_CLUSTER_URL=cluster.url)


@pytest.fixture(scope="module")
def shop(cluster_env: dict[str, str]) -> ModuleType:
    return import_shop_copy(cluster_env, "cluster")


@pytest.fixture(scope="module")
def worker(cluster_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[WorkerProcess]:
    yield from module_shop_worker(cluster_env, tmp_path_factory)


def test_sagas_complete_with_their_state_spread_over_the_nodes(
        shop: ModuleType, worker: WorkerProcess, cluster_client: RedisCluster,
        redis_url: str) -> None:
    """Eight sagas at once complete, their state on the cluster (on more than one node) and
    none of it on the ordinary Redis."""
    runs = [shop.order.apply_async(saga_id=f"cl-{uuid.uuid4().hex[:10]}") for _ in range(8)]
    states = [run.wait(timeout=60) for run in runs]

    assert [s.status for s in states] == ["complete"] * 8
    assert all(s.output == {"ticket": "t-1"} for s in states)
    keys = [f"{shop.PREFIX}{{{run.id}}}:state" for run in runs]
    assert all(cluster_client.exists(key) for key in keys)
    assert len({cluster_client.get_node_from_key(key).name for key in keys}) > 1
    with redis.Redis.from_url(redis_url) as plain:
        assert not any(plain.exists(key) for key in keys)
    assert {run.id for run in runs} <= set(shop.sagas._store.list_ids(limit=100))


def test_finished_sagas_are_compacted_on_the_cluster(
        shop: ModuleType, worker: WorkerProcess, cluster_client: RedisCluster) -> None:
    """The worker's finisher compacts ended sagas whose keys lie on several nodes (one
    pipeline over their slots), and they read as before (SPEC section 11)."""
    runs = [shop.order.apply_async(saga_id=f"cc-{uuid.uuid4().hex[:10]}") for _ in range(6)]
    states = [run.wait(timeout=60) for run in runs]
    keys = [f"{shop.PREFIX}{{{run.id}}}:state" for run in runs]
    finishing = f"{shop.PREFIX}finishing"
    deadline = time.monotonic() + 60
    while not all(cluster_client.hexists(key, "c") for key in keys) or any(
            cluster_client.zscore(finishing, run.id) is not None for run in runs):
        assert time.monotonic() < deadline, _not_compacted(cluster_client, keys, finishing,
                                                           runs, worker)
        time.sleep(0.1)
    assert len({cluster_client.get_node_from_key(key).name for key in keys}) > 1
    assert [shop.sagas.run(run.id).status() for run in runs] == states
    assert all(shop.sagas.run(run.id).events()[-1]["type"] == "saga_completed"
               for run in runs)


def _not_compacted(client: RedisCluster, keys: list[str], finishing: str, runs: list[Any],
                   worker: WorkerProcess) -> str:
    """What the finisher left undone, and what the worker said about finishing: for a
    failure to say why (seen once, on the lowest versions, in a whole CI run)."""
    fields = {key: sorted(f.decode() if isinstance(f, bytes) else str(f)
                         for f in client.hkeys(key)) for key in keys}
    marked = [run.id for run in runs if client.zscore(finishing, run.id) is not None]
    said = [line for line in worker.log().splitlines()
            if "finish" in line or "Error" in line or "Traceback" in line]
    return (f"the finisher did not compact them: state fields {fields}, still marked "
            f"{marked}; the worker said: {said[-20:]}")


def test_a_failing_saga_rolls_back_in_reverse_start_order(
        shop: ModuleType, worker: WorkerProcess) -> None:
    """A last step that fails for good rolls back ticket, charge, reserve, each with its
    own output, with the saga's state on the cluster."""
    saga_id = f"cl-{uuid.uuid4().hex[:10]}"
    state = shop.order.apply_async(saga_id=saga_id,
                                   params={"fail": {TICKET: "nonretryable"}}).wait(timeout=60)

    assert state.status == "errored"
    assert state.rollback is not None
    assert (state.rollback.outcome, state.rollback.completed_steps) == ("complete", 3)
    rollbacks = entries(shop, saga_id, "rollback_start")
    assert [r["step"] for r in rollbacks] == [TICKET, CHARGE, RESERVE]
    assert rollbacks[2]["output"] == {"reservation": "r-sku-1-2"}


def test_a_parallel_sibling_in_flight_is_compensated_after_it_ends(
        shop: ModuleType, worker: WorkerProcess) -> None:
    """A sibling still running when the other fails is undone only once it has ended, with
    its real output."""
    saga_id = f"cl-{uuid.uuid4().hex[:10]}"
    params = {"fail": {CHARGE: "nonretryable", "shop.slow": "sleep:0.5"}}
    state = shop.fan_out.apply_async(saga_id=saga_id, params=params).wait(timeout=60)

    assert state.status == "errored"
    assert state.step("shop.slow").status == "complete"
    undo = entries(shop, saga_id, "rollback_start", "shop.slow")[0]
    assert undo["output"] == "slow-done"
    assert undo["t"] >= entries(shop, saga_id, "step_done", "shop.slow")[0]["t"]


def test_the_worker_settings_put_saga_state_on_the_cluster(
        cluster: ClusterServers, redis_url: str) -> None:
    """SAGA_REDIS_CLUSTER=true gives workers.app's SagaApp a client of the cluster that
    SAGA_REDIS_URL names a node of."""
    settings = WorkerSettings.from_env({"SAGA_REDIS_URL": cluster.url,
                                        "SAGA_REDIS_CLUSTER": "true",
                                        "SAGA_BROKER_URL": redis_url})
    app = Celery("t", broker=redis_url, set_as_current=False)
    store = SagaApp(app, **state_options(settings), prefix=f"cs-{uuid.uuid4().hex[:6]}:")._store
    run = make_run()

    assert isinstance(store, RedisStore) and store._where.startswith("Redis Cluster ")
    assert store.create(run, []) is True
    snapshot = store.load(run.id)
    assert snapshot is not None and snapshot.run.id == run.id
    app.close()


def test_durable_writes_are_refused_on_a_cluster(cluster_client: RedisCluster) -> None:
    """``durable_replicas`` on a cluster client is refused when the SagaApp is built: WAIT
    must follow each write on its own connection."""
    app = Celery("t", broker="memory://", set_as_current=False)
    with pytest.raises(SagaConfigError, match="not available on Redis Cluster"):
        SagaApp(app, redis=cluster_client, durable_replicas=1)


def test_a_node_that_is_down_makes_its_sagas_unavailable_not_corrupt(
        tmp_path: Path) -> None:
    """With a master down, its sagas raise SagaStoreUnavailableError naming the cluster
    (the runtime hands their messages back), while sagas on the other nodes go on."""
    with running(lambda: ClusterServers(tmp_path)) as servers:
        client = RedisCluster.from_url(servers.url, socket_timeout=2.0)
        store = RedisStore(client, prefix="down:")
        runs = [make_run() for _ in range(12)]
        for run in runs:
            assert store.create(run, [])
        down = servers.nodes[-1]
        down.kill()
        on_down = [r for r in runs if client.keyslot(f"down:{{{r.id}}}:state")
                   >= 2 * (16384 // 3)]
        elsewhere = [r for r in runs if r not in on_down]
        assert on_down and elsewhere
        with pytest.raises(SagaStoreUnavailableError, match="Redis Cluster"):
            store.load(on_down[0].id)
        assert store.load(elsewhere[0].id) is not None
        client.close()


def test_compaction_sent_again_after_a_node_lacked_its_script_drops_every_marker(
        cluster_client: RedisCluster) -> None:
    """One node without the compaction script (restarted, or not asked yet) answers
    NOSCRIPT while the others compact: the finisher loads it and sends the batch again, and
    the sagas compacted the first time lose their markers too, not only the others."""
    store = RedisStore(cluster_client, prefix=f"cf-{uuid.uuid4().hex[:6]}:")
    store.finisher.submit = lambda saga_id: None  # type: ignore[method-assign]
    engine = Engine(store)
    ids = [f"cf-{n}" for n in range(8)]
    for saga_id in ids:
        run_to_end(engine, saga_id)
    keys = [f"{store.prefix}{{{saga_id}}}:state" for saga_id in ids]
    nodes = {cluster_client.get_node_from_key(key).name: key for key in keys}
    assert len(nodes) > 1  # the batch spans nodes
    cluster_client.script_load(COMPACT)  # on every node, then gone from one
    cluster_client.get_node_from_key(keys[0]).redis_connection.script_flush()

    assert store.finish_many(ids) == len(ids)

    finishing = f"{store.prefix}finishing"
    assert [saga_id for saga_id in ids if cluster_client.zscore(finishing, saga_id)] == []
    assert all(cluster_client.hexists(key, "c") for key in keys)
