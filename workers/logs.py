"""How the fleet renders structlog events: one JSON line each on the worker's standard output.

Shared by ``workers.app`` and the benchmark, so the benchmark pays what a deployment pays.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import structlog
from pydantic_core import to_json

_LEVELS = {"warn": "warning", "exception": "error"}
"""structlog's ``add_log_level`` names: a deprecated alias, and ``exception`` is an error."""


def render_json(_: Any, method: str, event_dict: Any) -> bytes:
    """The line: the event with ``level`` and ``logged_at``, as JSON by pydantic-core.

    One processor where structlog's would be three (``add_log_level``, ``TimeStamper``,
    ``JSONRenderer``): a saga step writes four lines, and each processor call cost a line
    about a tenth.  ``logged_at`` is when the line was written, in ISO 8601 UTC; a lifecycle
    event's own ``timestamp`` (its commit, moments before) is used as it is, which saves
    asking the clock again and formatting it.  Values JSON cannot hold are written as their
    ``repr()``, as ``JSONRenderer`` does.
    """
    event_dict["level"] = _LEVELS.get(method, method)
    stamp = event_dict.get("timestamp")
    event_dict["logged_at"] = (stamp if isinstance(stamp, str)
                               else datetime.now(UTC).isoformat().replace("+00:00", "Z"))
    return to_json(event_dict, fallback=repr)


def configure_logging() -> None:
    """Render every structlog event, saga lifecycle events included, as one JSON line.

    The stream is bound now, before a worker redirects ``sys.stdout`` into its own logger,
    so the lines stay plain JSON rather than wrapped in Celery's log format.  (A
    ``PrintLogger`` would not do: it prints to whatever ``sys.stdout`` is at the time.)
    Loggers are built once, on first use: a saga step logs a few lines, and rebuilding the
    processor chain for each cost a third of the time of writing them.
    """
    structlog.configure(
        # Not "timestamp" for the time written: a lifecycle event has its own.
        processors=[render_json],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
