"""What a saga task does when Celery runs it: record the start, run the body, record the end.

Every delivery of an attempt goes through the engine first: a duplicate of a finished
attempt is dropped (re-sending what it should have sent), a duplicate of a running one
waits for its lease to end, and only a delivery that wins the lease runs the body.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import redis
import structlog
from celery import Task
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

from saga_celery._celery.acks import LateAck
from saga_celery._celery.control import CONTROL_KEY, Control
from saga_celery._celery.dispatch import (
    ARGS_REPR,
    Dispatcher,
    Message,
    build_message,
    step_call,
)
from saga_celery._celery.leases import LeaseKeeper
from saga_celery._celery.timeouts import (
    AttemptTimeout,
    call_with_timeout,
    is_timeout,
    soft_limit_gate,
)
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
    RetryLater,
    SagaError,
    SagaStoreUnavailableError,
    StepOutputError,
)

if TYPE_CHECKING:
    from pydantic import JsonValue

log = structlog.get_logger("saga_celery")
_T = TypeVar("_T")

LEASE_MARGIN_S = 0.25
"""How long after a lease could have lapsed a waiting delivery looks at it again."""

BEHIND_MAX_COUNTDOWN_S = 2.0
"""The longest a message waits, each time, for the commit that sent it to show."""

UNREACHABLE: tuple[type[Exception], ...] = (
    SagaStoreUnavailableError, OperationalError, redis.ConnectionError, redis.TimeoutError)
"""The saga store or the broker cannot be reached (a Redis restart, a network cut)."""

UNREACHABLE_PAUSE_S = 1.0
"""How long a task waits before handing back a message it could not record or send."""

BEHIND_LIMIT = 150
"""Times a message comes back for its commit (about five minutes) before it goes on with
what is stored: a commit still not there then was lost (a failover), not slow."""


Body = Callable[[], Any]
BodyHook = Callable[[Control, StepConfig, Body], Body]
"""Given an attempt about to run (its control and config) and its body, the body to run in
its place: the in-process harness's failure injection (``saga_celery.testing``)."""


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


AttemptObserver = Callable[[Control, SagaRun], AbstractContextManager[object]]
"""Wraps each attempt a delivery runs, whatever its kind (``saga_celery.otel``: its span)."""


