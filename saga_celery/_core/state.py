"""``SagaState``: the public, JSON-serializable view of a saga (SPEC section 5)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, JsonValue

from saga_celery._core.model import (
    AttemptRecord,
    ErrorInfo,
    RollbackOutcome,
    RollbackStatus,
    SagaRun,
    SagaStatus,
    StepRun,
    StepStatus,
    WaitSpec,
)


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class AttemptView(_View):
    attempt: int
    started_at: datetime
    ended_at: datetime | None
    success: bool | None
    error: ErrorInfo | None


class StepRollbackView(_View):
    status: RollbackStatus
    attempts: list[AttemptView]
    error: ErrorInfo | None


class StepView(_View):
    name: str
    count: int
    stage: int
    start_seq: int | None
    status: StepStatus
    output: JsonValue
    attempts: list[AttemptView]
    rollback: StepRollbackView | None
    kind: str = "step"
    """``"step"``, or for a waiting stage (SPEC section 8) ``"sleep"`` or ``"wait"``."""


class RollbackView(_View):
    outcome: RollbackOutcome | None
    error: ErrorInfo | None
    total_steps: int
    completed_steps: int


class SagaState(_View):
    """A saga as it stands: status, output, error, rollback, and every step's attempts."""

    id: str
    name: str
    status: SagaStatus
    params: JsonValue
    output: JsonValue
    error: ErrorInfo | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    rollback: RollbackView | None
    steps: list[StepView]

    @property
    def is_terminal(self) -> bool:
        return self.status in (SagaStatus.COMPLETE, SagaStatus.ERRORED, SagaStatus.TERMINATED)

    def step(self, name: str, count: int = 1) -> StepView:
        """The entry of step ``name`` (its ``count``-th occurrence)."""
        for view in self.steps:
            if view.name == name and view.count == count:
                return view
        raise KeyError(f"saga {self.id!r} has no step {name!r} (count {count})")


def _attempts(records: list[AttemptRecord]) -> list[AttemptView]:
    return [
        AttemptView(attempt=r.attempt, started_at=r.started_at, ended_at=r.ended_at,
                    success=r.success, error=r.error)
        for r in records
    ]


def _step(step: StepRun, wait: WaitSpec | None) -> StepView:
    handler = step.rollback
    rollback = None
    if handler is not None:
        rollback = StepRollbackView(status=handler.status, attempts=_attempts(handler.attempts),
                                    error=handler.error)
    return StepView(name=step.name, count=step.count, stage=step.stage,
                    start_seq=step.start_seq, status=step.status, output=step.output,
                    attempts=_attempts(step.attempts), rollback=rollback,
                    kind="step" if wait is None else str(wait.kind))


def to_state(run: SagaRun) -> SagaState:
    progress = run.rollback
    rollback = None
    if progress is not None:
        rollback = RollbackView(outcome=progress.outcome, error=progress.error,
                                total_steps=progress.total_steps,
                                completed_steps=progress.completed_steps)
    return SagaState(
        id=run.id, name=run.name, status=run.status, params=run.params, output=run.output,
        error=run.error or (run.held.error if run.status == SagaStatus.HELD and run.held
                            else None),
        created_at=run.created_at, started_at=run.started_at,
        ended_at=run.ended_at, rollback=rollback,
        steps=[_step(run.steps[spec.key], spec.wait) for stage in run.plan.stages
               for spec in stage],
    )
