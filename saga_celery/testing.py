"""``saga_celery.testing``: run sagas in this process, on a virtual clock, failures injected.

``SagaTestEnv(sagas)`` takes a ``SagaApp`` as the application declared it (its Redis and its
broker are never contacted) and, until ``close()``, runs its sagas here: state in the
in-memory store, every message the library would publish held in a queue of the
environment's own, and each message run, when its turn comes, by ``Task.apply`` in this
thread, as a solo worker would run it.  Nothing about a saga is decided here: the same
engine and the same pure core a worker uses record every start and end and decide every
retry, delay, rollback and its order, and the step and rollback bodies are the registered
tasks' own.  Only time is virtual: a retry due in an hour runs as soon as nothing is due
before it, and the saga's timestamps say an hour passed.

Failures are injected per attempt: ``fail``, ``fail_rollback``, ``timeout`` and
``timeout_rollback`` put an error in place of one attempt's body, inside the runtime's own
path (a ``NonRetryableError`` skips the retries, a ``RetryLater`` sets the delay, a timeout
is a ``TimeoutError`` attempt whose duration is the configured timeout).  Attempts run one
at a time, each from its start to its end; ``while_running`` acts between the two (runs
another message, terminates), which is how a sibling in flight is staged.  What a test
injected is kept, and applied through the runtime's body hook, by ``_faults.Faults``.

Waiting (SPEC section 8) is virtual too.  A delay longer than the app's ``max_countdown`` (a
long retry delay or ``RetryLater``, a sleep, a wait's timeout, a hold's timeout) is a timer
in the in-memory store, recorded by the engine's own commit; the store's timers join the
queued messages as the things that fall due on the virtual clock, and each, at its due time,
is fired by the app's own timer code (``timers.fire_due``, what the worker bootstep runs).
``send_event``, ``redrive`` and ``rollback`` are the ``SagaHandle``'s own requests, whose
messages come to the environment's queue like every other.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType

from pydantic import JsonValue

from saga_celery._celery.app import InProcess, SagaApp
from saga_celery._celery.definition import SagaDefinition
from saga_celery._celery.dispatch import Message
from saga_celery._celery.handle import SagaHandle
from saga_celery._core.durations import parse_duration
from saga_celery._core.model import Dispatch, SagaRun
from saga_celery._core.state import SagaState
from saga_celery._engine import epoch_ms
from saga_celery._errors import SagaConfigError, SagaError
from saga_celery._faults import Faults
from saga_celery._store.base import Timer
from saga_celery._store.memory import MemoryStore

__all__ = ["PendingMessage", "SagaTestEnv"]

MAX_MESSAGES = 10_000
"""Messages ``run_until_idle`` runs before it gives up on sagas that never go idle."""


@dataclass(frozen=True)
class PendingMessage:
    """A saga message waiting in the environment's queue."""

    due_at: datetime
    """When it runs, on the virtual clock."""
    saga_id: str
    kind: str
    """``"step"`` or ``"rollback"``."""
    step: str
    count: int
    attempt: int


@dataclass(order=True)
class _Queued:
    due: datetime
    seq: int
    message: Message = field(compare=False)


