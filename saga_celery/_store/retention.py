"""``SagaApp(retention=...)``: one duration for every finished saga, or one per outcome.

``retention="7 days"`` keeps every finished saga a week; ``retention={"complete": "1 day",
"errored": "30 days", "terminated": "30 days"}`` keeps each outcome as long as it says (an
outcome left out: the default week).  It applies to the saga's records in Redis (compacted,
or a tombstone) and to its row in the archive (README, "History: compaction, archive,
retention").
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

from saga_celery._core.durations import parse_duration
from saga_celery._core.model import TERMINAL_STATUSES
from saga_celery._errors import SagaConfigError

DEFAULT_RETENTION_MS = 7 * 24 * 3600 * 1000
"""An outcome's retention when none is given for it: a week."""

OUTCOMES = tuple(sorted(s.value for s in TERMINAL_STATUSES))
"""The outcomes a retention may be given for: complete, errored, terminated."""


def parse_retention(value: object) -> int | dict[str, int | None]:
    """One retention in ms, or one per outcome; ``SagaConfigError`` naming what is wrong."""
    if not isinstance(value, Mapping):
        return positive_ms("retention", value)
    unknown = sorted(str(k) for k in value if k not in OUTCOMES)
    if unknown:
        raise SagaConfigError(f"SagaApp(retention={{...}}): {unknown} is not an outcome; "
                              f"give a duration for any of {list(OUTCOMES)}")
    return {str(k): positive_ms(f"retention[{k!r}]", v) for k, v in value.items()}


def positive_ms(field: str, value: object) -> int:
    """``SagaApp(<field>=value)`` as a positive number of milliseconds, or a
    ``SagaConfigError`` naming the field."""
    try:
        duration = parse_duration(value)
    except ValueError as exc:
        raise SagaConfigError(f"SagaApp({field}=...): {exc}") from exc
    if duration <= timedelta(0):
        raise SagaConfigError(f"SagaApp({field}=...) must be positive, got {value!r}")
    return int(duration.total_seconds() * 1000)
