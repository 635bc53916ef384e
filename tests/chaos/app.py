"""The Celery app of the chaos run: saga steps whose effects land in a ledger, once per key.

Every step body and rollback body does a little work (a short sleep), then applies its
*effect*: one Lua script that marks the body's idempotency key as applied in the saga's
effects hash (``HSETNX``-style, with a per-saga sequence number giving the order effects
landed in) and counts, per key, how often a body got as far as applying it.  A body may run
twice after a worker dies (the same attempt is redelivered): that is allowed, and shows up
as a deduplicated application, never as a second effect.

What a saga does is chosen by its params (keys are ``"<step>#<count>"``)::

    {"fail": key | None,            # this step fails on every attempt: the saga rolls back
     "nonretryable": bool,          # ... by raising NonRetryableError (one attempt) instead
     "flaky": [key, ...],           # these steps fail their first attempt, then succeed
     "rollback_flaky": [key, ...]}  # these rollbacks fail their first attempt, then succeed

Ledger keys (all on the chaos run's private Redis, hash-tagged per saga)::

    chaos:{<id>}:effects   hash  idempotency key -> "<seq> <effect JSON>"
    chaos:{<id>}:seq       int   the saga's effect sequence
    chaos:{<id>}:applies   hash  idempotency key -> times a body reached its effect
    chaos:{<id>}:runs      hash  "<kind>|<step>#<count>|<attempt>" -> times a body started
    chaos:running          hash  pool pid -> what its body is doing right now

``CHAOS_REDIS_URL`` is the broker, the saga store and the ledger (default: a local port the
run never uses, so importing this by accident touches nothing).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import redis
import structlog
from celery import Celery, group

from saga_celery import NonRetryableError, RollbackContext, SagaApp, current_step

URL = os.environ.get("CHAOS_REDIS_URL", "redis://127.0.0.1:6699/0")
VISIBILITY_TIMEOUT_S = 15
"""Short, so a dead worker's unacknowledged messages come back within seconds."""
STEP_TIMEOUT = "4 seconds"
"""Per attempt, steps and rollbacks alike; the run's SIGSTOP lasts longer than this."""
WORK_S = float(os.environ.get("CHAOS_WORK_S", "0.2"))
"""A body sleeps a random time up to this before its effect: a kill often lands mid-body."""

SLEEP = "3 seconds"
EVENT = "approval"
EVENT_TIMEOUT = "6 seconds"
"""The run sends a ``chaos.approval`` saga its event early, twice, late (within 3 s of the
start) or never; never, the wait times out and the saga rolls back."""
HOLD_TIMEOUT = "4 seconds"

STEP_RETRIES = {"limit": 2, "delay": 200, "backoff": "constant"}
ROLLBACK_RETRIES = {"limit": 4, "delay": 200, "backoff": "constant"}

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

app = Celery("chaos", broker=URL)
app.conf.update(
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,  # Redis restarts mid-run: never give up reconnecting
    worker_prefetch_multiplier=1,
    task_default_queue="chaos.default",
)
sagas = SagaApp(app, redis_url=URL, lease_ttl="3 seconds", recovery_interval="2 seconds",
                recovery_grace="5 seconds")
ledger = redis.Redis.from_url(URL, socket_timeout=5, socket_connect_timeout=2)

RUNNING_KEY = "chaos:running"
_APPLY = ledger.register_script("""
-- KEYS[1] effects hash, KEYS[2] effect sequence, KEYS[3] applies hash (all of one saga)
-- ARGV[1] idempotency key, ARGV[2] the effect's JSON
-- Returns the effect's sequence number, or 0 when the key's effect was already applied.
redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], seq .. ' ' .. ARGV[2])
return seq
""")


def ledger_key(saga_id: str, what: str) -> str:
    """One of a saga's ledger keys: ``effects``, ``seq``, ``applies`` or ``runs``."""
    return f"chaos:{{{saga_id}}}:{what}"


def apply_effect(saga_id: str, idempotency_key: str, effect: dict[str, Any]) -> int:
    """Apply an effect once per idempotency key; 0 if it had been applied already."""
    keys = [ledger_key(saga_id, w) for w in ("effects", "seq", "applies")]
    payload = json.dumps({**effect, "pid": os.getpid(), "t": time.time()})
    return int(_APPLY(keys=keys, args=[idempotency_key, payload]))