class _Clock:
    """Virtual time: ``now`` moves only when the environment moves it, never backwards."""

    def __init__(self, start: datetime) -> None:
        if not isinstance(start, datetime) or start.tzinfo is None:
            raise SagaConfigError(f"SagaTestEnv(start=...) must be timezone-aware, got {start}")
        self.start = self.current = start.astimezone(UTC)

    def now(self) -> datetime:
        return self.current

    def seconds(self) -> float:
        """Seconds since the start: the in-memory store's clock (leases)."""
        return (self.current - self.start).total_seconds()

    def move_to(self, when: datetime) -> None:
        self.current = max(self.current, when)

    def elapse(self, duration: timedelta) -> None:
        self.move_to(self.current + duration)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SagaTestEnv:
    """Run a ``SagaApp``'s sagas in this process, on a virtual clock; see the module.

    ``start``: the virtual clock's first reading (now, by default).  ``seed``: the random
    draws of failed attempts (a jittered delay), so a run is repeatable.  Use it as a context
    manager, or call ``close()``: until then the ``SagaApp`` runs nothing anywhere else.
    """

    def __init__(self, sagas: SagaApp, *, start: datetime | None = None, seed: int = 0) -> None:
        if not isinstance(sagas, SagaApp):
            raise SagaConfigError(f"SagaTestEnv takes your SagaApp, got {sagas!r}")
        self._sagas = sagas
        self._clock = _Clock(start or datetime.now(UTC))
        self._queue: list[_Queued] = []
        self._seq = itertools.count()
        self._faults = faults = Faults(sagas.app, self._clock.elapse)
        self._store = store = MemoryStore(clock=self._clock.seconds, retention_ms=None)
        self._restore: Callable[[], None] | None = sagas._run_in_process(InProcess(
            store=store, clock=self._clock.now, outlet=self._enqueue, body_hook=faults.body,
            draw=random.Random(seed).random))

    # --- the environment's life ----------------------------------------------------------

    def close(self) -> None:
        """Give the ``SagaApp`` its store, clock and broker back; messages still queued are
        dropped."""
        if self._restore is not None:
            self._restore()
            self._restore = None
        self._queue.clear()

    def __enter__(self) -> SagaTestEnv:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def now(self) -> datetime:
        """The virtual clock's time."""
        return self._clock.now()

    # --- starting and driving sagas ------------------------------------------------------

    def start(self, saga: SagaDefinition, *, saga_id: str | None = None,
              params: JsonValue = None) -> SagaHandle:
        """Start a run of ``saga`` (``saga.apply_async``): its first messages are queued, and
        run by ``run_until_idle``, ``advance`` or ``run_next``."""
        self._check_open()
        if not isinstance(saga, SagaDefinition):
            raise SagaConfigError(f"SagaTestEnv.start takes a saga (sagas.saga(...)), got "
                                  f"{saga!r}")
        return saga.apply_async(saga_id=saga_id, params=params)

    def run_next(self) -> bool:
        """Run the next thing due, moving the clock to its due time: a queued message, or the
        store's timers due then (fired as a worker fires them: a sleep ends, a wait or a
        hold times out, a long delay's message is queued).  False if nothing is left."""
        self._check_open()
        timer = self._next_timer()
        if self._queue and (timer is None or self._queue[0].due <= timer):
            queued = heapq.heappop(self._queue)
            self._clock.move_to(queued.due)
            self._execute(queued.message)
            return True
        if timer is None:
            return False
        self._clock.move_to(timer)
        self._sagas._fire_timers()
        return True

    def run_until_idle(self, *, max_messages: int = MAX_MESSAGES) -> None:
        """Run every queued message, and every one they send, however far in the future,
        until none is left; the clock ends at the last one's time.  ``SagaError`` after
        ``max_messages`` (a saga that never goes idle)."""
        for _ in range(max_messages):
            if not self.run_next():
                return
        raise SagaError(f"SagaTestEnv.run_until_idle: still busy after {max_messages} "
                        f"messages and timers; next: {self.pending()[:3]}")

    def advance(self, duration: timedelta | str | int | float) -> None:
        """Move the clock ``duration`` ahead (a ``timedelta``, ``"30 seconds"``, or a number
        of milliseconds, as ``retries={"delay": ...}``), running every message and firing
        every timer that falls due on the way, at its time."""
        self._check_open()
        until = self._clock.now() + _duration(duration)
        for _ in range(MAX_MESSAGES):
            due = self._next_due()
            if due is None or due > until:
                self._clock.move_to(until)
                return
            self.run_next()
        raise SagaError(f"SagaTestEnv.advance: more than {MAX_MESSAGES} messages fell due")

    def pending(self) -> list[PendingMessage]:
        """The queued messages and the store's timers, the next due first (a timer as the
        outbox entry it fires: ``kind="wake"`` for a sleep's end, a wait's or a hold's
        timeout)."""
        queued = [PendingMessage(due_at=q.due, saga_id=q.message.control.saga_id,
                                 kind=str(q.message.control.kind), step=q.message.control.step,
                                 count=q.message.control.count,
                                 attempt=q.message.control.attempt)
                  for q in sorted(self._queue)]
        timers = [p for p in map(self._pending_timer, self._store.timers()) if p is not None]
        return sorted(queued + timers, key=lambda p: p.due_at)

    # --- requests a test sends ------------------------------------------------------------

    def send_event(self, saga_id: str, event_type: str, payload: JsonValue = None,
                   event_id: str | None = None) -> SagaState:
        """Send an event to saga ``saga_id``: ``sagas.run(saga_id).send_event(...)``, the
        handle's own request (a waiting stage ends with ``payload``; one sent early is kept;
        the same ``event_id`` counts once).  What it decides runs at the next
        ``run_until_idle``, ``advance`` or ``run_next``."""
        self._check_open()
        return self._sagas.run(saga_id).send_event(event_type, payload, event_id=event_id)

    # --- failure injection ---------------------------------------------------------------

    def fail(self, step: object, *, attempt: int | Iterable[int] = 1,
             error: BaseException | None = None, count: int = 1) -> None:
        """Attempt(s) ``attempt`` of ``step`` (its name or the step itself; its ``count``-th
        occurrence in a saga) raise ``error`` instead of running the body.  The default
        error is a ``RuntimeError`` naming the attempt."""
        self._faults.fail(step, attempt, count, rollback=False, error=error)

    def fail_rollback(self, step: object, *, attempt: int | Iterable[int] = 1,
                      error: BaseException | None = None, count: int = 1) -> None:
        """Rollback attempt(s) ``attempt`` of ``step`` raise ``error`` instead of running its
        handler."""
        self._faults.fail(step, attempt, count, rollback=True, error=error)

    def timeout(self, step: object, *, attempt: int | Iterable[int] = 1, count: int = 1) -> None:
        """Attempt(s) ``attempt`` of ``step`` run past the step's timeout: the attempt takes
        the timeout's time on the virtual clock and fails with ``TimeoutError``."""
        self._faults.timeout(step, attempt, count, rollback=False)

    def timeout_rollback(self, step: object, *, attempt: int | Iterable[int] = 1,
                         count: int = 1) -> None:
        """Rollback attempt(s) ``attempt`` of ``step`` run past the handler's timeout."""
        self._faults.timeout(step, attempt, count, rollback=True)

    def while_running(self, step: object, action: Callable[[], object], *,
                      attempt: int | Iterable[int] = 1, rollback: bool = False,
                      count: int = 1) -> None:
        """Call ``action`` while attempt(s) ``attempt`` of ``step`` (of its rollback, with
        ``rollback``) run: after the start is recorded, before the body (or the failure
        injected in its place).  ``env.run_next`` there runs another message with this
        attempt in flight (a parallel sibling failing meanwhile); ``run.terminate`` stops the
        saga under it."""
        self._faults.during(step, action, attempt, count, rollback=rollback)

    def fix(self, step: object, *, rollback: bool = False) -> None:
        """Drop every failure injected for ``step`` (its rollback, with ``rollback``) in
        attempts not run yet: the deploy that fixes it, before ``run.redrive()`` or
        ``run.retry_rollback()``."""
        self._faults.fix(step, rollback=rollback)

    # --- inside ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._restore is None:
            raise SagaConfigError("this SagaTestEnv is closed")

    def _next_due(self) -> datetime | None:
        """When the next thing falls due: a queued message or a timer in the store."""
        due = [t for t in (self._queue[0].due if self._queue else None, self._next_timer())
               if t is not None]
        return min(due, default=None)

    def _next_timer(self) -> datetime | None:
        """When the store's next live timer falls due.  A timer whose outbox entry is gone
        (the event came, the saga was redriven or ended) would send nothing: it does not
        move the clock, and ``fire_due`` drops it along with the next one that fires."""
        for timer in self._store.timers():
            live = self._live(timer)
            if live is not None:
                return _due(timer, live[1])
        return None

    def _live(self, timer: Timer) -> tuple[SagaRun, Dispatch] | None:
        """The saga and the outbox entry ``timer`` names, if firing it would do something
        (``timers._fire``'s test)."""
        snapshot = self._store.load(timer.saga_id)
        if snapshot is None or snapshot.run.is_terminal:
            return None
        entry = snapshot.run.outbox.get(timer.dispatch_id)
        return None if entry is None else (snapshot.run, entry)

    def _pending_timer(self, timer: Timer) -> PendingMessage | None:
        """The outbox entry a live ``timer`` fires, as pending."""
        live = self._live(timer)
        if live is None:
            return None
        run, entry = live
        spec = run.plan.specs_by_key.get(entry.key)  # none for a hold's timeout
        return PendingMessage(due_at=_due(timer, entry), saga_id=timer.saga_id,
                              kind=str(entry.kind), step=entry.key if spec is None else spec.name,
                              count=1 if spec is None else spec.count, attempt=entry.attempt)

    def _enqueue(self, messages: list[Message]) -> None:
        """The outlet: what the library would publish, queued for its countdown."""
        now = self._clock.now()
        for m in messages:
            due = now + timedelta(seconds=m.countdown)
            heapq.heappush(self._queue, _Queued(due, next(self._seq), m))

    def _execute(self, message: Message) -> None:
        """Run one message as a worker would: through the task, arguments as JSON delivers
        them.  The attempt's own failure was recorded by the runtime; anything else raised
        is a fault to show, not to hide."""
        task = self._sagas.app.tasks.get(message.task)
        if task is None:
            raise SagaError(f"saga message for task {message.task!r}, which is not "
                            "registered in this app")
        args, kwargs = json.loads(json.dumps([message.args, message.kwargs]))
        self._faults.forget_errors()
        try:
            task.apply(args=args, kwargs=kwargs, task_id=message.task_id,
                       retries=message.retries, throw=True)
        except Exception as exc:
            if not self._faults.attempt_failure(exc):
                raise
        finally:
            self._faults.forget_errors()


def _due(timer: Timer, entry: Dispatch) -> datetime:
    """When ``timer`` fires: its entry's own due time, so the saga records the exact time
    its delay ended, unless the timer is later (a claim not yet lapsed)."""
    if epoch_ms(entry.due_at) >= timer.due_ms:
        return entry.due_at
    return _EPOCH + timedelta(milliseconds=timer.due_ms + 1)  # +1: claimable despite rounding


def _duration(value: timedelta | str | int | float) -> timedelta:
    try:
        return parse_duration(value)  # never negative: the clock only goes forward
    except ValueError as exc:
        raise SagaConfigError(f"SagaTestEnv.advance: {exc}") from exc
