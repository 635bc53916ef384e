"""Reading the public API's JSON (pure): timestamps, errors, and the held periods in events.

Shared by the dashboard's view and by ``saga_celery.otel`` (its ``saga.hold`` spans): both
take a saga's held periods from its events, since its state keeps only the latest hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["HeldPeriod", "error_text", "held_periods", "when"]


def when(value: Any) -> datetime | None:
    """A JSON timestamp as a ``datetime`` (None stays None)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def error_text(error: Any) -> str:
    """``Type: message`` of an ``ErrorInfo`` as JSON, or ``""``."""
    if not isinstance(error, Mapping):
        return ""
    return f"{error.get('type', 'Error')}: {error.get('message', '')}"


@dataclass(frozen=True, kw_only=True)
class HeldPeriod:
    """A time the saga stood held (SPEC section 8), from its ``saga_held`` event to what
    released it."""

    started_at: datetime
    ended_at: datetime | None
    """None while the saga is still held."""
    outcome: str
    """``redriven``, ``rolled_back``, ``terminated``, or ``held`` (not released yet)."""
    error: str
    """The failure that held it (``Type: message``)."""


_RELEASES = {"saga_redriven": "redriven", "rollback_started": "rolled_back",
             "terminate_requested": "terminated", "saga_terminated": "terminated",
             "saga_errored": "rolled_back", "saga_completed": "redriven"}
"""The events that end a held period (the hold timeout passing starts the rollback)."""


def held_periods(events: Iterable[Mapping[str, Any]]) -> list[HeldPeriod]:
    """Every held period of a saga, in order, from its events (oldest first)."""
    periods: list[HeldPeriod] = []
    opened: tuple[datetime, str] | None = None
    for event in events:
        kind, stamp = event.get("type"), when(event.get("timestamp"))
        if stamp is None:
            continue
        if kind == "saga_held" and opened is None:
            opened = (stamp, error_text(event.get("error")))
        elif opened is not None and kind in _RELEASES:
            periods.append(HeldPeriod(started_at=opened[0], ended_at=stamp,
                                      outcome=_RELEASES[str(kind)], error=opened[1]))
            opened = None
    if opened is not None:
        periods.append(HeldPeriod(started_at=opened[0], ended_at=None, outcome="held",
                                  error=opened[1]))
    return periods
