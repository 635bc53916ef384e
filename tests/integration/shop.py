"""The Celery app the integration tests run in a real worker.

Steps and rollbacks write what they did to a Redis ledger (a list per saga) so tests can
check effects, order, outputs and errors.  What a step does is chosen by the saga's params:
``{"fail": {"<step>": "always" | "nonretryable" | "times:N" | "sleep:S" | "hang:S" |
"kill:N" | "unserializable"}, "rollback_fail": {"<step>": "always" | "nonretryable" |
"times:N"}}``.  A step of a parallel stage with a ``fail`` mode acts it out only once its
siblings have started (waiting up to ``SIBLING_WAIT_S``), so they are reliably in flight when
it fails the saga, whichever pool process picked which message up first.

The environment picks the deployment: ``SAGA_TEST_REDIS_URL`` (saga state and the ledger),
``SAGA_TEST_BROKER_URL`` (default: the same Redis; ``amqp://...`` runs on RabbitMQ),
``SAGA_TEST_QUEUE_PREFIX`` (put before every queue and exchange name, so a run on a shared
broker collides with nobody), ``SAGA_TEST_PREFIX`` (saga key prefix) and
``SAGA_TEST_RECOVERY_INTERVAL`` / ``SAGA_TEST_RECOVERY_GRACE`` (the recovery sweep's); the
variables of ``topology_env.py`` keep saga state on a Redis Cluster or behind Sentinel.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import redis
from celery import Celery, group
from celery.exceptions import SoftTimeLimitExceeded

from saga_celery import NonRetryableError, RollbackContext, SagaApp, current_step
from tests.integration.topology_env import audit, state_options

URL = os.environ.get("SAGA_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
BROKER_URL = os.environ.get("SAGA_TEST_BROKER_URL") or URL
QUEUE_PREFIX = os.environ.get("SAGA_TEST_QUEUE_PREFIX", "")
PREFIX = os.environ.get("SAGA_TEST_PREFIX", "saga:")

app = Celery("shop", broker=BROKER_URL)
app.conf.update(
    broker_transport_options={"visibility_timeout": 20},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_default_queue=f"{QUEUE_PREFIX}shop.default",
    # Flower sees every saga task: the worker sends task events, the client "sent" events.
    worker_send_task_events=True,
    task_send_sent_event=True,
    control_exchange=f"{QUEUE_PREFIX}celery",
    event_exchange=f"{QUEUE_PREFIX}celeryev",
    event_queue_prefix=f"{QUEUE_PREFIX}celeryev",
)
sagas = SagaApp(
    app,
    **state_options(URL),
    prefix=PREFIX,
    lease_ttl="3 seconds",
    steps_queue=f"{QUEUE_PREFIX}saga.steps",
    rollbacks_queue=f"{QUEUE_PREFIX}saga.rollbacks",
    recovery_interval=os.environ.get("SAGA_TEST_RECOVERY_INTERVAL", "30 seconds"),
    recovery_grace=os.environ.get("SAGA_TEST_RECOVERY_GRACE", "60 seconds"),
)
ledger = redis.Redis.from_url(URL)
audit(sagas, ledger)

FAST = {"limit": 2, "delay": 200, "backoff": "constant"}
SIBLING_WAIT_S = 5.0


def ledger_key(saga_id: str) -> str:
    return f"ledger:{PREFIX}{saga_id}"


def record(saga_id: str, **entry: Any) -> None:
    ledger.rpush(ledger_key(saga_id), json.dumps({**entry, "t": time.time(), "pid": os.getpid()}))


def _count(key: str) -> int:
    return int(ledger.incr(f"count:{PREFIX}{key}"))


def behave(mode: str | None, key: str) -> None:
    """Act out a failure mode for this attempt (``key`` counts attempts across processes)."""
    if mode is None:
        return
    kind, _, arg = mode.partition(":")
    if kind == "always":
        raise RuntimeError("step failed on purpose")
    if kind == "nonretryable":
        raise NonRetryableError("no point retrying")
    if kind == "times" and _count(key) <= int(arg):
        raise RuntimeError(f"failing {arg} times on purpose")
    if kind == "sleep":
        time.sleep(float(arg))
    if kind == "hang":  # ignores the soft time limit: only the hard limit stops it
        deadline = time.time() + float(arg)
        while time.time() < deadline:
            try:
                time.sleep(0.05)
            except SoftTimeLimitExceeded:
                continue
    if kind == "kill" and _count(key) <= int(arg):
        os.kill(os.getpid(), signal.SIGKILL)


def await_siblings(saga_id: str, name: str, count: int) -> None:
    """Return once every other step of this step's stage has started (or after the wait)."""
    deadline = time.monotonic() + SIBLING_WAIT_S
    while time.monotonic() < deadline:
        steps = sagas.run(saga_id).status().steps
        stage = next(s.stage for s in steps if (s.name, s.count) == (name, count))
        if all(s.status != "pending" for s in steps
               if s.stage == stage and (s.name, s.count) != (name, count)):
            return
        time.sleep(0.01)


