"""``RedisStore`` on real Redis over RESP3: push frames between replies do not break reads.

Client tracking makes Redis push an invalidation to the tracking connection whenever another
client changes a key it read; a managed Redis pushes maintenance notifications the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from uuid import uuid4

import pytest
import redis

from saga_celery._store import RedisStore
from tests.contract.conftest import make_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


@pytest.fixture
def resp3_store(redis_url: str) -> Iterator[RedisStore]:
    """A store on a RESP3 client."""
    client = redis.Redis.from_url(redis_url, protocol=3)
    yield RedisStore(client, prefix=f"resp3-{uuid4().hex[:8]}:")
    client.close()


def test_a_tracking_invalidation_between_reads_is_skipped(
    resp3_store: RedisStore, redis_client: redis.Redis
) -> None:
    """With client tracking on the store's own connection, a saga changed by another client
    pushes an invalidation, and the store's next read still returns the saga."""
    run = make_run()
    resp3_store.create(run, [])
    assert resp3_store._send([("CLIENT", "TRACKING", "ON")]) == [b"OK"]
    assert resp3_store.load(run.id) is not None  # now tracked
    state = f"{resp3_store.prefix}{{{run.id}}}:state"
    redis_client.hset(state, "x", "1")  # another client: Redis pushes "invalidate"

    for _ in range(3):
        snapshot = resp3_store.load(run.id)
        assert snapshot is not None and snapshot.run == run
        redis_client.hset(state, "x", "2")
