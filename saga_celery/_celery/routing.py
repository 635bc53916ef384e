"""Queues and routing: steps to one queue, rollbacks and coordination to another; and the
Redis transport settings saga messages depend on (restore period, visibility timeout)."""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery
from kombu import Exchange, Queue

from saga_celery._celery.control import CONTROL_KEY
from saga_celery._celery.tasks import TIME_LIMIT_GRACE_S
from saga_celery._core.config import StepConfig
from saga_celery._errors import SagaConfigError

log = structlog.get_logger("saga_celery")

RESTORE_DEFAULTS = {
    # kombu's defaults (10 s x 10 throttle, 300 s mutex) leave a killed worker's messages
    # unrestored for ~100 s after the visibility timeout; these keep it to seconds.
    "unacked_restore_interval": 2,
    "unacked_restore_throttle": 1,
    "unacked_mutex_expire": 30,
}


class SagaRouter:
    """A ``task_routes`` router: per-step queues first, then by kind of saga message."""

    def __init__(self, steps_queue: str, rollbacks_queue: str) -> None:
        self.steps_queue = steps_queue
        self.rollbacks_queue = rollbacks_queue
        self.step_tasks: set[str] = set()
        self.rollback_tasks: set[str] = set()
        self.explicit: dict[str, str] = {}
        self.priorities: dict[str, int] = {}
        """A saga task's own ``priority=``: ``send_task`` applies it only from Celery 5.7 on."""

    def __call__(self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None,
                 **_: Any) -> dict[str, Any] | None:
        route: dict[str, Any] | None = self._queue(name, kwargs)
        if route is not None and name in self.priorities:
            route["priority"] = self.priorities[name]
        return route

    def _queue(self, name: str, kwargs: Any) -> dict[str, Any] | None:
        if name in self.explicit:
            return {"queue": self.explicit[name]}
        if name in self.rollback_tasks:
            return {"queue": self.rollbacks_queue}
        if name in self.step_tasks:
            return {"queue": self.steps_queue}
        control = kwargs.get(CONTROL_KEY) if isinstance(kwargs, dict) else None
        if isinstance(control, dict):
            kind = control.get("kind")
            return {"queue": self.rollbacks_queue if kind == "rollback" else self.steps_queue}
        return None


def configure(app: Celery, router: SagaRouter) -> None:
    """Install the router and queues, and shorten kombu's unacked-restore period."""
    conf = app.conf
    existing = conf.task_routes
    if existing is None:
        routes: tuple[Any, ...] = ()
    elif isinstance(existing, list | tuple):
        routes = tuple(existing)
    else:
        routes = (existing,)
    conf.task_routes = (router, *routes)
    queues = list(conf.task_queues or [_queue(conf.task_default_queue)])
    names = {q.name for q in queues}
    for name in (router.steps_queue, router.rollbacks_queue):
        if name not in names:
            queues.append(_queue(name))
    conf.task_queues = queues
    restore_defaults(app)


def restore_defaults(app: Celery) -> None:
    """Shorten kombu's unacked-restore period, keeping every option the user set.

    Run again when a worker starts: ``broker_transport_options`` assigned after ``SagaApp()``
    replaced what ``configure`` set."""
    options = dict(app.conf.broker_transport_options or {})
    for key, value in RESTORE_DEFAULTS.items():
        options.setdefault(key, value)
    app.conf.broker_transport_options = options


def restore_options_read() -> bool:
    """Whether kombu's Redis transport reads ``unacked_restore_interval`` and
    ``unacked_restore_throttle`` (kombu 5.7 on).  Before, it sweeps every 10 s and scans Redis
    on every 10th sweep whatever is set: a dead worker's messages come back up to ~100 s after
    the visibility timeout, not ~2 s."""
    from kombu.transport import redis as kombu_redis

    return hasattr(kombu_redis.Channel, "unacked_restore_interval")


def warn_if_restore_is_slow(app: Celery) -> None:
    """At worker start: one warning line when kombu ignores the restore period options."""
    if visibility_timeout(app) is None or restore_options_read():
        return
    import kombu

    log.warning("saga.restore_period_fixed", kombu=kombu.__version__,
                reason="kombu before 5.7 ignores unacked_restore_interval and "
                       "unacked_restore_throttle: a dead worker's messages come back up to "
                       "~100 s after the visibility timeout, not ~2 s; upgrade kombu to 5.7")


def _queue(name: str) -> Queue:
    """A direct queue bound the way Celery binds the queues it creates itself."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def visibility_timeout(app: Celery) -> float | None:
    """The Redis transport's visibility timeout, or None for brokers without one."""
    url = str(app.conf.broker_url or "")
    if not url.startswith(("redis://", "rediss://", "sentinel://", "redis+socket://")):
        return None
    return float((app.conf.broker_transport_options or {}).get("visibility_timeout", 3600))


def check_visibility_timeout(app: Celery, owner: str, config: StepConfig) -> None:
    """Refuse (``SagaConfigError``) a saga task whose running attempt Redis would redeliver:
    its timeout plus hard-limit grace must stay below the visibility timeout.  Retry delays
    are not limited: one longer than ``max_countdown`` waits as a timer in the saga store
    (SPEC section 8).  The one home of this rule: decoration and worker start call it.
    """
    limit = visibility_timeout(app)
    longest = config.timeout.total_seconds() + TIME_LIMIT_GRACE_S
    if limit is not None and longest >= limit:
        raise SagaConfigError(
            f"{owner!r}: its timeout plus hard-limit grace ({longest:g} s) must stay below "
            f"the Redis transport's visibility_timeout ({limit:g} s), or Redis redelivers "
            "the message of a running attempt. Lower timeout, or raise "
            "broker_transport_options['visibility_timeout'].", step=owner)
