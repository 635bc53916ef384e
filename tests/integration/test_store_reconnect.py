"""The saga store after Redis closed its connections (a restart, a failover, CLIENT KILL)."""

from __future__ import annotations

import redis

from saga_celery._store.redis import RedisStore


def test_a_command_on_a_connection_redis_closed_is_sent_again_on_a_new_one(
        redis_url: str, redis_client: redis.Redis) -> None:
    """The first command after Redis dropped the store's kept connection succeeds on a new
    connection; redis-py's default policy sent nothing again, so it failed (and, inside a
    task, failed the task)."""
    store = RedisStore.from_url(redis_url, prefix="reconnect-test:")
    store.ping()
    conn = store._connections.get()  # the thread's kept connection
    conn.send_command("CLIENT", "ID")
    client_id = conn.read_response()
    assert redis_client.client_kill_filter(_id=client_id) == 1
    assert store.load("no-such-saga") is None
