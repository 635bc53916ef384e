"""The dispatcher publishes saga messages through a producer of its own on a Redis broker.

These tests publish to a real Redis broker and read the messages back: every message
arrives, on the queue ``task_routes`` names; a step's several messages go in one pipeline
(kombu 5.7's ``Producer.batch()``; one by one before 5.7), a single one on its own.  A saga
task's own late ack goes once its messages are out, in a pipeline of its own.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Producer

from saga_celery._celery import acks
from saga_celery._celery.acks import LateAck
from saga_celery._celery.dispatch import Dispatcher, build_message
from saga_celery._core.machine import start_saga
from saga_celery._core.model import Dispatch, SagaRun
from saga_celery._internals import FAST_PATHS_ENV
from saga_celery._internals.kombu import own_ack
from tests.unit.sim import plan

NOW = datetime(2026, 11, 29, tzinfo=UTC)
BATCH = hasattr(Producer, "batch")
"""kombu 5.7 and later: a step's several messages go in one pipeline; before, one by one."""
TOGETHER = [["LPUSH", "LPUSH"]] if BATCH else []
"""The pipelines that publish two messages of one step."""


def _run(saga_id: str = "s-1") -> SagaRun:
    return start_saga(saga_id=saga_id, name="order", plan=plan("shop.reserve"), params={},
                      now=NOW).run


def _dispatch(attempt: int = 1) -> Dispatch:
    """The saga's first message, as the attempt ``attempt`` (a retry after the first)."""
    first = start_saga(saga_id="s-0", name="order", plan=plan("shop.reserve"), params={},
                       now=NOW).dispatches[0]
    return first.model_copy(update={"attempt": attempt, "retries": attempt - 1})


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    celery = Celery("dispatch-test", broker=redis_url, set_as_current=False)
    celery.conf.task_routes = {"shop.*": {"queue": "shop-steps"}}
    yield celery
    celery.close()


def _queued(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]


