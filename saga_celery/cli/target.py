"""Which ``SagaApp`` a command works on, and the helpers every command shares.

``--app MODULE:ATTR`` imports the user's app; without it a bare ``SagaApp`` is built from the
URL and queue options.  Either is loaded on first use, so ``--help`` and usage errors need
no Redis.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import update_wrapper
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import click
import structlog
from celery import Celery

from saga_celery._celery.app import SagaApp
from saga_celery._core.durations import parse_duration

__all__ = ["DEFAULT_REDIS_URL", "Target", "load_app", "parse_duration_option", "quiet_logs",
           "redact", "with_sagas"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Target:
    """The command line's choice of ``SagaApp``, loaded on first use."""

    app_path: str | None = None
    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str | None = None
    prefix: str = "saga:"
    steps_queue: str = "saga.steps"
    rollbacks_queue: str = "saga.rollbacks"
    archive_url: str | None = None
    loaded: SagaApp | None = field(default=None, repr=False)

    def sagas(self) -> SagaApp:
        if self.loaded is None:
            self.loaded = load_app(self.app_path) if self.app_path else self._bare()
            quiet_logs()  # after the import: a user's app may configure structlog itself
        return self.loaded

    def _bare(self) -> SagaApp:
        celery = Celery("saga-celery", broker=self.broker_url or self.redis_url,
                        set_as_current=False)
        return SagaApp(celery, redis_url=self.redis_url, prefix=self.prefix,
                       steps_queue=self.steps_queue, rollbacks_queue=self.rollbacks_queue,
                       archive=self.archive_url)


def load_app(path: str) -> SagaApp:
    """The ``SagaApp`` at ``module:attr`` (``attr`` defaults to ``sagas``)."""
    module_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path:  # as `celery -A` does: the app lives in the project
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}",
                                 param_hint="'--app'") from exc
    found = getattr(module, attr or "sagas", None)
    if not isinstance(found, SagaApp):
        raise click.BadParameter(f"{module_name}:{attr or 'sagas'} is not a SagaApp "
                                 f"(got {type(found).__name__})", param_hint="'--app'")
    return found


def quiet_logs() -> None:
    """Send structlog's lines (lifecycle events this process commits) to stderr, warnings up."""
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", key="logged_at"),
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


def redact(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def with_sagas(fn: F) -> F:
    """Pass the command the loaded ``SagaApp`` as its first argument."""

    @click.pass_context
    def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> Any:
        return ctx.invoke(fn, ctx.ensure_object(Target).sagas(), *args, **kwargs)

    return update_wrapper(wrapper, fn)  # type: ignore[return-value]


def parse_duration_option(ctx: click.Context, param: click.Parameter, value: str | None
                          ) -> timedelta | None:
    """``"30 seconds"``, ``"2 minutes"`` or a number of milliseconds (an option callback)."""
    if value is None:
        return None
    text = value.strip()
    try:
        return parse_duration(float(text) if _is_number(text) else text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
