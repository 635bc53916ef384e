"""``SagaApp(app, redis=client)`` and ``durable_replicas``: where saga state lives, checked
when the app is built (README, "Redis topologies").  Nothing here connects to Redis."""

from __future__ import annotations

import fakeredis
import pytest
import redis
from celery import Celery
from redis.sentinel import Sentinel

from saga_celery import SagaApp, SagaConfigError
from saga_celery._store import MemoryStore, RedisStore
from saga_celery._store.durability import Durability


def test_a_redis_client_is_the_store_of_saga_state(app: Celery) -> None:
    """``redis=client`` puts saga state on that client, with the app's prefix."""
    client = fakeredis.FakeRedis()
    sagas = SagaApp(app, redis=client, prefix="shop:")

    assert isinstance(sagas._store, RedisStore)
    assert sagas._store.prefix == "shop:"
    sagas._store.ping()
    client.close()


@pytest.mark.parametrize("other", ["redis_url", "store"])
def test_redis_with_another_state_option_is_refused(app: Celery, other: str) -> None:
    """``redis=`` with ``redis_url=`` or ``store=`` is refused, naming both."""
    given = {"redis_url": "redis://127.0.0.1:6379/0", "store": MemoryStore()}[other]
    with pytest.raises(SagaConfigError, match=f"redis= and {other}=|{other}= and redis="):
        SagaApp(app, redis=fakeredis.FakeRedis(), **{other: given})


def test_something_that_is_not_a_redis_client_is_refused(app: Celery) -> None:
    """``redis=`` takes the three redis-py client kinds, and says so."""
    with pytest.raises(SagaConfigError, match="RedisCluster"):
        SagaApp(app, redis="redis://127.0.0.1:6379/0")  # type: ignore[arg-type]


def test_a_sentinel_master_client_is_described_by_its_sentinels(app: Celery) -> None:
    """Errors about a Sentinel-managed store name the master and its sentinels, not an
    address the client never connects to; building it connects to nothing."""
    client = Sentinel([("127.0.0.1", 1), ("127.0.0.1", 2)]).master_for("orders", db=3)
    sagas = SagaApp(app, redis=client)

    assert isinstance(sagas._store, RedisStore)
    assert sagas._store._where == (
        "Sentinel master 'orders' (sentinels 127.0.0.1:1,127.0.0.1:2) db 3")


@pytest.mark.parametrize(("options", "field"), [
    ({"durable_replicas": -1}, "durable_replicas"),
    ({"durable_replicas": True}, "durable_replicas"),
    ({"durable_replicas": 1, "durable_timeout": 0}, "durable_timeout"),
])
def test_bad_durability_settings_are_refused(app: Celery, options: dict[str, object],
                                             field: str) -> None:
    """A negative replica count or a timeout that is not positive is refused, naming it."""
    with pytest.raises(SagaConfigError, match=field):
        SagaApp(app, redis=fakeredis.FakeRedis(), **options)  # type: ignore[arg-type]


def test_durability_with_a_store_built_elsewhere_is_refused(app: Celery) -> None:
    """``durable_replicas`` configures the store SagaApp builds, so ``store=`` refuses it."""
    with pytest.raises(SagaConfigError, match="store="):
        SagaApp(app, store=MemoryStore(), durable_replicas=1)


def test_durability_sends_wait_for_its_replicas_and_timeout() -> None:
    """``durable_replicas=2, durable_timeout="2 seconds"`` is ``WAIT 2 2000`` after each
    saga write."""
    durability = Durability(replicas=2, timeout_ms=2000)

    assert durability.command == ("WAIT", "2", "2000")
    assert durability.packed == b"*3\r\n$4\r\nWAIT\r\n$1\r\n2\r\n$4\r\n2000\r\n"


@pytest.mark.parametrize(("reply", "waited"), [(1, 1), (2, 3), (0, 0),
                                               (redis.ResponseError("x"), 0)])
def test_a_write_confirmed_or_not_made_passes(reply: object, waited: object) -> None:
    """A write confirmed by enough replicas passes; so does one that wrote nothing (a
    conflict, 0, or an error reply), whatever WAIT said."""
    Durability(replicas=1, timeout_ms=10).confirm(reply, waited, "here", "s-1")


def test_a_write_too_few_replicas_confirmed_is_unavailable() -> None:
    """A write fewer replicas confirmed in time raises SagaStoreUnavailableError, so it is
    treated as a write whose outcome is unknown."""
    from saga_celery import SagaStoreUnavailableError

    with pytest.raises(SagaStoreUnavailableError, match="1 of the 2 replica") as raised:
        Durability(replicas=2, timeout_ms=10).confirm(1, 1, "here", "s-1")
    assert raised.value.saga_id == "s-1"