@pytest.fixture
def pipelines(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The command names of every redis-py pipeline executed during the test, and of every
    write of an ack's commands on a kept connection (``acks.send_ack``), in order."""
    executed: list[list[str]] = []
    execute = redis.client.Pipeline.execute
    written = acks.exchange

    def spy(self: redis.client.Pipeline, raise_on_error: bool = True) -> Any:
        executed.append([str(c[0][0]).upper() for c in self.command_stack])
        return execute(self, raise_on_error)

    def spy_write(conn: Any, payload: bytes, replies: int) -> list[Any]:
        executed.append([m.decode() for m in re.findall(rb"\*\d+\r\n\$\d+\r\n(\w+)\r\n",
                                                          payload)])
        return written(conn, payload, replies)

    monkeypatch.setattr(redis.client.Pipeline, "execute", spy)
    monkeypatch.setattr(acks, "exchange", spy_write)
    return executed


def test_messages_go_to_the_routed_queue_several_in_one_pipeline(
        app: Celery, redis_client: redis.Redis, pipelines: list[list[str]]) -> None:
    """One message is published alone; a step's several messages go in one round trip."""
    redis_client.delete("shop-steps")
    dispatcher = Dispatcher(app, clock=lambda: NOW)
    run = _run()
    dispatcher.send(run, [_dispatch(1)])  # the first message declares its queue
    pipelines.clear()
    dispatcher.send(run, [_dispatch(1)])
    dispatcher.send(run, [_dispatch(2), _dispatch(3)])

    messages = _queued(redis_client, "shop-steps")
    assert [m["headers"]["task"] for m in messages] == ["shop.reserve"] * 4
    expected = [build_message(run, _dispatch(a), NOW).task_id for a in (1, 1, 2, 3)]
    assert [m["headers"]["id"] for m in messages] == expected
    assert pipelines == TOGETHER


def test_without_kombus_batch_several_messages_go_one_by_one(
        app: Celery, redis_client: redis.Redis, pipelines: list[list[str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A kombu older than 5.7 has no ``Producer.batch()``: each message is published alone."""
    monkeypatch.delattr(Producer, "batch", raising=False)
    redis_client.delete("shop-steps")
    dispatcher = Dispatcher(app, clock=lambda: NOW)
    dispatcher.send(_run(), [_dispatch(3)])  # the first message declares its queue
    pipelines.clear()
    dispatcher.send(_run(), [_dispatch(1), _dispatch(2)])
    assert redis_client.llen("shop-steps") == 3
    assert pipelines == []


def test_each_thread_publishes_through_its_own_producer(app: Celery,
                                                        redis_client: redis.Redis) -> None:
    redis_client.delete("shop-steps")
    dispatcher = Dispatcher(app, clock=lambda: NOW)
    producers: list[Any] = []

    def send(saga_id: str) -> None:
        dispatcher.send(_run(saga_id), [_dispatch(1)])
        producers.append(dispatcher._producer())

    threads = [threading.Thread(target=send, args=(f"s-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(p) for p in producers}) == 3
    assert len(_queued(redis_client, "shop-steps")) == 3


def test_other_transports_publish_through_the_app_producer_pool() -> None:
    app = Celery("dispatch-memory", broker="memory://", set_as_current=False)
    dispatcher = Dispatcher(app, clock=lambda: NOW)
    assert dispatcher._producer() is None
    dispatcher.send(_run(), [_dispatch(1)])
    with app.connection_for_read() as conn:
        message = conn.SimpleQueue("celery").get(timeout=1)
        assert message.headers["task"] == "shop.reserve"
        message.ack()


# --- a saga task's own late ack (_celery/acks.py) ---------------------------------------


def _delivered(client: redis.Redis, tag: str) -> None:
    """What kombu's consumer writes when it receives a message: it is now unacknowledged."""
    client.zadd("unacked_index", {tag: time.time()})
    client.hset("unacked", tag, "[]")


def _unacked(client: redis.Redis) -> tuple[int, int]:
    return int(client.hlen("unacked")), int(client.zcard("unacked_index"))


def test_a_tasks_ack_goes_once_the_messages_it_sends_are_out(
        app: Celery, redis_client: redis.Redis, pipelines: list[list[str]]) -> None:
    """A step's ack follows its next messages, in a pipeline of its own: a process that dies
    between the two leaves its message to come again, never a message unsent."""
    redis_client.delete("shop-steps", "unacked", "unacked_index")
    _delivered(redis_client, "tag-1")
    dispatcher = Dispatcher(app, clock=lambda: NOW)
    dispatcher.send(_run(), [_dispatch(3)])  # the first message declares its queue
    pipelines.clear()
    ack = LateAck("tag-1")

    dispatcher.send(_run(), [_dispatch(1), _dispatch(2)], ack=ack)

    assert not ack.pending
    assert _unacked(redis_client) == (0, 0)
    assert redis_client.llen("shop-steps") == 3
    assert pipelines == [*TOGETHER, ["ZREM", "HDEL"]]
    dispatcher.ack(ack)  # already sent: nothing more goes out
    assert len(pipelines) == len(TOGETHER) + 1


def test_a_task_that_sends_nothing_acks_alone(app: Celery, redis_client: redis.Redis,
                                              pipelines: list[list[str]]) -> None:
    """The last step of a saga publishes nothing: its ack goes out on its own."""
    redis_client.delete("unacked", "unacked_index")
    _delivered(redis_client, "tag-2")
    ack = LateAck("tag-2")

    Dispatcher(app, clock=lambda: NOW).send(_run(), [], ack=ack)

    assert not ack.pending
    assert _unacked(redis_client) == (0, 0)
    assert pipelines == [["ZREM", "HDEL"]]


@pytest.mark.skipif(not BATCH, reason="kombu before 5.7 has no Producer.batch()")
def test_a_failed_batch_publishes_again_through_kombu_then_acks(
        app: Celery, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the batch's pipeline fails, whether its messages went out is unknown: they go out
    again through kombu's own publish, and the ack follows them."""
    redis_client.delete("shop-steps", "unacked", "unacked_index")
    _delivered(redis_client, "tag-3")
    dispatcher = Dispatcher(app, clock=lambda: NOW)
    dispatcher.send(_run(), [_dispatch(3)])  # the first message declares its queue
    ack = LateAck("tag-3")
    execute = redis.client.Pipeline.execute
    failures = iter([redis.ConnectionError("connection reset by peer")])

    def flaky(self: redis.client.Pipeline, raise_on_error: bool = True) -> Any:
        failure = next(failures, None)
        if failure is not None:
            self.reset()
            raise failure
        return execute(self, raise_on_error)

    monkeypatch.setattr(redis.client.Pipeline, "execute", flaky)
    dispatcher.send(_run(), [_dispatch(1), _dispatch(2)], ack=ack)

    assert not ack.pending
    assert redis_client.llen("shop-steps") == 3
    assert _unacked(redis_client) == (0, 0)


def test_with_the_own_ack_off_tasks_owe_no_ack(app: Celery,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``SAGA_CELERY_FAST_PATHS=off`` (or a failed probe): the main process acks, as Celery
    does, so a running task owes none of its own."""
    request = SimpleNamespace(properties={"delivery_tag": "tag-7"})
    assert Dispatcher(app, clock=lambda: NOW).late_ack(request) is not None
    monkeypatch.setenv(FAST_PATHS_ENV, "off")
    own_ack.cache_clear()
    try:
        assert Dispatcher(app, clock=lambda: NOW).late_ack(request) is None
    finally:
        own_ack.cache_clear()


def test_the_ack_follows_kombus_key_prefix_and_unacked_key_names(
        redis_url: str, redis_client: redis.Redis) -> None:
    """With ``global_keyprefix`` and renamed unacked keys, the ack removes what kombu's
    consumer wrote, and the message lands on the prefixed queue."""
    celery = Celery("dispatch-prefixed", broker=redis_url, set_as_current=False)
    celery.conf.task_routes = {"shop.*": {"queue": "shop-steps"}}
    celery.conf.broker_transport_options = {
        "global_keyprefix": "pfx:", "unacked_key": "owed", "unacked_index_key": "owed_index"}
    redis_client.delete("pfx:shop-steps", "pfx:owed", "pfx:owed_index")
    redis_client.zadd("pfx:owed_index", {"tag-6": time.time()})
    redis_client.hset("pfx:owed", "tag-6", "[]")
    dispatcher = Dispatcher(celery, clock=lambda: NOW)
    ack = LateAck("tag-6")
    try:
        dispatcher.send(_run(), [_dispatch(1)], ack=ack)
    finally:
        celery.close()

    assert not ack.pending
    assert (redis_client.hlen("pfx:owed"), redis_client.zcard("pfx:owed_index")) == (0, 0)
    assert redis_client.llen("pfx:shop-steps") == 1
