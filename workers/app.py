"""The deployable Celery app: saga steps and rollbacks on ordinary Celery workers.

Start workers from the repository root (the settings come from the environment, see
``WorkerSettings``)::

    celery -A workers.app worker                     # every saga queue
    celery -A workers.app worker -Q saga.steps       # forward steps only
    celery -A workers.app worker -Q saga.rollbacks   # rollbacks and coordination only

Every saga lifecycle event is logged as one JSON line on the worker's standard output.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import structlog
from celery import Celery

from saga_celery import SagaApp

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    """What a worker deployment is configured with (read from ``SAGA_*`` variables)."""

    redis_url: str = DEFAULT_REDIS_URL
    """Saga state (``SAGA_REDIS_URL``)."""
    broker_url: str = DEFAULT_REDIS_URL
    """Celery's broker (``SAGA_BROKER_URL``; defaults to ``redis_url``)."""
    steps_queue: str = "saga.steps"
    """Queue of forward steps (``SAGA_STEPS_QUEUE``)."""
    rollbacks_queue: str = "saga.rollbacks"
    """Queue of rollbacks and coordination (``SAGA_ROLLBACKS_QUEUE``)."""
    imports: tuple[str, ...] = ("workers.shop",)
    """Modules that declare sagas (``SAGA_IMPORTS``, comma-separated)."""
    visibility_timeout: int = 3600
    """The Redis transport's visibility timeout in seconds (``SAGA_VISIBILITY_TIMEOUT``)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        """Settings from ``environ`` (default ``os.environ``); unset or empty means default."""
        env = {k: v for k, v in (os.environ if environ is None else environ).items() if v}
        redis_url = env.get("SAGA_REDIS_URL", DEFAULT_REDIS_URL)
        imports = env.get("SAGA_IMPORTS", "workers.shop")
        return cls(
            redis_url=redis_url,
            broker_url=env.get("SAGA_BROKER_URL", redis_url),
            steps_queue=env.get("SAGA_STEPS_QUEUE", "saga.steps"),
            rollbacks_queue=env.get("SAGA_ROLLBACKS_QUEUE", "saga.rollbacks"),
            imports=tuple(m.strip() for m in imports.split(",") if m.strip()),
            visibility_timeout=_seconds(env.get("SAGA_VISIBILITY_TIMEOUT", "3600")),
        )


def _seconds(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"SAGA_VISIBILITY_TIMEOUT must be a positive number of seconds, "
                         f"got {raw!r}")
    return value


def configure_logging() -> None:
    """Render every structlog event, saga lifecycle events included, as one JSON line.

    The stream is bound now, before a worker redirects ``sys.stdout`` into its own logger,
    so the lines stay plain JSON rather than wrapped in Celery's log format.  (A
    ``PrintLogger`` would not do: it prints to whatever ``sys.stdout`` is at the time.)
    """
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            # Not "timestamp": a lifecycle event has its own, which must not be overwritten.
            structlog.processors.TimeStamper(fmt="iso", key="logged_at"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
    )


def create_app(settings: WorkerSettings) -> tuple[Celery, SagaApp]:
    """The Celery app with the recommended settings, and saga support on it."""
    celery_app = Celery("saga_workers", broker=settings.broker_url, set_as_current=True)
    celery_app.conf.update(
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
    )
    saga_app = SagaApp(celery_app, redis_url=settings.redis_url,
                       steps_queue=settings.steps_queue,
                       rollbacks_queue=settings.rollbacks_queue)
    return celery_app, saga_app


settings = WorkerSettings.from_env()
configure_logging()
app, sagas = create_app(settings)

# Last: these modules declare their steps with `from workers.app import sagas`.
for _module in settings.imports:
    importlib.import_module(_module)
