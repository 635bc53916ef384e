"""Failure, termination and rollback: what to compensate, in which order, and when it ends."""

from __future__ import annotations

from saga_celery._core.attempts import open_attempt, send_attempt, withdraw
from saga_celery._core.events import Ctx, error_fields
from saga_celery._core.model import (
    ErrorInfo,
    Kind,
    OnRollbackError,
    RollbackMode,
    RollbackOutcome,
    RollbackProgress,
    RollbackRun,
    RollbackStatus,
    SagaStatus,
    StepRun,
    StepStatus,
)
from saga_celery._core.waiting import cancel_wait


def fail_saga(ctx: Ctx, error: ErrorInfo, *, rollback: bool = True) -> None:
    """The saga failed (or was terminated): stop forward work and start compensating."""
    run = ctx.run
    run.error = error
    for step in run.steps.values():
        _stop_forward(ctx, step)
    if rollback:
        open_rollback(ctx, error)
    maybe_finish(ctx)


def _stop_forward(ctx: Ctx, step: StepRun) -> None:
    """Cancel what has not started, pending retries and waits; let running attempts finish."""
    if cancel_wait(ctx, step):
        return
    withdraw(ctx, Kind.STEP, step.key, step)
    if step.status == StepStatus.PENDING:
        step.status = StepStatus.CANCELLED
    elif step.status == StepStatus.RUNNING and open_attempt(step) is None:
        step.status = StepStatus.ERRORED
        ctx.emit("step_errored", step=step.name, count=step.count,
                 error=error_fields(step.attempts[-1].error if step.attempts else None))


def eligible_order(ctx: Ctx) -> list[str]:
    """Steps to compensate: started, with a handler; latest start first."""
    started = [s for s in ctx.run.steps.values() if s.rollback is not None and s.start_seq]
    started.sort(key=lambda s: s.start_seq or 0, reverse=True)
    return [s.key for s in started]


def open_rollback(ctx: Ctx, trigger: ErrorInfo) -> None:
    order = eligible_order(ctx)
    if not order:
        return
    run = ctx.run
    run.status = SagaStatus.ROLLING_BACK
    run.rollback = RollbackProgress(total_steps=len(order), order=order, trigger_error=trigger)
    ctx.emit("rollback_started", trigger_error=error_fields(trigger),
             total_steps=len(order), resumed=False)
    advance_rollback(ctx)


def resume_rollback(ctx: Ctx) -> str | None:
    """``retry_rollback()``: give every handler not yet complete a fresh retry budget."""
    run = ctx.run
    progress = run.rollback
    if progress is None or progress.outcome != RollbackOutcome.FAILED:
        outcome = "no rollback" if progress is None else f"rollback outcome {progress.outcome}"
        return f"only a failed rollback can be retried (saga {run.id!r} has {outcome})"
    progress.outcome = None
    progress.error = None
    run.status = SagaStatus.ROLLING_BACK
    run.ended_at = None
    for key in progress.order:
        handler = _handler(ctx, key)
        if handler.status != RollbackStatus.COMPLETE:
            handler.status = RollbackStatus.PENDING
            handler.error = None
            handler.budget_base = (handler.attempts[-1].attempt + 1) if handler.attempts else 1
    ctx.emit("rollback_started", trigger_error=error_fields(progress.trigger_error),
             total_steps=progress.total_steps, resumed=True)
    advance_rollback(ctx)
    return None


def advance_rollback(ctx: Ctx) -> None:
    """Send the handlers that are due; settle the outcome once nothing more can run."""
    progress = ctx.run.rollback
    if progress is None or progress.outcome is not None:
        return
    if ctx.run.plan.rollback_mode == RollbackMode.PARALLEL:
        busy = _advance_parallel(ctx, progress)
    else:
        busy = _advance_sequential(ctx, progress)
    if not busy:
        _settle(ctx, progress)


def _halting(ctx: Ctx, progress: RollbackProgress) -> bool:
    if ctx.run.plan.on_rollback_error != OnRollbackError.HALT:
        return False
    return any(_handler(ctx, k).status == RollbackStatus.ERRORED for k in progress.order)


def _advance_sequential(ctx: Ctx, progress: RollbackProgress) -> bool:
    for key in progress.order:
        handler = _handler(ctx, key)
        if handler.status == RollbackStatus.COMPLETE:
            continue
        if handler.status == RollbackStatus.ERRORED:
            if _halting(ctx, progress):
                return False
            continue
        return _start_handler(ctx, key, handler)
    return False


def _advance_parallel(ctx: Ctx, progress: RollbackProgress) -> bool:
    busy = False
    halting = _halting(ctx, progress)
    for key in progress.order:
        handler = _handler(ctx, key)
        if handler.status in (RollbackStatus.COMPLETE, RollbackStatus.ERRORED):
            continue
        if halting and not _handler_busy(handler):
            continue
        busy = _start_handler(ctx, key, handler) or busy
    return busy


def _start_handler(ctx: Ctx, key: str, handler: RollbackRun) -> bool:
    """Send the handler's next attempt unless it or its step is still running. Always busy."""
    if _handler_busy(handler):
        return True
    if open_attempt(ctx.run.steps[key]) is not None:
        return True  # compensate only once the step's current attempt has ended
    last = handler.attempts[-1].attempt if handler.attempts else 0
    send_attempt(ctx, Kind.ROLLBACK, key, handler, max(last + 1, handler.budget_base))
    return True


def _handler_busy(handler: RollbackRun) -> bool:
    return handler.next_attempt is not None or open_attempt(handler) is not None


def _settle(ctx: Ctx, progress: RollbackProgress) -> None:
    failed = [k for k in progress.order if _handler(ctx, k).status != RollbackStatus.COMPLETE]
    if failed:
        errored = [_handler(ctx, k).error for k in failed if _handler(ctx, k).error]
        progress.outcome = RollbackOutcome.FAILED
        progress.error = errored[0] if errored else None
        ctx.emit("rollback_errored", error=error_fields(progress.error),
                 completed_steps=progress.completed_steps, total_steps=progress.total_steps)
    else:
        progress.outcome = RollbackOutcome.COMPLETE
        ctx.emit("rollback_completed", completed_steps=progress.completed_steps,
                 total_steps=progress.total_steps)
    maybe_finish(ctx)


def maybe_finish(ctx: Ctx) -> None:
    """A failed saga ends once its rollback has an outcome and every attempt has ended."""
    run = ctx.run
    if run.is_terminal or run.error is None:
        return
    if run.rollback is not None and run.rollback.outcome is None:
        return
    if any(open_attempt(step) is not None for step in run.steps.values()):
        return
    run.outbox.clear()
    run.ended_at = ctx.now
    if run.terminate is not None:
        run.status = SagaStatus.TERMINATED
        ctx.emit("saga_terminated", error=error_fields(run.error))
    else:
        run.status = SagaStatus.ERRORED
        ctx.emit("saga_errored", error=error_fields(run.error))


def _handler(ctx: Ctx, key: str) -> RollbackRun:
    handler = ctx.run.steps[key].rollback
    assert handler is not None, f"step {key} has no rollback handler"
    return handler
