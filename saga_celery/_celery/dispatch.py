"""Turn outbox entries into Celery task messages and send them."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import kombu.exceptions
import structlog
from celery import Celery
from kombu import Producer
from kombu.exceptions import OperationalError
from kombu.transport import redis as kombu_redis

from saga_celery._celery.acks import LateAck, acks_in_task, late_ack, send_ack
from saga_celery._celery.control import CONTROL_KEY, Control
from saga_celery._core.machine import stage_output
from saga_celery._core.model import Dispatch, Kind, SagaRun, StepSpec
from saga_celery._engine import Horizon
from saga_celery._internals import kombu as kombu_internals
from saga_celery._store.connections import ThreadConnections

_TASK_ID_NS = uuid.UUID("6b0c8d1e-1f0e-4c7a-9a57-5a6a0f1c2b3d")
log = structlog.get_logger("saga_celery")

ARGS_REPR = "(…)"
"""Shown in events and Flower instead of the arguments: payloads stay out of events."""


class Message(NamedTuple):
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    control: Control
    countdown: float
    task_id: str
    retries: int

    def options(self) -> dict[str, Any]:
        return {
            "countdown": self.countdown or None,
            "task_id": self.task_id,
            "retries": self.retries,
            "kwargsrepr": self.control.kwargs_repr(),
            "argsrepr": ARGS_REPR,
            # send_task ignores the task's own ignore_result: without this a caller whose app
            # has a result backend subscribes to a result channel for every saga message
            "ignore_result": True,
        }


Outlet = Callable[[list[Message]], None]
"""Where a dispatcher's messages go instead of the broker (``saga_celery.testing``)."""


def build_message(run: SagaRun, dispatch: Dispatch, now: datetime,
                  after: int | None = None) -> Message:
    """The task, arguments and options of one outbox entry, resolved from the run;
    ``after``: the version being committed with it, if its answer is not in yet."""
    spec = run.plan.spec(dispatch.key)
    control = Control(saga_id=run.id, kind=dispatch.kind, key=spec.key, step=spec.name,
                      count=spec.count, attempt=dispatch.attempt, after=after)
    if dispatch.kind == Kind.STEP:
        task = spec.task
        args, call_kwargs = step_call(run, spec)
        kwargs: dict[str, Any] = {**call_kwargs, CONTROL_KEY: control.as_kwarg()}
    else:
        assert spec.rollback_task is not None
        task, args, kwargs = spec.rollback_task, [], {CONTROL_KEY: control.as_kwarg()}
    budget = dispatch.attempt - dispatch.retries
    countdown = max((dispatch.due_at - now).total_seconds(), 0.0)
    return Message(task=task, args=args, kwargs=kwargs, control=control, countdown=countdown,
                   task_id=task_id(run.id, dispatch.kind, spec.key, budget),
                   retries=dispatch.retries)


def task_id(saga_id: str, kind: Kind, key: str, budget: int) -> str:
    """The Celery task id of every message of one retry budget of a step or rollback
    (``budget``: the attempt that opened it): retries keep it, so Flower shows one task per
    budget, and the dashboard links to it without asking anyone."""
    return str(uuid.uuid5(_TASK_ID_NS, f"{saga_id}|{kind}|{key}|{budget}"))


def step_call(run: SagaRun, spec: StepSpec) -> tuple[list[Any], dict[str, Any]]:
    """The arguments a step is called with: its own, after the previous stage's output
    (as in a Celery chain) unless its signature is immutable."""
    args = list(spec.args)
    if spec.stage > 0 and not spec.immutable:
        args.insert(0, stage_output(run, spec.stage - 1))
    return args, dict(spec.kwargs)


