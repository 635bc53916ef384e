"""A Celery app whose sagas wait longer than its broker may hold a message (SPEC section 8).

The Redis transport's visibility timeout is 5 s, so ``max_countdown`` defaults to 1.25 s:
every retry delay here (20 s) waits as a timer in the saga store, fired by the workers'
timer pollers.  ``$SAGA_TEST_REDIS_URL`` holds broker, saga state and the ledger;
``$SAGA_TEST_PREFIX`` is the saga key prefix (a test's own).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from saga_celery import RetryLater, SagaApp, current_step

URL = os.environ.get("SAGA_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
PREFIX = os.environ.get("SAGA_TEST_PREFIX", "saga:")

app = Celery("waiting_app", broker=URL)
app.conf.update(
    broker_transport_options={"visibility_timeout": 5},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_default_queue=f"{PREFIX}default",
)
sagas = SagaApp(app, redis_url=URL, prefix=PREFIX, lease_ttl="2 seconds",
                steps_queue=f"{PREFIX}steps", rollbacks_queue=f"{PREFIX}rollbacks")
ledger = redis.Redis.from_url(URL)

RETRY_DELAY_S = 20.0
LATER_DELAY_S = 15.0


def ledger_key(saga_id: str) -> str:
    return f"ledger:{PREFIX}{saga_id}"


def record(**entry: Any) -> None:
    step = current_step()
    ledger.rpush(ledger_key(step.saga_id), json.dumps(
        {**entry, "step": step.step, "attempt": step.attempt, "t": time.time()}))


@sagas.step(name="waiting.book", timeout="2 seconds")
def book(order: int) -> int:
    record(kind="book")
    return order


@book.rollback(timeout="2 seconds")
def unbook(ctx: Any) -> None:
    ledger.rpush(ledger_key(ctx.saga_id), json.dumps({"kind": "unbook", "t": time.time()}))


@sagas.step(name="waiting.flaky", timeout="2 seconds",
            retries={"limit": 2, "delay": f"{RETRY_DELAY_S} seconds", "backoff": "constant"})
def flaky(order: int) -> None:
    record(kind="flaky")
    raise RuntimeError("the provider is down")


@sagas.step(name="waiting.later", timeout="2 seconds",
            retries={"limit": 1, "delay": "1 second", "backoff": "constant"})
def later(order: int) -> int:
    """Asks once to be called back later than its own policy's delay (``RetryLater``)."""
    record(kind="later")
    if current_step().attempt == 1:
        raise RetryLater(f"{LATER_DELAY_S} seconds", "the provider said: come back later")
    return order


@sagas.step(name="waiting.ship", timeout="2 seconds")
def ship(previous: Any) -> Any:
    record(kind="ship", got=previous)
    return previous


FIXED = os.environ.get("WAITING_FIXED") == "1"
"""A deploy with the bug fixed: ``waiting.fixable`` succeeds (a worker started with
``$WAITING_FIXED=1``)."""


@sagas.step(name="waiting.fixable", timeout="2 seconds", retries={"limit": 1, "delay": 200})
def fixable(previous: Any) -> str:
    record(kind="fixable", fixed=FIXED)
    if not FIXED:
        raise RuntimeError("a bug, fixed in the next deploy")
    return "fixed"


SLEEP_S = 30.0

retrying = sagas.saga("waiting.retrying", [book.s(7), flaky.s()])
sleeping = sagas.saga("waiting.sleeping", [book.s(9), sagas.sleep(f"{SLEEP_S} seconds",
                                                                   name="cool-off"),
                                           ship.s()])
held = sagas.saga("waiting.held", [book.s(11), fixable.s(), ship.s()], on_failure="hold")
held_briefly = sagas.saga("waiting.held_briefly", [book.s(12), fixable.s()],
                          on_failure="hold", hold_timeout="6 seconds")
approval = sagas.saga("waiting.approval", [book.s(10),
                                           sagas.wait_for_event("approval", timeout="8 seconds"),
                                           ship.s()])
called_back = sagas.saga("waiting.called_back", [book.s(8), later.s()])
