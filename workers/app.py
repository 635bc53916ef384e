"""The deployable Celery app: saga steps and rollbacks on ordinary Celery workers.

Every setting comes from a ``SAGA_*`` environment variable (see ``WorkerSettings``).  The
fleet's processes, started from the repository root (or the image's working directory)::

    celery -A workers.app worker -Q saga.steps       # the step pool: forward steps
    celery -A workers.app worker -Q saga.rollbacks   # the rollback pool: rollbacks, recovery
    celery -A workers.app beat                       # exactly one: the recovery sweep's clock
    celery -A workers.app flower                     # basic auth from SAGA_FLOWER_USER/PASSWORD

``celery -A workers.app worker`` with no ``-Q`` consumes every saga queue (one pool for
everything).  Every saga lifecycle event is logged as one JSON line on standard output.
"""

from __future__ import annotations

import importlib
import os
from datetime import timedelta

from celery import Celery

from saga_celery import SagaApp
from workers.logs import configure_logging
from workers.settings import DEFAULT_REDIS_URL, WorkerSettings
from workers.state import state_options

__all__ = [
    "DEFAULT_REDIS_URL",
    "WorkerSettings",
    "app",
    "configure_logging",
    "create_app",
    "export_flower_auth",
    "sagas",
    "settings",
]


def create_app(settings: WorkerSettings) -> tuple[Celery, SagaApp]:
    """The Celery app with the recommended settings, and saga support on it."""
    celery_app = Celery("saga_workers", broker=settings.broker_url, set_as_current=True)
    celery_app.conf.update(
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        # A task whose worker dies is redelivered, not lost (saga tasks set this themselves).
        task_acks_late=True,
        # One message reserved per pool process: a long step never holds others hostage.
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Events for Flower: sent, received, started, succeeded, failed, retried.
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
    )
    if settings.broker_url.startswith("rediss://"):
        celery_app.conf.broker_use_ssl = settings.tls_options()
    if settings.redis_url.startswith("rediss://"):
        celery_app.conf.redis_backend_use_ssl = settings.tls_options()
    saga_app = SagaApp(celery_app, **state_options(settings), prefix=settings.prefix,
                       steps_queue=settings.steps_queue,
                       rollbacks_queue=settings.rollbacks_queue,
                       recovery_interval=timedelta(seconds=settings.recovery_interval),
                       write_format=settings.write_format)
    return celery_app, saga_app


def export_flower_auth(settings: WorkerSettings) -> None:
    """Hand the basic-auth credentials to ``celery -A workers.app flower``.

    Flower reads its ``FLOWER_*`` variables after Celery has imported this module, so one
    set here is seen; one the operator set (``FLOWER_BASIC_AUTH``) wins.
    """
    credentials = settings.flower_basic_auth
    if credentials is not None:
        os.environ.setdefault("FLOWER_BASIC_AUTH", credentials)


settings = WorkerSettings.from_env()
configure_logging()
app, sagas = create_app(settings)
export_flower_auth(settings)

# Last: these modules declare their steps with `from workers.app import sagas`.
for _module in settings.imports:
    importlib.import_module(_module)