@contextmanager
def body_running(saga_id: str, kind: str, key: str, attempt: int) -> Iterator[None]:
    """Count this body run, and say what this pool process is doing while it runs."""
    ledger.hincrby(ledger_key(saga_id, "runs"), f"{kind}|{key}|{attempt}", 1)
    ledger.hset(RUNNING_KEY, str(os.getpid()),
                json.dumps({"saga_id": saga_id, "kind": kind, "key": key, "t": time.time()}))
    try:
        time.sleep(random.uniform(0, WORK_S))
        yield
    finally:
        with suppress(redis.RedisError):
            ledger.hdel(RUNNING_KEY, str(os.getpid()))


def _params(params: Any) -> dict[str, Any]:
    return params if isinstance(params, dict) else {}


def run_step(name: str) -> dict[str, Any]:
    """A step body: fail as the params say, else apply the step's effect."""
    ctx = current_step()
    key = f"{name}#{ctx.count}"
    params = _params(ctx.params)
    with body_running(ctx.saga_id, "step", key, ctx.attempt):
        if params.get("fail") == key:
            if params.get("nonretryable"):
                raise NonRetryableError(f"{key} fails for good on purpose")
            raise RuntimeError(f"{key} fails on purpose")
        if key in params.get("flaky", ()) and ctx.attempt == 1:
            raise RuntimeError(f"{key} fails its first attempt on purpose")
        apply_effect(ctx.saga_id, ctx.idempotency_key,
                     {"kind": "step", "step": name, "count": ctx.count, "attempt": ctx.attempt})
    return {"step": name, "count": ctx.count, "key": ctx.idempotency_key}


def compensate(name: str, ctx: RollbackContext) -> None:
    """A rollback body: undo the step by its key (whatever its output), failing as told."""
    key = f"{name}#{ctx.count}"
    params = _params(ctx.params)
    with body_running(ctx.saga_id, "rollback", key, ctx.attempt):
        if key in params.get("rollback_flaky", ()) and ctx.attempt == 1:
            raise RuntimeError(f"rollback of {key} fails its first attempt on purpose")
        output = ctx.output if isinstance(ctx.output, dict) else None
        apply_effect(ctx.saga_id, ctx.idempotency_key,
                     {"kind": "rollback", "step": name, "count": ctx.count,
                      "attempt": ctx.attempt, "output_key": output and output.get("key")})


def _step(name: str, *, with_rollback: bool = True) -> Any:
    """Declare step ``chaos.<name>`` (and its rollback) with the run's short configs."""
    full = f"chaos.{name}"

    def body(previous: Any = None) -> dict[str, Any]:
        return run_step(full)

    body.__name__ = body.__qualname__ = name
    task = sagas.step(body, name=full, retries=STEP_RETRIES, timeout=STEP_TIMEOUT)
    if with_rollback:

        def undo(ctx: RollbackContext) -> None:
            compensate(full, ctx)

        undo.__name__ = undo.__qualname__ = f"undo_{name}"
        task.rollback(retries=ROLLBACK_RETRIES, timeout=STEP_TIMEOUT)(undo)
    return task


reserve = _step("reserve")
charge = _step("charge")
ship = _step("ship")
email = _step("email", with_rollback=False)
pack_a = _step("pack_a")
pack_b = _step("pack_b")
pack_c = _step("pack_c", with_rollback=False)

SAGAS = {
    "chaos.linear": sagas.saga("chaos.linear",
                               [reserve.s(), charge.s(), ship.s(), email.s()]),
    "chaos.fanout": sagas.saga("chaos.fanout",
                               [reserve.s(), group(pack_a.s(), pack_b.s(), pack_c.s()),
                                charge.s(), email.s()]),
    "chaos.repeat": sagas.saga("chaos.repeat",
                               [reserve.s(), charge.s(), reserve.s(), ship.s()]),
    "chaos.sleepy": sagas.saga("chaos.sleepy",
                               [reserve.s(), sagas.sleep(SLEEP, name="cool-off"), charge.s(),
                                email.s()]),
    "chaos.approval": sagas.saga("chaos.approval",
                                 [reserve.s(), sagas.wait_for_event(EVENT, timeout=EVENT_TIMEOUT,
                                                                    name="approval"),
                                  ship.s()]),
    "chaos.held": sagas.saga("chaos.held", [reserve.s(), charge.s(), ship.s()],
                             on_failure="hold", hold_timeout=HOLD_TIMEOUT),
}
"""The saga shapes the run mixes: sequential, a parallel stage, a step used twice; and
sagas that wait (SPEC section 8): a sleep, a wait for an event the run sends at a random
time (or never: it times out and rolls back), and a saga that holds when a step fails for
good, until its hold timeout rolls it back."""
