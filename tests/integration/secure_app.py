"""The Celery app the security and bad-input integration tests run in a real worker.

Configured from the environment, so one module serves every setup:

- ``SAGA_SECURE_URL``: broker and saga state, possibly as a Redis ACL user
  (``redis://saga:<password>@127.0.0.1:<port>/0``).
- ``SAGA_SECURE_SIGNING``: a directory holding ``key.pem``, ``cert.pem`` and ``certs/``; when
  set, every message is signed with Celery's ``auth`` serializer and only signed ones run.
- ``SAGA_SECURE_QUEUES``: the prefix of the app's queue names (default ``saga``: Celery's and
  saga_celery's default names, ``celery``, ``saga.steps`` and ``saga.rollbacks``).

Step outputs and rollback outcomes are read back from the saga's state: no ledger keys, so
the ACL user needs nothing outside the saga and Celery key spaces.  What ``secure.charge``
does is chosen by the saga's params: ``{"fail": true}`` raises ``NonRetryableError`` and
``{"big": n}`` returns an output of ``n`` bytes, ``{"sleep": s}`` sleeps ``s`` seconds first.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from celery import Celery

from saga_celery import NonRetryableError, RollbackContext, SagaApp, current_step
from tests.integration.harness import import_copy

URL = os.environ.get("SAGA_SECURE_URL", "redis://127.0.0.1:6379/14")
SIGNING = os.environ.get("SAGA_SECURE_SIGNING")
QUEUES = os.environ.get("SAGA_SECURE_QUEUES", "saga")

app = Celery("secure", broker=URL)
app.conf.update(
    broker_transport_options={"visibility_timeout": 30},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_default_queue="celery" if QUEUES == "saga" else f"{QUEUES}.default",
    worker_send_task_events=True,
    task_send_sent_event=True,
)
if SIGNING:
    keys = Path(SIGNING)
    app.conf.update(
        security_key=str(keys / "key.pem"),
        security_certificate=str(keys / "cert.pem"),
        security_cert_store=str(keys / "certs" / "*.pem"),
        security_digest="sha256",
        task_serializer="auth",
        event_serializer="auth",
        accept_content=["auth"],
    )
    app.setup_security()

sagas = SagaApp(app, redis_url=URL, steps_queue=f"{QUEUES}.steps",
                rollbacks_queue=f"{QUEUES}.rollbacks", lease_ttl="3 seconds")

ONCE = {"limit": 0}


@sagas.step(name="secure.reserve", retries=ONCE, timeout="10 seconds")
def reserve(sku: str) -> dict[str, Any]:
    return {"reservation": f"r-{sku}"}


@reserve.rollback(retries=ONCE, timeout="10 seconds")
def release(ctx: RollbackContext) -> None:
    assert ctx.output == {"reservation": "r-sku-1"}, ctx.output


@sagas.step(name="secure.charge", retries=ONCE, timeout="10 seconds")
def charge(reservation: dict[str, Any], amount: int) -> Any:
    params = current_step().params
    params = params if isinstance(params, dict) else {}
    time.sleep(float(params.get("sleep", 0)))
    if params.get("fail"):
        raise NonRetryableError("card declined")
    if params.get("big"):
        return "x" * int(params["big"])
    return {"charge": f"c-{amount}", "for": reservation}


@charge.rollback(retries=ONCE, timeout="10 seconds")
def refund(ctx: RollbackContext) -> None:
    return None


order = sagas.saga("secure-order", [reserve.s("sku-1"), charge.s(amount=100)])


def configured(env: dict[str, str]) -> ModuleType:
    """A fresh copy of this module set up by ``env``, with its own Celery and saga apps.

    Tests use it as the client of a worker started with the same ``env``; each copy reads
    the environment once, as the worker does.
    """
    return import_copy(__file__, f"secure_app_{uuid.uuid4().hex}", env)
