"""The saga's recorded state: plain pydantic models, no I/O.

A ``SagaRun`` is the whole truth about one saga: its plan (captured when it was started, so
a redeploy never changes a running saga), every step's attempts, the rollback's progress,
and the outbox of task messages that are due to be sent.  The store persists it as one
JSON document; the state machine in ``machine.py`` turns one ``SagaRun`` and one event into
the next.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue


class SagaStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    HELD = "held"
    """A step failed for good and the saga's ``on_failure`` is ``"hold"``: nothing is undone
    until ``redrive()``, ``rollback()``, ``terminate()`` or the hold timeout (format 3)."""
    COMPLETE = "complete"
    ERRORED = "errored"
    TERMINATED = "terminated"


TERMINAL_STATUSES: frozenset[SagaStatus] = frozenset(
    {SagaStatus.COMPLETE, SagaStatus.ERRORED, SagaStatus.TERMINATED}
)


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETE = "complete"
    ERRORED = "errored"
    CANCELLED = "cancelled"


class RollbackStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETE = "complete"
    ERRORED = "errored"


class Kind(StrEnum):
    """What a task message runs: a forward step or its rollback handler."""

    STEP = "step"
    ROLLBACK = "rollback"
    WAKE = "wake"
    """Not a task message: the end of a sleep or of a wait's timeout (SPEC section 8),
    always a timer in the store, applied by the worker that fires it."""


class WaitKind(StrEnum):
    """A stage that waits instead of running a task (SPEC section 8)."""

    SLEEP = "sleep"
    WAIT = "wait"


class Backoff(StrEnum):
    CONSTANT = "constant"
    LINEAR = "linear"
    EXPONENTIAL = "exponential"


class RollbackMode(StrEnum):
    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"


class OnFailure(StrEnum):
    """What a saga does when a step fails for good (SPEC section 8)."""

    ROLLBACK = "rollback"
    HOLD = "hold"


class OnRollbackError(StrEnum):
    HALT = "halt"
    CONTINUE = "continue"


class RollbackOutcome(StrEnum):
    COMPLETE = "complete"
    FAILED = "failed"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class ErrorInfo(_Frozen):
    """An error as it appears everywhere: the exception's class name and ``str()``."""

    type: str
    message: str
    step: str | None = None
    """The failing step's name, where the error belongs to one (saga and rollback errors)."""


class Policy(_Frozen):
    """A resolved retry-and-timeout policy, in milliseconds (the core's unit of time)."""

    limit: int
    delay_ms: float
    backoff: Backoff
    max_delay_ms: float | None = None
    jitter: bool = False
    timeout_ms: float


class WaitSpec(_Frozen):
    """What a waiting stage waits for: time (``sleep``) or an event (``wait_for_event``)."""

    kind: WaitKind
    duration_ms: float | None = None
    """A sleep's duration, or a wait's timeout (None: a wait without one)."""
    event_type: str | None = None
    """The event type a wait ends on."""


class StepSpec(_Frozen):
    """One step of the plan: what to run, with which arguments, and how to undo it."""

    key: str
    """Unique within the saga: ``"<name>#<count>"``."""
    name: str
    count: int
    stage: int
    index: int
    """Position within its stage (declaration order)."""
    task: str
    """Celery task name of the step."""
    args: list[JsonValue] = Field(default_factory=list)
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)
    immutable: bool = False
    in_group: bool = False
    """Declared inside a ``group``: the stage's output is then a list."""
    policy: Policy
    rollback_task: str | None = None
    rollback_policy: Policy | None = None
    wait: WaitSpec | None = None
    """Set for a waiting stage (no task runs; ``task`` is empty).  Format 3 and later."""


class Plan(_Frozen):
    stages: list[list[StepSpec]]
    rollback_mode: RollbackMode = RollbackMode.SEQUENTIAL
    on_rollback_error: OnRollbackError = OnRollbackError.HALT
    on_failure: OnFailure = OnFailure.ROLLBACK
    """``hold``: a step failing for good holds the saga instead of rolling it back (format
    3 and later)."""
    hold_timeout_ms: float | None = None
    """How long a held saga waits for ``redrive()`` or ``rollback()`` before it rolls back."""

    def spec(self, key: str) -> StepSpec:
        """The step of the plan with this key; ``KeyError`` if there is none."""
        return self.specs_by_key[key]

    @cached_property
    def waits(self) -> bool:
        """Whether the plan waits (SPEC section 8: a sleep or event stage, or hold on
        failure): its sagas are written in format 3 or later."""
        return self.on_failure == OnFailure.HOLD or any(
            s.wait is not None for stage in self.stages for s in stage)

    @cached_property
    def specs_by_key(self) -> dict[str, StepSpec]:
        """Every step by its key, built on first use and kept with this plan (a plan is
        built once per definition and process; a step looks its spec up two or three
        times).  A cached property, not a private attribute: pydantic reads those through
        ``__getattr__``, dearer than the search."""
        return {s.key: s for stage in self.stages for s in stage}


class AttemptRecord(_Record):
    attempt: int
    started_at: datetime
    ended_at: datetime | None = None
    success: bool | None = None
    error: ErrorInfo | None = None
    losses: int = 0
    """How many times a worker died while running this attempt (redelivered each time)."""
    resends: int = 0
    """How many times the recovery sweep sent this running attempt again (lapsed lease)."""
    resent_at: datetime | None = None


