"""How a saga run is stored: its progress as JSON, its plan kept apart; and how the
recovery sweep's health record is (a hash of text fields, ``keys.py``).

The plan never changes after the start, so the stores write it once and each commit writes
only the progress (``SagaProgress``, the run without its plan), without the fields that
hold their defaults: validation restores them, and they would be most of the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

from saga_celery._core.model import Plan, SagaProgress, SagaRun
from saga_celery._store.base import SweepRecord
from saga_celery._store.keys import (
    INTERVAL_FIELD,
    OLDEST_MESSAGE_FIELD,
    OLDEST_OVERDUE_FIELD,
    OLDEST_SAGA_FIELD,
    OVERDUE_FIELD,
    SAGAS_FIELD,
    SWEPT_AT_FIELD,
)

_PLAN: set[str] = {"plan"}


def encode_progress(run: SagaRun) -> str:
    """The JSON a commit stores: the run without its plan or its default-valued fields."""
    return run.model_dump_json(exclude=_PLAN, exclude_defaults=True)


_NO_WAIT: dict[str, object] = {"stages": {"__all__": {"__all__": {"wait"}}},
                               "on_failure": True, "hold_timeout_ms": True}


def encode_plan(plan: Plan) -> str:
    """The JSON ``create`` stores for a plan: a plan without waiting stages leaves their
    field out, and is stored as a release that reads only formats 1 and 2 reads it."""
    if plan.waits:
        return plan.model_dump_json()
    return plan.model_dump_json(exclude=_NO_WAIT)  # type: ignore[arg-type]


def decode_run(progress: str | bytes, plan: Plan) -> SagaRun:
    """The run from its stored progress JSON and its plan; ``ValidationError`` if unreadable."""
    return with_plan(SagaProgress.model_validate_json(progress), plan)


def with_plan(progress: SagaProgress, plan: Plan) -> SagaRun:
    """A new run made of validated parts: ``progress``'s values are not validated again."""
    return SagaRun.model_construct(plan=plan, **progress.__dict__)


def encode_sweep(record: SweepRecord) -> dict[str, str]:
    """The health hash's fields for ``record``: "" for no oldest overdue message, and no
    ``interval_ms`` field when None, so that writing them keeps the recorded interval."""
    fields = {
        SWEPT_AT_FIELD: str(record.swept_at_ms),
        SAGAS_FIELD: str(record.sagas),
        OVERDUE_FIELD: str(record.overdue),
        OLDEST_OVERDUE_FIELD: _text(record.oldest_overdue_ms),
        OLDEST_SAGA_FIELD: _text(record.oldest_overdue_saga),
        OLDEST_MESSAGE_FIELD: _text(record.oldest_overdue_message),
    }
    if record.interval_ms is not None:
        fields[INTERVAL_FIELD] = str(record.interval_ms)
    return fields


def decode_sweep(fields: Mapping[str, str]) -> SweepRecord:
    """The record in the health hash's fields; ``KeyError`` or ``ValueError`` if unreadable."""
    oldest = fields.get(OLDEST_OVERDUE_FIELD) or None
    interval = fields.get(INTERVAL_FIELD) or None
    return SweepRecord(
        swept_at_ms=int(fields[SWEPT_AT_FIELD]),
        sagas=int(fields[SAGAS_FIELD]),
        overdue=int(fields.get(OVERDUE_FIELD) or 0),
        oldest_overdue_ms=None if oldest is None else int(oldest),
        oldest_overdue_saga=fields.get(OLDEST_SAGA_FIELD) or None,
        oldest_overdue_message=fields.get(OLDEST_MESSAGE_FIELD) or None,
        interval_ms=None if interval is None else int(interval),
    )


def _text(value: object) -> str:
    return "" if value is None else str(value)
