"""The saga state machine: one run and one event in, the next run and its commands out.

Pure: no I/O, no clock, no randomness, no logging, and it never raises to its caller: an
event the saga's status forbids comes back as a ``Transition`` with ``refusal`` set.
Celery delivers at least once, so every event may arrive twice or late; a duplicate
changes nothing (it may only ask to send again what its first delivery sent).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import JsonValue

from saga_celery._core.attempts import (
    Item,
    budget_base,
    find_attempt,
    find_item,
    origin_of,
    policy_of,
    resend_from,
    send_attempt,
)
from saga_celery._core.backoff import may_retry, retry_delay_ms
from saga_celery._core.events import (
    AttemptFailed,
    AttemptStarted,
    AttemptSucceeded,
    Ctx,
    Decision,
    Event,
    EventSent,
    RecoverySwept,
    RedriveRequested,
    RetryRollbackRequested,
    RollbackRequested,
    TerminateRequested,
    Transition,
    WakeUp,
    error_fields,
)
from saga_celery._core.holding import HOLD_KEY, hold, holds, is_hold_timer, redrive, release
from saga_celery._core.model import (
    FORMAT,
    AttemptRecord,
    ErrorInfo,
    Kind,
    Plan,
    RollbackRun,
    RollbackStatus,
    SagaRun,
    SagaStatus,
    StepRun,
    StepStatus,
    Termination,
)
from saga_celery._core.recovery import sweep
from saga_celery._core.rollback import (
    advance_rollback,
    fail_saga,
    maybe_finish,
    resume_rollback,
)
from saga_celery._core.waiting import begin_wait, deliver, wake

WORKER_LOST_LIMIT = 3
"""Worker losses on one attempt after which it counts as failed (``WorkerLost``)."""


def start_saga(
    *, saga_id: str, name: str, plan: Plan, params: JsonValue, now: datetime,
    format: int = FORMAT,
) -> Transition:
    """A new run, queued, with its first stage's messages in the outbox, in ``format``."""
    steps = {
        spec.key: StepRun(key=spec.key, name=spec.name, count=spec.count, stage=spec.stage)
        for stage in plan.stages
        for spec in stage
    }
    run = SagaRun(id=saga_id, name=name, params=params, created_at=now, plan=plan, steps=steps,
                  format=format)
    ctx = Ctx(run=run, now=now)
    ctx.emit("saga_queued", name=name)
    _send_stage(ctx, 0)
    return ctx.transition()


def apply(run: SagaRun, event: Event, *, now: datetime) -> Transition:
    """Apply one event to a copy of ``run``."""
    return apply_owned(SagaRun.model_validate(run.model_dump()), event, now=now)


def apply_owned(run: SagaRun, event: Event, *, now: datetime) -> Transition:
    """``apply`` on a run the caller hands over and will not use again (a fresh load).

    Saves the copy, which costs more than the rest of a transition (``bench/RESULTS.md``).
    """
    ctx = Ctx(run=run, now=now)
    if isinstance(event, AttemptStarted):
        return _on_started(ctx, event)
    if isinstance(event, AttemptSucceeded):
        return _on_succeeded(ctx, event)
    if isinstance(event, AttemptFailed):
        return _on_failed(ctx, event)
    if isinstance(event, TerminateRequested):
        return _on_terminate(ctx, event)
    if isinstance(event, WakeUp):
        return _on_wake(ctx, event)
    if isinstance(event, EventSent):
        return _on_event(ctx, event)
    if isinstance(event, RecoverySwept):
        if not ctx.run.is_terminal:
            sweep(ctx, event)
        return ctx.transition()
    if isinstance(event, RedriveRequested):
        return _refused_or(ctx, redrive(ctx))
    if isinstance(event, RollbackRequested):
        return _on_rollback_requested(ctx)
    return _on_retry_rollback(ctx, event)


def _refused_or(ctx: Ctx, refusal: str | None) -> Transition:
    return ctx.transition() if refusal is None else _refuse(ctx.run, refusal)


def _refuse(run: SagaRun, reason: str) -> Transition:
    return Transition(run=run, refusal=reason, decision=Decision.SKIP)