class Dispatcher:
    """Sends messages through ``app.send_task`` so ``task_routes`` routes every one.

    On kombu's Redis transport each process (and thread) publishes through a producer of
    its own, and there sends a running task's late ack (``acks.py``) once the task's
    messages are out; on any other transport it publishes through Celery's producer pool.
    """

    def __init__(self, app: Celery, clock: Callable[[], datetime],
                 max_countdown_s: Callable[[], float | None] = lambda: None) -> None:
        self.app = app
        self.clock = clock
        self.max_countdown_s = max_countdown_s
        """The longest countdown a message is sent with; a later one is a timer's, sent by
        the timer poller when due (``timers.py``).  None: no limit."""
        self._local = threading.local()
        self._horizon = Horizon()
        self._acks_in_task: bool | None = None
        self.outlet: Outlet | None = None
        """Where messages go instead of the broker, when set: the in-process harness's
        queue (``saga_celery.testing``).  None: the broker, through ``app.send_task``."""
        # Probed now, when the app is built: a worker's pool processes, forked later,
        # inherit the answer (and its one warning line) from the main process.
        kombu_internals.own_ack()

    def send(self, run: SagaRun, dispatches: Sequence[Dispatch], *,
             after: int | None = None, ack: LateAck | None = None) -> None:
        """Publish the messages of ``dispatches``, then send ``ack`` if still pending.

        A message due later than ``max_countdown_s`` is not sent: its timer is in the store,
        recorded with the commit that decided it (``Engine.timers_of``)."""
        if dispatches:
            now, limit, horizon = self.clock(), self.max_countdown_s(), self._horizon
            messages = [build_message(run, d, now, after) for d in dispatches
                        if not horizon.is_long(d, self.clock, limit)]
            if messages:
                self._publish(messages)
        self._ack(ack)

    def is_timer(self, dispatch: Dispatch) -> bool:
        """Whether ``dispatch`` waits as a timer in the store rather than as a countdown."""
        return self._horizon.is_long(dispatch, self.clock, self.max_countdown_s())

    def acks_in_task(self) -> bool:
        """Whether saga tasks acknowledge their own messages (``acks.py``); read once."""
        if self._acks_in_task is None:
            self._acks_in_task = acks_in_task(self.app)
        return self._acks_in_task

    def late_ack(self, request: Any) -> LateAck | None:
        """The ack the task running ``request`` sends itself, or None: the main process does
        (or, in process, no broker message is behind the task)."""
        if self.outlet is not None:
            return None
        return late_ack(request) if self.acks_in_task() else None

    def resend(self, message: Message) -> None:
        """Send a running task's own message again, for later (``message.countdown``)."""
        if self.outlet is not None:
            self.outlet([message])
            return
        self.app.send_task(message.task, message.args, message.kwargs,
                           countdown=message.countdown, task_id=message.task_id,
                           retries=message.retries, kwargsrepr=message.control.kwargs_repr(),
                           argsrepr=ARGS_REPR)

    def ack(self, ack: LateAck | None) -> None:
        """Send ``ack``, unless it is sent already."""
        self._ack(ack)

    def _ack(self, ack: LateAck | None) -> None:
        if ack is None or not ack.pending:
            return
        producer = self._producer()
        if producer is not None:  # else no Redis transport: acks_in_task() said otherwise
            send_ack(producer.channel, ack, self._ack_connections(producer))

    def _publish(self, messages: list[Message]) -> None:
        """Publish ``messages``; a publish that fails raises kombu's ``OperationalError``.

        kombu 5.7 can raise ``AttributeError`` from a publish it retries while Redis
        restarts (a queue declared on a connection that went away); reported as the failed
        publish it is, the task hands its message back instead of failing it."""
        if self.outlet is not None:
            self.outlet(messages)
            return
        try:
            self._publish_to(messages)
        except AttributeError as exc:
            raise OperationalError(f"publishing saga messages failed: {exc!r}") from exc

    def _publish_to(self, messages: list[Message]) -> None:
        producer = self._producer()
        if producer is None:
            with self.app.producer_or_acquire() as pooled:
                self._publish_each(pooled, messages)
        elif len(messages) > 1 and hasattr(producer, "batch"):  # kombu 5.7 and later
            self._publish_batch(producer, messages)
        else:  # one message: a batch's pipeline would cost more than it saves
            self._publish_each(producer, messages)

    def _publish_each(self, producer: Producer, messages: list[Message]) -> None:
        for m in messages:
            self.app.send_task(m.task, m.args, m.kwargs, producer=producer, **m.options())

    def _publish_batch(self, producer: Producer, messages: list[Message]) -> None:
        """Publish ``messages`` in one round trip (kombu's ``Producer.batch()``).

        If the batch fails, whether its messages went out is unknown: they go out again
        through kombu's own retried publish (a copy that did go out is dropped as a
        duplicate where it is received).
        """
        try:
            with producer.batch():
                self._publish_each(producer, messages)
        except _BATCH_ERRORS as exc:
            log.warning("saga.publish_retried", error=repr(exc))
            self._publish_each(producer, messages)

    def _producer(self) -> Producer | None:
        """This thread's own producer on the Redis transport, else None (use the pool).

        A forked pool process makes its own: a connection does not survive a fork.
        """
        held: tuple[int, Producer | None] | None = getattr(self._local, "producer", None)
        if held is None or held[0] != os.getpid():
            held = (os.getpid(), self._new_producer())
            self._local.producer = held
        return held[1]

    def _ack_connections(self, producer: Producer) -> ThreadConnections:
        """Kept connections to the broker's Redis for acks: one per thread, from the pool
        of this thread's producer (a kombu client and a redis-py pipeline per ack cost a
        step more than the ack's round trip itself)."""
        held: tuple[Producer, ThreadConnections] | None = getattr(self._local, "acks", None)
        if held is None or held[0] is not producer:
            held = (producer, ThreadConnections(producer.channel.pool))
            self._local.acks = held
        return held[1]

    def _new_producer(self) -> Producer | None:
        connection = self.app.connection_for_write()  # not connected yet
        if getattr(connection.transport, "Channel", None) is not kombu_redis.Channel:
            connection.release()
            return None
        return self.app.amqp.Producer(connection)


_BATCH_ERRORS: tuple[type[Exception], ...] = tuple(
    e for e in (getattr(kombu.exceptions, "BatchPublishError", None),)
    if isinstance(e, type) and issubclass(e, Exception))
"""What a failed ``Producer.batch()`` raises (kombu 5.7 and later)."""