class Runtime:
    """Runs saga step and rollback tasks on a worker (and records hard timeouts)."""

    def __init__(self, engine: Engine, dispatcher: Dispatcher, settings: RuntimeSettings):
        self.engine = engine
        self.dispatcher = dispatcher
        self.settings = settings
        self.keeper = LeaseKeeper(engine, settings.lease_ttl_ms)
        self.observe_attempt: AttemptObserver | None = None
        """Set by ``saga_celery.otel.instrument``; None (the default) costs nothing."""
        self.body_hook: BodyHook | None = None
        """Wraps every attempt's body when set (``saga_celery.testing``)."""
        self.draw: Callable[[], float] = random.random
        """The random draw of a failed attempt (a jittered retry delay comes from it)."""

    # --- entry points ------------------------------------------------------------------

    def run_step(self, task: Task, control: Control, args: tuple[Any, ...],
                 kwargs: dict[str, Any], config: StepConfig) -> None:
        def proceed(run: SagaRun, lease: Lease, ack: LateAck | None) -> None:
            def context() -> StepContext:  # built if the body calls current_step()
                return StepContext(saga_id=run.id, step=control.step, count=control.count,
                                   attempt=control.attempt, config=config, params=run.params,
                                   idempotency_key=step_idempotency_key(
                                       run.id, control.step, control.count,
                                       key_format=run.format))

            token = _current.set(context)
            try:
                self._execute(task, control, lease, config, lambda: task.run(*args, **kwargs),
                              ack)
            finally:
                _current.reset(token)

        self._run(task, control, proceed)

    def run_rollback(self, task: Task, control: Control, config: StepConfig) -> None:
        def proceed(run: SagaRun, lease: Lease, ack: LateAck | None) -> None:
            self._execute(task, control, lease, config,
                          lambda: task.run(_rollback_context(run, control, config)), ack)

        self._run(task, control, proceed)

    def _run(self, task: Task, control: Control,
             proceed: Callable[[SagaRun, Lease, LateAck | None], None]) -> None:
        """Start the attempt, then ``proceed`` with it if this delivery is to run it; a soft
        time limit reaches only the body meanwhile (``SoftLimitGate``)."""
        soft_limit_gate.begin()
        try:
            ack = self.dispatcher.late_ack(task.request)
            started = self._bookkeeping(control, lambda: self._start(task, control, ack))
            if started is not None:
                observe = self.observe_attempt
                if observe is None:
                    proceed(*started, ack)
                else:
                    with observe(control, started[0]):
                        proceed(*started, ack)
        finally:
            soft_limit_gate.end()

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
                                        not_before=self._not_before(control))
        self.dispatcher.send(transition.run, transition.dispatches)
        if transition.decision in (Decision.WAIT, Decision.BEHIND):
            self._requeue(task, control, transition.decision)
        if transition.decision != Decision.RUN:
            log.debug("saga.delivery_skipped", saga_id=control.saga_id, step=control.step,
                      attempt=control.attempt, decision=str(transition.decision))
            self.dispatcher.ack(ack)
            return None
        run = transition.run
        return run, lease._replace(name=lease_name(control.kind, control.key, run.format))

    def _execute(self, task: Task, control: Control, lease: Lease, config: StepConfig,
                 body: Callable[[], Any], ack: LateAck | None) -> None:
        timeout_s = config.timeout.total_seconds()
        if self.body_hook is not None:
            body = self.body_hook(control, config, body)

        def deadline() -> None:  # the lease stays held until the body has really returned
            self.record_timeout(control, timeout_s, None)

        try:
            begun = time.monotonic()
            self.keeper.hold(control.saga_id, lease)
            try:
                output = call_with_timeout(body, timeout_s, deadline)
            finally:
                self.keeper.drop(control.saga_id, lease)
            if time.monotonic() - begun > timeout_s:
                raise AttemptTimeout  # the body swallowed its timeout and returned late
            output = self._checked_output(output) if control.kind == Kind.STEP else None
        except Exception as exc:
            failure, error = exc, error_info(exc, timeout_s=timeout_s)
            retryable = not isinstance(exc, StepOutputError)
            self._bookkeeping(control, lambda: self._failed(task, control, lease, failure,
                                                            error, retryable=retryable))
            raise
        self._bookkeeping(control, lambda: self._succeeded(control, lease, output, ack))

    def _succeeded(self, control: Control, lease: Lease, output: JsonValue,
                   ack: LateAck | None) -> None:
        """Record the end, then send what it decided and acknowledge: only once the end is
        recorded, so a process that dies before leaves its message to come again."""
        ended = AttemptSucceeded(kind=control.kind, key=control.key, attempt=control.attempt,
                                 output=output)
        transition = self.engine.handle(control.saga_id, ended, lease=lease)
        self.dispatcher.send(transition.run, transition.dispatches, ack=ack)  # then the ack

    def _bookkeeping(self, control: Control, step: Callable[[], _T]) -> _T:
        """Run one of the task's own steps (recording with the store, sending with the
        broker).  If either cannot be reached the message is handed back, after a pause,
        for another delivery (``Reject(requeue=True)``) rather than acknowledged with what
        it carries neither recorded nor sent: only the recovery sweep would find it then."""
        try:
            return step()
        except UNREACHABLE as exc:
            log.warning("saga.message_handed_back", saga_id=control.saga_id,
                        step=control.step, attempt=control.attempt, error=str(exc))
            time.sleep(UNREACHABLE_PAUSE_S)
            raise Reject(str(exc), requeue=True) from exc

    def _failed(self, task: Task, control: Control, lease: Lease, exc: Exception,
                error: ErrorInfo, *, retryable: bool = True) -> None:
        """Record a failed attempt; raises Celery's ``Retry`` when the core wants a retry."""
        retryable = retryable and not isinstance(exc, NonRetryableError)
        delay_ms = exc.delay_ms if isinstance(exc, RetryLater) else None
        ended = AttemptFailed(kind=control.kind, key=control.key, attempt=control.attempt,
                              error=error, retryable=retryable, draw=self.draw(),
                              delay_ms=delay_ms)
        transition = self.engine.handle(control.saga_id, ended, lease=lease)
        # Celery's retry publishes through the broker itself; with no broker (the dispatcher's
        # outlet, in process) the retry goes out as every other message, with its countdown.
        retry = _own_retry(transition, control) if self.dispatcher.outlet is None else None
        if retry is not None and self.dispatcher.is_timer(retry):
            retry = None  # waits as a timer in the store: the task just ends, failed
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
        try:
            raise task.retry(args=message.args, kwargs=message.kwargs,
                             countdown=message.countdown, max_retries=limit, exc=exc,
                             kwargsrepr=message.control.kwargs_repr(), argsrepr=ARGS_REPR)
        except Reject as rejected:
            # Celery rejects without requeue when the retry cannot be published: that
            # would drop the message, and with it the retry the saga is waiting for.
            log.warning("saga.retry_not_sent", saga_id=run.id, step=message.control.step,
                        attempt=retry.attempt, error=str(rejected.reason))
            raise Reject(rejected.reason, requeue=True) from rejected

    def _requeue(self, task: Task, control: Control, decision: Decision) -> None:
        """Send this message again for later (not a retry: no attempt is used).

        WAIT: when the lease can have lapsed, had its holder died now (a live holder keeps
        renewing it; a dead one's redelivery or this message then runs the attempt).
        BEHIND: shortly, then less and less often, until the commit that sent it shows.
        """
        req = task.request
        kwargs = dict(req.kwargs or {})
        if decision == Decision.BEHIND:
            countdown = min(0.05 * 2 ** control.behind, BEHIND_MAX_COUNTDOWN_S)
            control = dataclasses.replace(control, behind=control.behind + 1)
            kwargs[CONTROL_KEY] = control.as_kwarg()
        else:
            countdown = self.settings.lease_ttl_ms / 1000 + LEASE_MARGIN_S
        self.dispatcher.resend(Message(task=task.name, args=list(req.args or ()),
                                       kwargs=kwargs, control=control, countdown=countdown,
                                       task_id=req.id, retries=req.retries))

    @staticmethod
    def _not_before(control: Control) -> int | None:
        """The version to wait for, until the message has waited for it long enough."""
        if control.after is not None and control.behind >= BEHIND_LIMIT:
            log.error("saga.commit_never_seen", saga_id=control.saga_id, step=control.step,
                      attempt=control.attempt, version=control.after)
            return None
        return control.after

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
        # Stored, passed on and shown as Celery's JSON serializer would deliver it (a tuple
        # becomes a list, an int dict key a string): what the model holds is JSON.
        round_trip: JsonValue = json.loads(encoded)
        return round_trip

    # --- called in the worker's main process -------------------------------------------

    def record_hard_timeout(self, control: Control, hostname: str | None, pid: int | None,
                            task_id: str | None, timeout_s: float) -> None:
        """The child was killed at the hard time limit and cannot record its own failure:
        record it, and give back the dead child's lease in the same commit."""
        self.record_timeout(control, timeout_s, self._dead_holder(control, hostname, pid,
                                                                  task_id),
                            detail=" (hard time limit: the pool process was killed)")

    def record_timeout(self, control: Control, timeout_s: float, lease: Lease | None, *,
                       detail: str = "") -> None:
        """Fail a running attempt at its deadline on behalf of a body that cannot stop;
        ``lease``, given, is released with the commit."""
        error = ErrorInfo(type="TimeoutError",
                          message=f"the attempt exceeded its timeout of {timeout_s:g} s{detail}")
        ended = AttemptFailed(kind=control.kind, key=control.key, attempt=control.attempt,
                              error=error, draw=self.draw(), via_retry=False)
        transition = self.engine.handle(control.saga_id, ended, lease=lease)
        self.dispatcher.send(transition.run, transition.dispatches)

    def release_lost_lease(self, control: Control, hostname: str | None, pid: int | None,
                           task_id: str | None) -> None:
        """The pool process died: free its lease now so the redelivery need not wait."""
        lease = self._dead_holder(control, hostname, pid, task_id)
        if lease is not None:
            self.engine.release(control.saga_id, lease)

    def _dead_holder(self, control: Control, hostname: str | None, pid: int | None,
                     task_id: str | None) -> Lease | None:
        """The lease the dead pool process held for this attempt, if it still does."""
        run = self.engine.load(control.saga_id).run
        name = lease_name(control.kind, control.key, run.format)
        snapshot = self.engine.store.load(control.saga_id, lease=name)
        holder = snapshot.lease_holder if snapshot else None
        prefix = lease_token(hostname, pid, task_id, control.attempt)
        if holder is None or not holder.startswith(prefix):
            return None
        return Lease(name, holder, self.settings.lease_ttl_ms)