# --- a message arrives -------------------------------------------------------------------


def _on_started(ctx: Ctx, ev: AttemptStarted) -> Transition:
    item = find_item(ctx, ev.kind, ev.key)
    if item is None:
        return _refuse(ctx.run, f"saga {ctx.run.id!r} has no {ev.kind} {ev.key!r}")
    ctx.origin = origin_of(ev.kind, ev.key, ev.attempt)
    record = find_attempt(item, ev.attempt)
    if record is not None:
        return _on_redelivery(ctx, ev, item, record)
    if ev.attempt != item.next_attempt:
        return ctx.transition(Decision.SKIP)  # cancelled, superseded or never sent
    if ev.kind == Kind.STEP and ctx.run.error is not None:
        return ctx.transition(Decision.SKIP)  # no forward step starts once the saga failed
    if ev.lease_live:  # the attempt before it, or the step it undoes, still runs somewhere
        return ctx.transition(Decision.WAIT)
    ctx.run.outbox.pop(ctx.origin, None)
    item.next_attempt = None
    item.attempts.append(AttemptRecord(attempt=ev.attempt, started_at=ctx.now))
    if isinstance(item, StepRun):
        _record_step_start(ctx, item, ev.attempt)
    else:
        _record_handler_start(ctx, ev.key, item, ev.attempt)
    return ctx.transition(Decision.RUN)


def _on_redelivery(ctx: Ctx, ev: AttemptStarted, item: Item, record: AttemptRecord) -> Transition:
    """The same attempt again: finished (drop it), running (wait) or its worker died."""
    if record.ended_at is not None:
        resend_from(ctx, ctx.origin)
        return ctx.transition(Decision.SKIP)
    if ev.lease_live:
        return ctx.transition(Decision.WAIT)
    record.losses += 1
    ctx.changed = True
    if record.losses < WORKER_LOST_LIMIT:
        return ctx.transition(Decision.RUN)
    error = ErrorInfo(type="WorkerLost",
                      message=f"the worker running attempt {ev.attempt} died "
                              f"{record.losses} times")
    lost = AttemptFailed(kind=ev.kind, key=ev.key, attempt=ev.attempt, error=error,
                         via_retry=False)
    _end_failed(ctx, lost, item, record)
    return ctx.transition(Decision.SKIP)


def _record_step_start(ctx: Ctx, step: StepRun, attempt: int) -> None:
    run = ctx.run
    if run.status == SagaStatus.QUEUED:
        run.status = SagaStatus.RUNNING
        run.started_at = ctx.now
        ctx.emit("saga_started")
    step.status = StepStatus.RUNNING
    if step.start_seq is None:
        step.start_seq = run.next_seq
        run.next_seq += 1
        if run.plan.spec(step.key).rollback_task is not None:
            step.rollback = RollbackRun()
        ctx.emit("step_started", step=step.name, count=step.count, start_seq=step.start_seq)
    ctx.emit("attempt_started", step=step.name, count=step.count, attempt=attempt)


def _record_handler_start(ctx: Ctx, key: str, handler: RollbackRun, attempt: int) -> None:
    step = ctx.run.steps[key]
    handler.status = RollbackStatus.RUNNING
    if attempt == handler.budget_base:
        ctx.emit("rollback_step_started", step=step.name, count=step.count)
    ctx.emit("rollback_attempt_started", step=step.name, count=step.count, attempt=attempt)


# --- an attempt ends ---------------------------------------------------------------------


