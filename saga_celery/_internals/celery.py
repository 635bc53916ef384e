"""Every private name of Celery that saga_celery uses: one, probed, with a public fallback.

- ``celery.task_settings``: which task attributes Celery fills in from ``app.conf`` when it
  binds a task, and from which setting (``Task.from_config``, undocumented).  Wrapping an
  existing Celery task, the library keeps the options its author set and drops the ones
  Celery filled in.  Public path: the pairs of Celery 5's documented ``task_*`` settings,
  which a Celery that fills in more attributes would not name (those would then be passed
  on to the saga task unchanged: the same values, set twice).

The rest of what the library needs from Celery it takes publicly: ``Request.message``, the
``subtask_type`` of a signature, ``celery.local.maybe_evaluate``.
"""

from __future__ import annotations

from functools import cache
from typing import TypeGuard

from celery import Task

from saga_celery._internals import fall_back, fast_paths_allowed

TASK_SETTINGS = "celery.task_settings"

CELERY_5_TASK_SETTINGS: tuple[tuple[str, str], ...] = (
    ("serializer", "task_serializer"),
    ("rate_limit", "task_default_rate_limit"),
    ("priority", "task_default_priority"),
    ("time_limit", "task_time_limit"),
    ("soft_time_limit", "task_soft_time_limit"),
    ("track_started", "task_track_started"),
    ("acks_late", "task_acks_late"),
    ("acks_on_failure_or_timeout", "task_acks_on_failure_or_timeout"),
    ("acks_on_failure", "task_acks_on_failure"),
    ("acks_on_timeout", "task_acks_on_timeout"),
    ("reject_on_worker_lost", "task_reject_on_worker_lost"),
    ("retry_on_worker_lost", "task_retry_on_worker_lost"),
    ("ignore_result", "task_ignore_result"),
    ("store_eager_result", "task_store_eager_result"),
    ("store_errors_even_if_ignored", "task_store_errors_even_if_ignored"),
)
"""(task attribute, setting) for the settings Celery 5 documents as task defaults (5.7's
list: a setting an older Celery lacks reads as None, which drops only an unset option)."""


@cache
def task_settings() -> tuple[tuple[str, str], ...]:
    """(task attribute, setting) for each attribute Celery fills in from ``app.conf``."""
    if not fast_paths_allowed():
        return CELERY_5_TASK_SETTINGS
    found = getattr(Task, "from_config", None)
    if not _pairs(found):
        fall_back(TASK_SETTINGS, "Task.from_config is not Celery 5's (attribute, setting) pairs")
        return CELERY_5_TASK_SETTINGS
    return found


def _pairs(value: object) -> TypeGuard[tuple[tuple[str, str], ...]]:
    """Whether ``value`` is a tuple of (str, str) pairs."""
    return isinstance(value, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 and all(isinstance(s, str) for s in p)
        for p in value)
