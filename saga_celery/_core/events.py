"""What the state machine takes in (events) and gives out (a ``Transition``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, JsonValue

from saga_celery._core.model import Dispatch, ErrorInfo, EventType, Kind, SagaRun


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AttemptStarted(_Event):
    """A task message for (kind, key, attempt) was received and wants to run."""

    kind: Kind
    key: str
    attempt: int
    lease_live: bool = False
    """Whether another delivery holds the step's lease right now: one of this attempt, of
    the attempt before it (a body that outlived its recorded end), or of the step that a
    rollback attempt is to undo.  One lease per step covers all of them."""


class AttemptSucceeded(_Event):
    kind: Kind
    key: str
    attempt: int
    output: JsonValue = None


class AttemptFailed(_Event):
    kind: Kind
    key: str
    attempt: int
    error: ErrorInfo
    retryable: bool = True
    """False for ``NonRetryableError`` and outputs that cannot be stored."""
    draw: float = 1.0
    """Uniform random number in [0, 1] for full jitter (the core reads no randomness)."""
    via_retry: bool = True
    """The reporting task can send the retry itself with ``Task.retry``."""
    delay_ms: float | None = None
    """The delay before the retry that the attempt asked for itself (``RetryLater``), in
    place of its policy's; it still counts against the retry limit."""


class TerminateRequested(_Event):
    rollback: bool
    reason: str = "terminated by request"


class RetryRollbackRequested(_Event):
    pass


class WakeUp(_Event):
    """A waiting stage's timer fired: a sleep ends, or a wait times out (SPEC section 8)."""

    key: str
    attempt: int = 1


class EventSent(_Event):
    """``send_event``: an event for the saga's waits, taken now or kept for a later one."""

    event_type: str
    payload: JsonValue = None
    event_id: str | None = None


class RedriveRequested(_Event):
    """``redrive()``: a held saga runs its failed steps again, with a fresh retry budget."""


class RollbackRequested(_Event):
    """``rollback()``: a held saga rolls back as for a failure."""


class RecoverySwept(_Event):
    """The recovery sweep looked at this saga: re-send what is overdue, and record it."""

    grace_ms: float
    lapsed: list[tuple[Kind, str, int]] = []
    """Running attempts (kind, key, attempt) whose lease the sweep found lapsed."""


Event = (
    AttemptStarted | AttemptSucceeded | AttemptFailed | TerminateRequested | RetryRollbackRequested
    | RecoverySwept | WakeUp | EventSent | RedriveRequested | RollbackRequested
)


class Decision(StrEnum):
    """What a received task message should do (answers ``AttemptStarted``)."""

    RUN = "run"
    WAIT = "wait"
    """Another delivery holds the step's live lease (this attempt running elsewhere, or a
    body that outlived its recorded end): come back once that lease can have ended."""
    BEHIND = "behind"
    """The store does not show yet the commit that sent this message: come back (the
    engine answers this, never the core)."""
    SKIP = "skip"
    """Nothing to run: a duplicate, a cancelled step, or an attempt that already ended."""


@dataclass
class Transition:
    """The outcome of applying one event: the new run and what to do about it."""

    run: SagaRun
    changed: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    dispatches: list[Dispatch] = field(default_factory=list)
    decision: Decision | None = None
    refusal: str | None = None
    """Set, with nothing changed, when the event is not allowed in the saga's status."""


@dataclass
class Ctx:
    """Working state of one ``apply``: a private copy of the run plus what it produced."""

    run: SagaRun
    now: datetime
    origin: str = "saga"
    changed: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    dispatches: list[Dispatch] = field(default_factory=list)
    stamp: str = field(init=False)
    """``now`` as events carry it, formatted once for all of them."""

    def __post_init__(self) -> None:
        self.stamp = self.now.isoformat()

    def emit(self, type_: EventType, **fields: Any) -> None:
        self.changed = True
        self.events.append(
            {"type": type_, "saga_id": self.run.id, "timestamp": self.stamp, **fields}
        )

    def dispatch(self, dispatch: Dispatch) -> None:
        self.changed = True
        self.run.outbox[dispatch.id] = dispatch
        self.dispatches.append(dispatch)

    def transition(self, decision: Decision | None = None) -> Transition:
        return Transition(
            run=self.run,
            changed=self.changed,
            events=self.events,
            dispatches=self.dispatches,
            decision=decision,
        )


def error_fields(error: ErrorInfo | None) -> dict[str, Any] | None:
    """An error as events carry it: ``{"type", "message"}``, plus ``step`` where it has one."""
    return None if error is None else error.model_dump(exclude_none=True)
