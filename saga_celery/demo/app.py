"""The demo's Celery app: the shop's saga, run by ``celery -A saga_celery.demo.app worker``.

The demo's worker subprocess and the process that places the orders both import this module,
so its settings come from the environment: ``SAGA_REDIS_URL`` (saga state and the shop's
ledger; default ``redis://127.0.0.1:6379/0``), ``SAGA_BROKER_URL`` (default the Redis URL),
``SAGA_STEPS_QUEUE``, ``SAGA_ROLLBACKS_QUEUE`` and ``SAGA_VISIBILITY_TIMEOUT`` (seconds).
"""

from __future__ import annotations

import os

from celery import Celery

from saga_celery import SagaApp
from saga_celery.demo.shop import declare_shop

__all__ = ["app", "sagas", "shop"]

REDIS_URL = os.environ.get("SAGA_REDIS_URL") or "redis://127.0.0.1:6379/0"
VISIBILITY_TIMEOUT_S = int(os.environ.get("SAGA_VISIBILITY_TIMEOUT") or 60)
"""Short, so Redis redelivers quickly what a lost worker held; still above every retry delay
plus timeout of the shop's steps (checked when they are declared)."""

app = Celery("saga_demo", broker=os.environ.get("SAGA_BROKER_URL") or REDIS_URL)
app.conf.update(
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)
sagas = SagaApp(app, redis_url=REDIS_URL,
                steps_queue=os.environ.get("SAGA_STEPS_QUEUE") or "saga.steps",
                rollbacks_queue=os.environ.get("SAGA_ROLLBACKS_QUEUE") or "saga.rollbacks")
shop = declare_shop(sagas, REDIS_URL)