def _on_succeeded(ctx: Ctx, ev: AttemptSucceeded) -> Transition:
    item = find_item(ctx, ev.kind, ev.key)
    record = None if item is None else find_attempt(item, ev.attempt)
    ctx.origin = origin_of(ev.kind, ev.key, ev.attempt)
    if item is None or record is None or record.ended_at is not None:
        resend_from(ctx, ctx.origin)
        return ctx.transition()
    record.ended_at = ctx.now
    record.success = True
    step = ctx.run.steps[ev.key]
    fields = _ids(step, ev.attempt)
    if isinstance(item, StepRun):
        item.status = StepStatus.COMPLETE
        item.output = ev.output
        ctx.emit("attempt_completed", **fields)
        ctx.emit("step_completed", step=step.name, count=step.count)
        _after_step(ctx, item)
    else:
        item.status = RollbackStatus.COMPLETE
        assert ctx.run.rollback is not None
        ctx.run.rollback.completed_steps += 1
        ctx.emit("rollback_attempt_completed", **fields)
        ctx.emit("rollback_step_completed", step=step.name, count=step.count)
        advance_rollback(ctx)
    return ctx.transition()


def _on_failed(ctx: Ctx, ev: AttemptFailed) -> Transition:
    item = find_item(ctx, ev.kind, ev.key)
    record = None if item is None else find_attempt(item, ev.attempt)
    ctx.origin = origin_of(ev.kind, ev.key, ev.attempt)
    if item is None or record is None or record.ended_at is not None:
        resend_from(ctx, ctx.origin)
        return ctx.transition()
    _end_failed(ctx, ev, item, record)
    return ctx.transition()


def _end_failed(ctx: Ctx, ev: AttemptFailed, item: Item, record: AttemptRecord) -> None:
    step = ctx.run.steps[ev.key]
    error = ev.error.model_copy(update={"step": step.name})
    record.ended_at = ctx.now
    record.success = False
    record.error = ev.error
    delay = _retry_delay(ctx, ev, item)
    prefix = "" if isinstance(item, StepRun) else "rollback_"
    ctx.emit(f"{prefix}attempt_errored", **_ids(step, ev.attempt),  # type: ignore[arg-type]
             error=error_fields(ev.error), retry_delay_ms=delay)
    if delay is not None:
        send_attempt(ctx, ev.kind, ev.key, item, ev.attempt + 1, delay_ms=delay,
                     via_retry=ev.via_retry)
    elif isinstance(item, StepRun):
        item.status = StepStatus.ERRORED
        ctx.emit("step_errored", step=step.name, count=step.count, error=error_fields(ev.error))
        _after_step(ctx, item, error)
    else:
        item.status = RollbackStatus.ERRORED
        item.error = error
        ctx.emit("rollback_step_errored", step=step.name, count=step.count,
                 error=error_fields(ev.error))
        advance_rollback(ctx)


def _retry_delay(ctx: Ctx, ev: AttemptFailed, item: Item) -> float | None:
    """Milliseconds until the retry, or None when this failure is final."""
    if not ev.retryable or (isinstance(item, StepRun) and ctx.run.error is not None):
        return None
    in_budget = ev.attempt - budget_base(item) + 1
    policy = policy_of(ctx, ev.kind, ev.key)
    if not may_retry(policy, in_budget):
        return None
    if ev.delay_ms is not None:
        return max(ev.delay_ms, 0.0)
    return retry_delay_ms(policy, in_budget, draw=ev.draw)


def _after_step(ctx: Ctx, step: StepRun, error: ErrorInfo | None = None) -> None:
    """A step's attempt ended for good: advance the saga, fail it, or feed the rollback."""
    run = ctx.run
    if run.error is not None:
        advance_rollback(ctx)
        maybe_finish(ctx)
    elif error is not None:
        if holds(ctx, error):
            hold(ctx, error)
        else:
            fail_saga(ctx, error)
    elif all(run.steps[s.key].status == StepStatus.COMPLETE for s in run.plan.stages[step.stage]):
        if step.stage + 1 < len(run.plan.stages):
            _send_stage(ctx, step.stage + 1)
        else:
            _complete(ctx)


def _send_stage(ctx: Ctx, stage: int) -> None:
    for spec in ctx.run.plan.stages[stage]:
        if spec.wait is None:
            send_attempt(ctx, Kind.STEP, spec.key, ctx.run.steps[spec.key], 1)
        else:
            _begin_wait(ctx, ctx.run.steps[spec.key])


