"""How a saga run is stored: its progress as JSON, its plan kept apart.

The plan never changes after the start, so the stores write it once and each commit writes
only the progress (``SagaProgress``, the run without its plan), without the fields that
hold their defaults: validation restores them, and they would be most of the bytes.
"""

from __future__ import annotations

from saga_celery._core.model import Plan, SagaProgress, SagaRun

_PLAN: set[str] = {"plan"}


def encode_progress(run: SagaRun) -> str:
    """The JSON a commit stores: the run without its plan or its default-valued fields."""
    return run.model_dump_json(exclude=_PLAN, exclude_defaults=True)


def decode_run(progress: str | bytes, plan: Plan) -> SagaRun:
    """The run from its stored progress JSON and its plan; ``ValidationError`` if unreadable."""
    return with_plan(SagaProgress.model_validate_json(progress), plan)


def with_plan(progress: SagaProgress, plan: Plan) -> SagaRun:
    """A new run made of validated parts: ``progress``'s values are not validated again."""
    return SagaRun.model_construct(plan=plan, **progress.__dict__)
