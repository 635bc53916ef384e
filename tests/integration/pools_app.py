"""A tiny saga app for pools without Celery time limits (solo, threads), run by real workers.

Its own Celery app name and queues (``pools.*``), so it never shares queues with ``shop.py``.
A step's behaviour comes from the saga's params: ``{"stall": "sleep:S" | "loop:S"}`` makes
``pools.stall`` block in one ``time.sleep(S)`` call, or loop in 50 ms sleeps for S seconds.
Steps and rollbacks append what they did to a Redis ledger (a list per saga).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from saga_celery import RollbackContext, SagaApp, current_step

URL = os.environ.get("SAGA_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
PREFIX = os.environ.get("SAGA_TEST_PREFIX", "saga:")
TIMEOUT_S = 1.0

app = Celery("pools", broker=URL)
app.conf.update(
    broker_transport_options={"visibility_timeout": 30},
    worker_prefetch_multiplier=1,
    task_default_queue="pools.default",
)
sagas = SagaApp(app, redis_url=URL, prefix=PREFIX, lease_ttl="3 seconds",
                steps_queue="pools.steps", rollbacks_queue="pools.rollbacks")
ledger = redis.Redis.from_url(URL)

QUICK = {"limit": 1, "delay": 200, "backoff": "constant"}


def ledger_key(saga_id: str) -> str:
    return f"pools-ledger:{PREFIX}{saga_id}"


def record(saga_id: str, **entry: Any) -> None:
    ledger.rpush(ledger_key(saga_id), json.dumps({**entry, "t": time.time()}))


def entries(saga_id: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in ledger.lrange(ledger_key(saga_id), 0, -1)]


def stall_for(mode: str) -> None:
    kind, _, seconds = mode.partition(":")
    if kind == "sleep":
        time.sleep(float(seconds))  # one blocking call, as a slow network call would block
        return
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        time.sleep(0.05)


@sagas.step(name="pools.reserve", retries=QUICK, timeout="5 seconds")
def reserve(sku: str) -> dict[str, str]:
    record(current_step().saga_id, kind="step_done", step="pools.reserve")
    return {"reservation": sku}


@reserve.rollback(retries=QUICK, timeout="5 seconds")
def release(ctx: RollbackContext) -> None:
    record(ctx.saga_id, kind="rollback_done", step="pools.reserve", output=ctx.output)


@sagas.step(name="pools.stall", retries={"limit": 0, "delay": 200}, timeout=TIMEOUT_S * 1000)
def stall(reservation: dict[str, str]) -> str:
    ctx = current_step()
    record(ctx.saga_id, kind="step_start", step="pools.stall")
    params = ctx.params if isinstance(ctx.params, dict) else {}
    stall_for(str(params.get("stall", "sleep:0")))
    record(ctx.saga_id, kind="step_done", step="pools.stall")
    return "stalled"


@stall.rollback(retries=QUICK, timeout="5 seconds")
def unstall(ctx: RollbackContext) -> None:
    record(ctx.saga_id, kind="rollback_done", step="pools.stall", output=ctx.output,
           error=ctx.error)


@sagas.step(name="pools.swallow", retries={"limit": 0, "delay": 200}, timeout=TIMEOUT_S * 1000)
def swallow(reservation: dict[str, str]) -> str:
    """Careless code: ``except Exception`` around the work also swallows the timeout (the
    alarm on solo, SoftTimeLimitExceeded on prefork) and returns as if all went well."""
    ctx = current_step()
    try:
        stall_for("sleep:3")
    except Exception as exc:
        record(ctx.saga_id, kind="swallowed", step="pools.swallow", error=type(exc).__name__)
    return "swallowed"


@swallow.rollback(retries=QUICK, timeout="5 seconds")
def unswallow(ctx: RollbackContext) -> None:
    record(ctx.saga_id, kind="rollback_done", step="pools.swallow", output=ctx.output)


reserve_then_stall = sagas.saga("reserve-then-stall", [reserve.s("sku-1"), stall.s()])
reserve_then_swallow = sagas.saga("reserve-then-swallow", [reserve.s("sku-1"), swallow.s()])
