"""saga_celery's embedded Redis-protocol server (fakeredis over TCP) seen from other clients."""

from __future__ import annotations

import uuid

import pytest
import redis

from saga_celery.demo.embedded import start_embedded_redis
from tests.integration.harness import WorkerFactory, celery_client

_INCR_BY = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


def test_embedded_server_runs_lua_scripts_over_tcp() -> None:
    """EVAL, SCRIPT LOAD and EVALSHA work through the embedded server's TCP port."""
    with (
        start_embedded_redis() as server,
        redis.Redis.from_url(server.url, decode_responses=True) as client,
    ):
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert client.eval(_INCR_BY, 1, "counter", 2) == 2
        sha = client.script_load(_INCR_BY)
        assert client.evalsha(sha, 1, "counter", 5) == 7


def test_embedded_server_stop_closes_its_port() -> None:
    """After stop(), the embedded server's port refuses connections."""
    server = start_embedded_redis()
    server.stop()

    with (
        redis.Redis.from_url(server.url, socket_connect_timeout=1) as client,
        pytest.raises(redis.ConnectionError),
    ):
        client.ping()


@pytest.mark.integration
def test_embedded_server_serves_a_worker_subprocess(worker_factory: WorkerFactory) -> None:
    """A prefork worker subprocess uses the embedded server as broker, backend and Lua store."""
    key = f"embedded:{uuid.uuid4().hex}"
    with start_embedded_redis() as server:
        worker = worker_factory(
            "tests.integration.plain_app", env={"SAGA_TEST_REDIS_URL": server.url}
        )
        with celery_client(server.url) as client:
            result = client.send_task("plain_app.add", args=(20, 22), kwargs={"record_key": key})
            assert result.get(timeout=30) == 42
            # Collected, a result unsubscribes from its channel (Celery 5.6 reconnects to do
            # it and raises in __del__ when it cannot): while the server still serves.
            del result

        with redis.Redis.from_url(server.url, decode_responses=True) as direct:
            record = direct.hgetall(key)
        assert record["result"] == "42"
        assert int(record["pid"]) in worker.child_pids()
        worker.stop()
