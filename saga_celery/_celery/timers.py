"""Timers (SPEC section 8): delays longer than a Celery countdown may safely wait.

The Redis transport redelivers any message held unacknowledged longer than its visibility
timeout, so a countdown message must not wait long.  A message due later than
``max_countdown`` is therefore not sent when its delay is decided: the commit that decides
it records a timer in the saga store (``Engine.timers_of``), and every worker runs a timer
poller (a bootstep, about once a second) that claims due timers atomically and sends their
outbox entries.  One claim per timer: a claimer that dies before sending leaves it to fire
again when the claim lapses; a receiver drops any duplicate, as it always does.  No beat.

A timer names an outbox entry; when the saga has moved on (the entry started, was cancelled,
or the saga ended), firing it sends nothing and forgets it.  A waiting stage's ``wake``
entry is no message: firing its timer applies the wake-up to the saga (the sleep ends, or
the wait times out) and sends what that decides.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import structlog
from celery import Celery, bootsteps

from saga_celery._celery.dispatch import Dispatcher
from saga_celery._celery.routing import visibility_timeout
from saga_celery._core.events import WakeUp
from saga_celery._core.model import Kind
from saga_celery._engine import Engine, epoch_ms
from saga_celery._errors import SagaConfigError, SagaError, SagaNotFoundError
from saga_celery._store.base import Timer

log = structlog.get_logger("saga_celery")

MAX_COUNTDOWN_CAP_S = 300.0
"""The default ``max_countdown`` is at most 5 minutes, and 5 minutes on brokers other than
Redis (SPEC section 8)."""
POLL_INTERVAL_S = 1.0
"""How often each worker looks for due timers: a timer fires within about this of its due
time (one cheap command per second per worker)."""
CLAIM_HOLD_MS = 30_000
"""How long a claimed timer is left to its claimer before another worker fires it again."""
CLAIM_BATCH = 100
"""At most this many timers are claimed per round trip (a poll goes on while it gets a full
batch)."""


class Countdowns:
    """The longest countdown a saga message is sent with (``SagaApp(max_countdown=...)``).

    The default is read from the app's settings when first needed and again when a worker
    starts (``refresh``): settings assigned after ``SagaApp()`` count."""

    def __init__(self, app: Celery, explicit_s: float | None) -> None:
        self._app = app
        self._explicit_s = explicit_s
        self._limit_s: float | None = None
        self.refresh()

    def __call__(self) -> float:
        if self._limit_s is None:
            self._limit_s = default_max_countdown_s(self._app)
        return self._limit_s

    def refresh(self) -> None:
        """Read the settings again; ``SagaConfigError`` if an explicit ``max_countdown`` is
        not below the Redis transport's visibility timeout (its messages would come back)."""
        limit = visibility_timeout(self._app)
        if self._explicit_s is not None and limit is not None and self._explicit_s >= limit:
            raise SagaConfigError(
                f"SagaApp(max_countdown=...) is {self._explicit_s:g} s, not below the Redis "
                f"transport's visibility_timeout ({limit:g} s): Redis would deliver a "
                "waiting message twice. Leave max_countdown unset (a quarter of the "
                "visibility timeout) or lower it.")
        self._limit_s = self._explicit_s


def default_max_countdown_s(app: Celery) -> float:
    """A quarter of the Redis transport's visibility timeout, at most 5 minutes; 5 minutes
    on a broker without one (RabbitMQ)."""
    limit = visibility_timeout(app)
    return MAX_COUNTDOWN_CAP_S if limit is None else min(limit / 4, MAX_COUNTDOWN_CAP_S)


def fire_due(engine: Engine, dispatcher: Dispatcher) -> int:
    """Claim the timers due now and send their messages; how many messages were sent."""
    sent = 0
    while True:
        now = engine.clock()
        claimed = engine.store.claim_timers(epoch_ms(now), CLAIM_HOLD_MS, CLAIM_BATCH)
        for timer in claimed:
            sent += _fire(engine, dispatcher, timer)
        if len(claimed) < CLAIM_BATCH:
            return sent


def _fire(engine: Engine, dispatcher: Dispatcher, timer: Timer) -> int:
    """Send the outbox entry ``timer`` names, if the saga still waits for it; then drop the
    timer.  A failure leaves the claim to lapse, and the timer fires again."""
    try:
        run = engine.load(timer.saga_id).run
    except SagaNotFoundError:  # its retention ran out
        engine.store.drop_timer(timer)
        return 0
    dispatch = None if run.is_terminal else run.outbox.get(timer.dispatch_id)
    if dispatch is not None and dispatch.kind == Kind.WAKE:  # a sleep or a wait's timeout
        woken = engine.handle(run.id, WakeUp(key=dispatch.key, attempt=dispatch.attempt))
        dispatcher.send(woken.run, woken.dispatches)
    elif dispatch is not None:
        dispatcher.send(run, [dispatch])
    if dispatch is not None:
        log.info("saga.timer_fired", saga_id=run.id, message=timer.dispatch_id,
                 late_ms=epoch_ms(engine.clock()) - timer.due_ms)
    engine.store.drop_timer(timer)
    return 0 if dispatch is None else 1


class TimerPoller:
    """Runs ``fire_due`` about once a second in a thread of the worker's main process."""

    def __init__(self, fire: Callable[[], int], interval_s: float = POLL_INTERVAL_S) -> None:
        self._fire = fire
        self._interval_s = interval_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="saga-celery-timers",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stopping.wait(self._interval_s):
            self.poll_once()

    def poll_once(self) -> int:
        """One poll; an error is logged and the next poll tries again (a timer claimed and
        not sent fires again when its claim lapses)."""
        try:
            return self._fire()
        except (SagaError, OSError, ConnectionError) as exc:
            log.warning("saga.timer_poll_failed", error=str(exc))
        except Exception:  # a poller that dies would leave every timer of this worker unsent
            log.exception("saga.timer_poll_failed")
        return 0


def timer_step(poller: Callable[[], TimerPoller]) -> type[bootsteps.StartStopStep]:
    """The worker bootstep that runs a ``TimerPoller`` while the worker runs."""

    class SagaTimers(bootsteps.StartStopStep):  # type: ignore[misc]
        name = "saga_celery.timers"

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.poller = poller()

        def start(self, parent: Any) -> None:
            self.poller.start()

        def stop(self, parent: Any) -> None:
            self.poller.stop()

        def shutdown(self, parent: Any) -> None:
            self.poller.stop()

    return SagaTimers