def _rollback_context(run: SagaRun, control: Control, config: StepConfig) -> RollbackContext:
    step = run.steps[control.key]
    trigger = run.rollback.trigger_error if run.rollback else run.error
    failed = [a.error for a in step.attempts if a.error is not None]
    args, kwargs = step_call(run, run.plan.spec(control.key))
    fmt = run.format
    return RollbackContext(
        saga_id=run.id, step=control.step, count=control.count, attempt=control.attempt,
        output=step.output, params=run.params, config=config, error=_pair(trigger),
        idempotency_key=rollback_idempotency_key(run.id, control.step, control.count,
                                                 key_format=fmt),
        args=args, kwargs=kwargs, step_error=_pair(failed[-1] if failed else None),
        step_idempotency_key=step_idempotency_key(run.id, control.step, control.count,
                                                  key_format=fmt),
    )


def _pair(error: ErrorInfo | None) -> dict[str, Any] | None:
    """An error as contexts carry it: ``{"type", "message"}``."""
    return None if error is None else {"type": error.type, "message": error.message}


def _own_retry(transition: Transition, control: Control) -> Dispatch | None:
    for d in transition.dispatches:
        if (d.via_retry and d.kind == control.kind and d.key == control.key
                and d.attempt == control.attempt + 1):
            return d
    return None


def control_of(kwargs: dict[str, Any] | None) -> Control | None:
    """The control of a message the worker's main process handles; None if it has none, or
    one it cannot read (the pool process reports that one)."""
    if not kwargs or CONTROL_KEY not in kwargs:
        return None
    try:
        return Control.parse(kwargs[CONTROL_KEY])
    except SagaError:
        return None
