"""What a saga task does when Celery runs it: record the start, run the body, record the end.

Every delivery of an attempt goes through the engine first: a duplicate of a finished
attempt is dropped (re-sending what it should have sent), a duplicate of a running one
waits for its lease to end, and only a delivery that wins the lease runs the body.
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from celery import Task

from saga_celery._celery.acks import LateAck
from saga_celery._celery.control import CONTROL_KEY, Control
from saga_celery._celery.dispatch import ARGS_REPR, Dispatcher, build_message
from saga_celery._celery.leases import LeaseKeeper
from saga_celery._celery.timeouts import call_with_timeout, is_timeout
from saga_celery._context import (
    RollbackContext,
    StepContext,
    _current,
    rollback_idempotency_key,
    step_idempotency_key,
)
from saga_celery._core.config import StepConfig
from saga_celery._core.events import (
    AttemptFailed,
    AttemptStarted,
    AttemptSucceeded,
    Decision,
    Transition,
)
from saga_celery._core.model import Dispatch, ErrorInfo, Kind, SagaRun
from saga_celery._engine import Engine, Lease, lease_name
from saga_celery._errors import (
    NonRetryableError,
    OutputNotSerializableError,
    OutputTooLargeError,
    StepOutputError,
)

if TYPE_CHECKING:
    from pydantic import JsonValue

log = structlog.get_logger("saga_celery")

WAIT_COUNTDOWN_S = 1.0
"""How long a duplicate delivery waits before looking at the lease again."""


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    lease_ttl_ms: int
    max_output_bytes: int


def error_info(exc: BaseException, *, timeout_s: float | None = None) -> ErrorInfo:
    if is_timeout(exc):
        return ErrorInfo(type="TimeoutError",
                         message=f"the attempt exceeded its timeout of {timeout_s:g} s")
    return ErrorInfo(type=type(exc).__name__, message=str(exc))


def lease_token(hostname: str | None, pid: int | None, task_id: str | None, attempt: int
                ) -> str:
    return f"{hostname}:{pid}:{task_id}:{attempt}"


class Runtime:
    """Runs saga step and rollback tasks on a worker (and records hard timeouts)."""

    def __init__(self, engine: Engine, dispatcher: Dispatcher, settings: RuntimeSettings):
        self.engine = engine
        self.dispatcher = dispatcher
        self.settings = settings
        self.keeper = LeaseKeeper(engine, settings.lease_ttl_ms)

    # --- entry points ------------------------------------------------------------------

    def run_step(self, task: Task, control: Control, args: tuple[Any, ...],
                 kwargs: dict[str, Any], config: StepConfig) -> None:
        ack = self.dispatcher.late_ack(task.request)
        started = self._start(task, control, ack)
        if started is None:
            return
        run, lease = started

        def context() -> StepContext:  # built if the body calls current_step()
            return StepContext(saga_id=run.id, step=control.step, count=control.count,
                               attempt=control.attempt, config=config, params=run.params,
                               idempotency_key=step_idempotency_key(
                                   run.id, control.step, control.count,
                                   key_format=run.plan.key_format))

        token = _current.set(context)
        try:
            self._execute(task, control, lease, config, lambda: task.run(*args, **kwargs), ack)
        finally:
            _current.reset(token)

    def run_rollback(self, task: Task, control: Control, config: StepConfig) -> None:
        ack = self.dispatcher.late_ack(task.request)
        started = self._start(task, control, ack)
        if started is None:
            return
        run, lease = started
        step = run.steps[control.key]
        trigger = run.rollback.trigger_error if run.rollback else run.error
        ctx = RollbackContext(
            saga_id=run.id, step=control.step, count=control.count, attempt=control.attempt,
            output=step.output, params=run.params, config=config,
            error=None if trigger is None else {"type": trigger.type, "message": trigger.message},
            idempotency_key=rollback_idempotency_key(
                run.id, control.step, control.count, key_format=run.plan.key_format),
        )
        self._execute(task, control, lease, config, lambda: task.run(ctx), ack)

    # --- the three phases --------------------------------------------------------------

    def _start(self, task: Task, control: Control, ack: LateAck | None
               ) -> tuple[SagaRun, Lease] | None:
        """Record the attempt's start; None if this delivery is not to run the body (then
        its message is acknowledged here)."""
        req = task.request
        lease = Lease(name=lease_name(control.kind, control.key),
                      token=lease_token(req.hostname, os.getpid(), req.id, control.attempt)
                      + f":{threading.get_ident()}",
                      ttl_ms=self.settings.lease_ttl_ms)
        event = AttemptStarted(kind=control.kind, key=control.key, attempt=control.attempt)
        transition = self.engine.handle(control.saga_id, event, lease=lease,
                                        not_before=control.after)
        self.dispatcher.send(transition.run, transition.dispatches)
        if transition.decision == Decision.WAIT:
            self._requeue(task, control)
        if transition.decision != Decision.RUN:
            log.debug("saga.delivery_skipped", saga_id=control.saga_id, step=control.step,
                      attempt=control.attempt, decision=str(transition.decision))
            self.dispatcher.ack(ack)
            return None
        return transition.run, lease

    def _execute(self, task: Task, control: Control, lease: Lease, config: StepConfig,
                 body: Callable[[], Any], ack: LateAck | None) -> None:
        timeout_s = config.timeout.total_seconds()
        def deadline() -> None:
            self.record_timeout(control, timeout_s, lease)

        try:
            self.keeper.hold(control.saga_id, lease)
            try:
                output = call_with_timeout(body, timeout_s, deadline)
            finally:
                self.keeper.drop(control.saga_id, lease)
            output = self._checked_output(output) if control.kind == Kind.STEP else None
        except Exception as exc:
            self._failed(task, control, lease, exc, error_info(exc, timeout_s=timeout_s),
                         retryable=not isinstance(exc, StepOutputError))
            raise
        ended = AttemptSucceeded(kind=control.kind, key=control.key, attempt=control.attempt,
                                 output=output)
        # The next messages go out while the end commit's answer is on its way, and with
        # them this task's own late ack (acks.py).
        def send(transition: Transition, version: int | None) -> None:
            self.dispatcher.send(transition.run, transition.dispatches, after=version, ack=ack)

        self.engine.handle(control.saga_id, ended, lease=lease, send=send)
        self.dispatcher.ack(ack)  # alone, if no message took it along

    def _failed(self, task: Task, control: Control, lease: Lease, exc: Exception,
                error: ErrorInfo, *, retryable: bool = True) -> None:
        """Record a failed attempt; raises Celery's ``Retry`` when the core wants a retry."""
        retryable = retryable and not isinstance(exc, NonRetryableError)
        ended = AttemptFailed(kind=control.kind, key=control.key, attempt=control.attempt,
                              error=error, retryable=retryable, draw=random.random())
        transition = self.engine.handle(control.saga_id, ended, lease=lease)
        retry = _own_retry(transition, control)
        self.dispatcher.send(transition.run, [d for d in transition.dispatches if d is not retry])
        if retry is not None:
            self._retry(task, transition.run, retry, exc)

    # --- sending ----------------------------------------------------------------------

    def _retry(self, task: Task, run: SagaRun, retry: Dispatch, exc: Exception) -> None:
        """Celery's own retry machinery: same task id, ``countdown``, ``max_retries``."""
        message = build_message(run, retry, self.dispatcher.clock())
        policy = run.plan.spec(retry.key)
        limit = (policy.policy if retry.kind == Kind.STEP else policy.rollback_policy or
                 policy.policy).limit
        raise task.retry(args=message.args, kwargs=message.kwargs,
                         countdown=message.countdown, max_retries=limit, exc=exc,
                         kwargsrepr=message.control.kwargs_repr(), argsrepr=ARGS_REPR)

    def _requeue(self, task: Task, control: Control) -> None:
        """Come back once the lease holder may be done (not a retry: no attempt is used)."""
        req = task.request
        task.app.send_task(task.name, list(req.args or ()), dict(req.kwargs or {}),
                           countdown=WAIT_COUNTDOWN_S, task_id=req.id, retries=req.retries,
                           kwargsrepr=control.kwargs_repr(), argsrepr=ARGS_REPR)

    def _checked_output(self, output: Any) -> JsonValue:
        try:
            encoded = json.dumps(output, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise OutputNotSerializableError(
                f"step output of type {type(output).__name__} is not JSON-serializable: {exc}"
            ) from exc
        size = len(encoded.encode())
        if size > self.settings.max_output_bytes:
            raise OutputTooLargeError(
                f"step output is {size} bytes of JSON, over the limit of "
                f"{self.settings.max_output_bytes} (SagaApp(max_output_bytes=...))")
        return output  # type: ignore[no-any-return]

    # --- called in the worker's main process -------------------------------------------

    def record_hard_timeout(self, control: Control, hostname: str | None, pid: int | None,
                            task_id: str | None, timeout_s: float) -> None:
        """The child was killed at the hard time limit and cannot record its own failure."""
        self.record_timeout(control, timeout_s, None,
                            detail=" (hard time limit: the pool process was killed)")
        self.release_lost_lease(control, hostname, pid, task_id)

    def record_timeout(self, control: Control, timeout_s: float, lease: Lease | None, *,
                       detail: str = "") -> None:
        """Fail a running attempt at its deadline on behalf of a body that cannot stop."""
        error = ErrorInfo(type="TimeoutError",
                          message=f"the attempt exceeded its timeout of {timeout_s:g} s{detail}")
        ended = AttemptFailed(kind=control.kind, key=control.key, attempt=control.attempt,
                              error=error, draw=random.random(), via_retry=False)
        transition = self.engine.handle(control.saga_id, ended, lease=lease)
        self.dispatcher.send(transition.run, transition.dispatches)

    def release_lost_lease(self, control: Control, hostname: str | None, pid: int | None,
                           task_id: str | None) -> None:
        """The pool process died: free its lease now so the redelivery need not wait."""
        name = lease_name(control.kind, control.key)
        prefix = lease_token(hostname, pid, task_id, control.attempt)
        snapshot = self.engine.store.load(control.saga_id, lease=name)
        holder = snapshot.lease_holder if snapshot else None
        if holder is not None and holder.startswith(prefix):
            self.engine.store.release_lease(control.saga_id, name, holder)


def _own_retry(transition: Transition, control: Control) -> Dispatch | None:
    for d in transition.dispatches:
        if (d.via_retry and d.kind == control.kind and d.key == control.key
                and d.attempt == control.attempt + 1):
            return d
    return None


def control_of(kwargs: dict[str, Any] | None) -> Control | None:
    if not kwargs or CONTROL_KEY not in kwargs:
        return None
    return Control.parse(kwargs[CONTROL_KEY])