class RollbackRun(_Record):
    status: RollbackStatus = RollbackStatus.PENDING
    attempts: list[AttemptRecord] = Field(default_factory=list)
    error: ErrorInfo | None = None
    budget_base: int = 1
    """Attempt number that opened the current retry budget (``retry_rollback`` opens a new one)."""
    next_attempt: int | None = None
    """The attempt a message has been sent for and that has not started yet."""


class StepRun(_Record):
    key: str
    name: str
    count: int
    stage: int
    start_seq: int | None = None
    status: StepStatus = StepStatus.PENDING
    output: JsonValue = None
    attempts: list[AttemptRecord] = Field(default_factory=list)
    next_attempt: int | None = None
    """The attempt a message has been sent for and that has not started yet."""
    rollback: RollbackRun | None = None
    budget_base: int = 1
    """Attempt number that opened the current retry budget (``redrive()`` opens a new one)."""


class RollbackProgress(_Record):
    outcome: RollbackOutcome | None = None
    error: ErrorInfo | None = None
    total_steps: int
    completed_steps: int = 0
    order: list[str]
    """Step keys in the order their handlers run: reverse step-start order."""
    trigger_error: ErrorInfo


class Dispatch(_Frozen):
    """A task message that is due to be sent: the outbox entry written with the transition.

    It stays in the outbox until the attempt it carries starts, so a message lost between
    the transition and the send (a crash, a broker hiccup) is sent again by a redelivery or
    by the recovery sweeper; the receiving side drops duplicates.
    """

    kind: Kind
    key: str
    attempt: int
    due_at: datetime
    retries: int
    """Celery's ``request.retries`` for this message: retries so far in the current budget."""
    origin: str
    """Which recorded event produced it (``"<kind>:<key>:<attempt>"`` or ``"saga"``)."""
    via_retry: bool = False
    """Send it with ``Task.retry`` from the task that just failed (the normal retry path)."""
    resends: int = 0
    """How many times the recovery sweep sent it again (each doubles the next wait)."""

    @property
    def id(self) -> str:
        return dispatch_id(self.kind, self.key, self.attempt)


def dispatch_id(kind: Kind, key: str, attempt: int) -> str:
    return f"{kind.value}:{key}:{attempt}"


class Hold(_Record):
    """Why and since when a saga is held (SPEC section 8)."""

    error: ErrorInfo
    since: datetime
    count: int = 1
    """How many times the saga was held: its hold timer's attempt number."""


class Termination(_Record):
    rollback: bool
    error: ErrorInfo


FORMAT = 4
"""The saga format this release writes by default (``SagaProgress.format``)."""

WAIT_FORMAT = 3
"""The first format a saga whose plan waits can have (SPEC section 8): format 2 plus waiting
stages, buffered events and ``wake`` timers.  A saga that waits is written in this format
or the default, whichever is newer (``SagaApp(write_format=2)`` during an upgrade from
0.2.0: such a saga is run only by this release's workers)."""

FORMATS: frozenset[int] = frozenset({1, 2, 3, 4})
"""The saga formats this release reads and runs."""


class SagaProgress(_Record):
    """Everything about a saga run that changes as it runs: a ``SagaRun`` without its plan.

    The plan never changes after the start, so the store writes it once and each commit
    writes only this part (much smaller than the whole run: bench/RESULTS.md).
    """

    id: str
    name: str
    status: SagaStatus = SagaStatus.QUEUED
    params: JsonValue = None
    output: JsonValue = None
    error: ErrorInfo | None = None
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    steps: dict[str, StepRun]
    next_seq: int = 1
    rollback: RollbackProgress | None = None
    terminate: Termination | None = None
    held: Hold | None = None
    """Set while the saga is held (status ``held``), and kept after for its count."""
    outbox: dict[str, Dispatch] = Field(default_factory=dict)
    inbox: dict[str, list[JsonValue]] = Field(default_factory=dict)
    """Events sent before a wait for their type began: payloads per type, oldest first
    (format 3; left out of the stored JSON while empty)."""
    event_ids: list[str] = Field(default_factory=list)
    """The ``event_id`` of every event taken so far: the same id again counts once."""
    format: int = 1
    """The format the saga was created in, kept for its life (CHANGELOG.md): 1 is 0.1.0's
    (idempotency keys joined with ':', a rollback's lease apart from its step's); 2 escapes
    ':' and '%' in key parts and has one lease per step; 3 is 2 with waiting stages, buffered
    events and holds (SPEC section 8); 4 is 3 whose record the store compacts (or archives)
    once the saga ended (``_store/history.py``).  A 0.2.0 process reads neither 3 nor 4.
    Format 1 is stored as 0.1.0 stored it (the field left out), so a 0.1.0 process reads
    it."""

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def failing(self) -> bool:
        """True once the saga failed or was told to stop: no forward step may start."""
        return self.error is not None or self.terminate is not None


class SagaRun(SagaProgress):
    plan: Plan


EventType = Literal[
    "saga_queued",
    "saga_started",
    "saga_completed",
    "saga_errored",
    "saga_terminated",
    "step_started",
    "step_completed",
    "step_errored",
    "attempt_started",
    "attempt_completed",
    "attempt_errored",
    "rollback_started",
    "rollback_step_started",
    "rollback_step_completed",
    "rollback_step_errored",
    "rollback_attempt_started",
    "rollback_attempt_completed",
    "rollback_attempt_errored",
    "rollback_completed",
    "rollback_errored",
    "terminate_requested",
    "sleep_started",
    "sleep_completed",
    "wait_started",
    "wait_completed",
    "wait_timed_out",
    "event_received",
    "saga_held",
    "saga_redriven",
]
