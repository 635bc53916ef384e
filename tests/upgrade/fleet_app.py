"""The saga app of the rolling-upgrade test, the same module for every release's workers.

It uses only what 0.1.0 already had, so workers of the previous release and of this one
import it alike (the test copies it beside neither release's code).  Three steps, each with
a rollback; every body applies its effect at most once per idempotency key, in a ledger on
the same Redis, so a doubled effect (one (kind, step, count) applied under two keys, as a
key changing mid-saga would cause) is visible.

Shapes, by the saga id's prefix: ``ok-*`` completes; ``fail-*`` fails for good at the last
step and rolls back the other two; ``flaky-*`` fails the second step's first attempt (retried
after a second) and completes.  Every body takes ``STEP_S`` seconds, so sagas are in flight
while workers are replaced.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import redis
from celery import Celery

from saga_celery import NonRetryableError, RollbackContext, SagaApp, current_step

URL = os.environ["UPGRADE_REDIS_URL"]
PREFIX = os.environ.get("UPGRADE_PREFIX", "upgrade:")
STEP_S = 0.3

app = Celery("upgrade", broker=URL)
app.conf.update(broker_transport_options={"visibility_timeout": 30},
                worker_prefetch_multiplier=1, task_default_queue="upgrade.default")
_options: dict[str, Any] = {}
if "SAGA_WRITE_FORMAT" in os.environ:  # a release that has the setting
    _options["write_format"] = int(os.environ["SAGA_WRITE_FORMAT"])
sagas = SagaApp(app, redis_url=URL, prefix=PREFIX, lease_ttl="3 seconds",
                steps_queue="upgrade.steps", rollbacks_queue="upgrade.rollbacks", **_options)
ledger = redis.Redis.from_url(URL)
RETRIES = {"limit": 2, "delay": "1 second", "backoff": "constant"}


def applied_key(saga_id: str) -> str:
    return f"upgrade-applied:{PREFIX}{saga_id}"


def apply(saga_id: str, slot: str, key: str) -> None:
    """Apply ``slot``'s effect once per idempotency key; remember each key it was applied by."""
    if ledger.hsetnx(f"upgrade-fx:{PREFIX}{saga_id}", key, slot):
        ledger.rpush(applied_key(saga_id), json.dumps([slot, key]))


def body(name: str) -> Any:
    ctx = current_step()
    time.sleep(STEP_S)
    shape = ctx.saga_id.split("-")[0]
    if shape == "fail" and name == "upgrade.c":
        raise NonRetryableError("declined")
    runs = ledger.incr(f"upgrade-runs:{PREFIX}{ctx.saga_id}:{name}")
    if shape == "flaky" and name == "upgrade.b" and runs == 1:
        raise RuntimeError("flaky, once")
    apply(ctx.saga_id, f"step:{ctx.step}:{ctx.count}", ctx.idempotency_key)
    return {"done": name}


def undo(ctx: RollbackContext) -> None:
    time.sleep(STEP_S)
    apply(ctx.saga_id, f"rollback:{ctx.step}:{ctx.count}", ctx.idempotency_key)


@sagas.step(name="upgrade.a", retries=RETRIES, timeout="10 seconds")
def a() -> Any:
    return body("upgrade.a")


@a.rollback(retries=RETRIES, timeout="10 seconds")
def undo_a(ctx: RollbackContext) -> None:
    undo(ctx)


@sagas.step(name="upgrade.b", retries=RETRIES, timeout="10 seconds")
def b(previous: Any) -> Any:
    return body("upgrade.b")


@b.rollback(retries=RETRIES, timeout="10 seconds")
def undo_b(ctx: RollbackContext) -> None:
    undo(ctx)


@sagas.step(name="upgrade.c", retries=RETRIES, timeout="10 seconds")
def c(previous: Any) -> Any:
    return body("upgrade.c")


@c.rollback(retries=RETRIES, timeout="10 seconds")
def undo_c(ctx: RollbackContext) -> None:
    undo(ctx)


order = sagas.saga("upgrade-order", [a.s(), b.s(), c.s()])


def submit(saga_ids: list[str]) -> None:
    for saga_id in saga_ids:
        order.apply_async(saga_id=saga_id, params={"shape": saga_id.split("-")[0]})


if __name__ == "__main__":  # a caller of whichever release runs this file
    submit(sys.argv[1:])