def run_step(name: str, result: Any) -> Any:
    ctx = current_step()
    params = ctx.params if isinstance(ctx.params, dict) else {}
    record(ctx.saga_id, kind="step_start", step=name, attempt=ctx.attempt,
           key=ctx.idempotency_key)
    mode = params.get("fail", {}).get(name)
    if mode is not None:
        await_siblings(ctx.saga_id, name, ctx.count)
    behave(mode, f"{ctx.saga_id}:{name}")
    if mode == "unserializable":
        return object()
    record(ctx.saga_id, kind="step_done", step=name, attempt=ctx.attempt,
           key=ctx.idempotency_key)
    return result


def compensate(name: str, ctx: RollbackContext) -> None:
    params = ctx.params if isinstance(ctx.params, dict) else {}
    record(ctx.saga_id, kind="rollback_start", step=name, attempt=ctx.attempt,
           output=ctx.output, error=ctx.error, key=ctx.idempotency_key)
    behave(params.get("rollback_fail", {}).get(name), f"{ctx.saga_id}:rb:{name}")
    record(ctx.saga_id, kind="rollback_done", step=name, attempt=ctx.attempt,
           key=ctx.idempotency_key)


@sagas.step(name="shop.reserve", retries=FAST, timeout="5 seconds")
def reserve(sku: str, qty: int) -> dict[str, Any]:
    return run_step("shop.reserve", {"reservation": f"r-{sku}-{qty}"})  # type: ignore[no-any-return]


@reserve.rollback(retries=FAST, timeout="5 seconds")
def release(ctx: RollbackContext) -> None:
    compensate("shop.reserve", ctx)


@sagas.step(name="shop.charge", retries=FAST, timeout="5 seconds")
def charge(reservation: dict[str, Any], amount: int) -> dict[str, Any]:
    return run_step("shop.charge", {"charge": f"c-{amount}", "for": reservation})  # type: ignore[no-any-return]


@charge.rollback(retries=FAST, timeout="5 seconds")
def refund(ctx: RollbackContext) -> None:
    compensate("shop.charge", ctx)


@sagas.step(name="shop.ticket", retries=FAST, timeout="5 seconds")
def ticket(previous: Any) -> dict[str, Any]:
    return run_step("shop.ticket", {"ticket": "t-1"})  # type: ignore[no-any-return]


@ticket.rollback(retries=FAST, timeout="5 seconds")
def close_ticket(ctx: RollbackContext) -> None:
    compensate("shop.ticket", ctx)


@sagas.step(name="shop.notify", retries=FAST, timeout="5 seconds")
def notify(previous: Any) -> str:
    """A step without a rollback: never compensated."""
    return run_step("shop.notify", "sent")  # type: ignore[no-any-return]


@sagas.step(name="shop.slow", retries={"limit": 0}, timeout="1 second")
def slow(previous: Any) -> str:
    """One attempt of at most a second (Celery soft limit 1 s, hard limit 3 s)."""
    return run_step("shop.slow", "slow-done")  # type: ignore[no-any-return]


@slow.rollback(retries=FAST, timeout="5 seconds")
def undo_slow(ctx: RollbackContext) -> None:
    compensate("shop.slow", ctx)


@sagas.step(name="shop.linear", retries=FAST, timeout="5 seconds")
def linear(previous: Any = None) -> str:
    return run_step("shop.linear", "linear")  # type: ignore[no-any-return]


@linear.rollback(retries={"limit": 3, "delay": 300, "backoff": "linear"}, timeout="5 seconds")
def undo_linear(ctx: RollbackContext) -> None:
    compensate("shop.linear", ctx)


@sagas.step(name="shop.exponential", retries=FAST, timeout="5 seconds")
def exponential(previous: Any = None) -> str:
    return run_step("shop.exponential", "exponential")  # type: ignore[no-any-return]


@exponential.rollback(retries={"limit": 3, "delay": 200, "backoff": "exponential"},
                      timeout="5 seconds")
def undo_exponential(ctx: RollbackContext) -> None:
    compensate("shop.exponential", ctx)


order = sagas.saga("order", [reserve.s("sku-1", 2), charge.s(amount=100), ticket.s()])
order_continue = sagas.saga("order-continue",
                            [reserve.s("sku-1", 2), charge.s(amount=100), ticket.s()],
                            on_rollback_error="continue")
order_parallel_rollback = sagas.saga("order-parallel-rollback",
                                     [reserve.s("sku-1", 2), charge.s(amount=100), ticket.s()],
                                     rollback_mode="parallel")
fan_out = sagas.saga("fan-out", [reserve.s("sku-1", 1), group(charge.s(amount=5), slow.s()),
                                 notify.s()])
with_slow = sagas.saga("with-slow", [reserve.s("sku-1", 1), slow.s()])
backoffs = sagas.saga("backoffs", [linear.s(), exponential.s(), ticket.s()])
