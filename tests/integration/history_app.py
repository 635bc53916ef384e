"""The app of the history tests (SPEC section 11): the bench's five no-op steps, each with a
no-op rollback, in a real worker; ``history.fail`` fails every time (a rollback follows).

Environment: ``SAGA_TEST_REDIS_URL`` (broker and saga state), ``SAGA_TEST_PREFIX`` (saga key
prefix), ``SAGA_TEST_QUEUE_PREFIX`` (queues of its own), ``SAGA_TEST_ARCHIVE`` (a
``postgresql://`` URL: archive finished sagas there), ``SAGA_TEST_RETENTION`` (JSON: one
duration or one per outcome), ``SAGA_TEST_RECOVERY_GRACE``, ``SAGA_TEST_DIE_AFTER_END`` (a
pool process dies right after the commit that ends a saga).
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery

from saga_celery import NonRetryableError, RollbackContext, SagaApp

URL = os.environ.get("SAGA_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
PREFIX = os.environ.get("SAGA_TEST_PREFIX", "saga:")
QUEUES = os.environ.get("SAGA_TEST_QUEUE_PREFIX", "")
ARCHIVE = os.environ.get("SAGA_TEST_ARCHIVE") or None
RETENTION: Any = json.loads(os.environ.get("SAGA_TEST_RETENTION", '"7 days"'))
ledger = redis.Redis.from_url(URL)

if os.environ.get("SAGA_TEST_DIE_AFTER_END"):
    # A pool process dies the moment a saga's ending commit has landed, before the saga is
    # compacted or archived (and before its message is acknowledged).  Only in a worker's
    # pool process: the test imports this module too, and must not die with it.
    from celery.signals import worker_process_init

    from saga_celery._store.finisher import Finisher

    def _die(self: Finisher, saga_id: str) -> None:
        ledger.rpush(f"died:{PREFIX}", saga_id)
        os._exit(17)

    _imported_in = os.getpid()

    def _arm(**_: Any) -> None:
        # A forked pool process only: a test that sends worker_process_init in the process
        # that imported this module (the test run's own) must not arm it.
        if os.getpid() != _imported_in:
            Finisher.submit = _die  # type: ignore[method-assign]

    worker_process_init.connect(_arm, weak=False)

app = Celery("history_app", broker=URL)
app.conf.update(broker_connection_retry_on_startup=True, worker_prefetch_multiplier=1,
                task_default_queue=f"{QUEUES}history.default")
sagas = SagaApp(app, redis_url=URL, prefix=PREFIX, archive=ARCHIVE, retention=RETENTION,
                lease_ttl="3 seconds", steps_queue=f"{QUEUES}saga.steps",
                rollbacks_queue=f"{QUEUES}saga.rollbacks",
                recovery_grace=os.environ.get("SAGA_TEST_RECOVERY_GRACE", "60 seconds"))


def runs_key(name: str, order: int) -> str:
    """Counts the runs of step ``name`` of saga ``order``: a duplicate must not add one."""
    return f"runs:{PREFIX}{name}:{order}"


def _noop_step(name: str) -> Any:
    @sagas.step(name=f"history.{name}")
    def body(previous: Any = None, *, order: int = 0) -> dict[str, Any]:
        ledger.incr(runs_key(name, order))
        return {"step": name, "order": order}

    @body.rollback()
    def undo(ctx: RollbackContext) -> None:
        return None

    return body


STEPS = [_noop_step(n) for n in ("reserve", "charge", "pack", "ship", "notify")]


@sagas.step(name="history.fail")
def fail(previous: Any = None, *, order: int = 0) -> None:
    raise NonRetryableError(f"order {order} cannot be shipped")


def five(order: int = 0) -> Any:
    """The bench's shape: five steps in a row, each with a rollback."""
    return sagas.saga("history.five", [s.s(order=order) for s in STEPS])


def failing(order: int = 0) -> Any:
    """Four steps, then one that fails: four rollbacks run, the saga ends errored."""
    return sagas.saga("history.failing", [*(s.s(order=order) for s in STEPS[:4]),
                                          fail.s(order=order)])