def _begin_wait(ctx: Ctx, step: StepRun) -> None:
    """A waiting stage begins (SPEC section 8): no task runs; it ends on a timer or event."""
    run = ctx.run
    if run.status == SagaStatus.QUEUED:
        run.status = SagaStatus.RUNNING
        run.started_at = ctx.now
        ctx.emit("saga_started")
    step.start_seq = run.next_seq
    run.next_seq += 1
    spec = run.plan.spec(step.key)
    assert spec.wait is not None
    previous = stage_output(run, step.stage - 1) if step.stage > 0 else None
    if begin_wait(ctx, step, spec.wait, previous):
        _after_step(ctx, step)


def _on_wake(ctx: Ctx, ev: WakeUp) -> Transition:
    """A waiting stage's timer fired: the sleep is over, or the wait timed out; or a held
    saga's hold timeout passed: it rolls back."""
    if ev.key == HOLD_KEY:
        if is_hold_timer(ev.key, ev.attempt, ctx):
            _roll_back_held(ctx)
        return ctx.transition()
    if ctx.run.is_terminal or ev.key not in ctx.run.steps:
        return ctx.transition()
    ended = wake(ctx, ev)
    if ended is not None:
        step, error = ended
        if error is not None:
            ctx.emit("step_errored", step=step.name, count=step.count,
                     error=error_fields(error))
        _after_step(ctx, step, error)
    return ctx.transition()


def _on_event(ctx: Ctx, ev: EventSent) -> Transition:
    """``send_event``: taken by the wait for its type, or kept for a later one."""
    run = ctx.run
    if run.is_terminal:
        return _refuse(run, f"saga {run.id!r} is already {run.status}: it takes no more "
                            f"events (got {ev.event_type!r})")
    step = deliver(ctx, ev)
    if step is not None:
        _after_step(ctx, step)
    return ctx.transition()


def _complete(ctx: Ctx) -> None:
    run = ctx.run
    run.output = stage_output(run, len(run.plan.stages) - 1)
    run.status = SagaStatus.COMPLETE
    run.ended_at = ctx.now
    ctx.emit("saga_completed")


def stage_output(run: SagaRun, stage: int) -> JsonValue:
    """A stage's output: its step's output, or the list of a group's outputs in order."""
    specs = run.plan.stages[stage]
    if len(specs) == 1 and not specs[0].in_group:
        return run.steps[specs[0].key].output
    return [run.steps[spec.key].output for spec in specs]


def _ids(step: StepRun, attempt: int) -> dict[str, Any]:
    return {"step": step.name, "count": step.count, "attempt": attempt}


# --- requests from the saga's owner ------------------------------------------------------


def _on_rollback_requested(ctx: Ctx) -> Transition:
    """``rollback()`` of a held saga: the rollback starts as for a failure."""
    if not _roll_back_held(ctx):
        return _refuse(ctx.run, f"saga {ctx.run.id!r} is {ctx.run.status}: only a held saga "
                                "can be rolled back with rollback()")
    return ctx.transition()


def _roll_back_held(ctx: Ctx) -> bool:
    error = release(ctx)
    if error is None:
        return False
    fail_saga(ctx, error)
    return True


def _on_terminate(ctx: Ctx, ev: TerminateRequested) -> Transition:
    run = ctx.run
    if run.is_terminal:
        return _refuse(run, f"saga {run.id!r} is already {run.status}: nothing to terminate")
    release(ctx)  # a held saga is terminated as a running one
    if run.error is not None:  # already stopping: recorded, and the rollback goes on as it is
        ctx.emit("terminate_requested", rollback=ev.rollback, reason=ev.reason)
        return ctx.transition()
    error = ErrorInfo(type="Terminated", message=ev.reason)
    run.terminate = Termination(rollback=ev.rollback, error=error)
    ctx.emit("terminate_requested", rollback=ev.rollback, reason=ev.reason)
    fail_saga(ctx, error, rollback=ev.rollback)
    return ctx.transition()


def _on_retry_rollback(ctx: Ctx, ev: RetryRollbackRequested) -> Transition:
    refusal = resume_rollback(ctx)
    if refusal is not None:
        return _refuse(ctx.run, refusal)
    return ctx.transition()
