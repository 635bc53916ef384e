"""Per-attempt timeouts on pools where Celery's time limits do not apply (threads, solo).

On prefork Celery's soft limit raises ``SoftTimeLimitExceeded`` in the body and its hard
limit kills the child.  The soft limit is a signal (``SIGUSR1``: Celery's docs say time
limits need it), so it can land wherever the child is when it comes: after a pause (a
stopped worker, a slow commit) that is in the task's own bookkeeping, around the body,
where an exception breaks what it records and sends (inside pydantic's serializer it even
stops being a ``SoftTimeLimitExceeded``).  ``SoftLimitGate`` holds it back there and lets
it through only to the body.  Elsewhere the library enforces the timeout itself:

- in the main thread (the solo pool) a ``SIGALRM`` timer raises ``AttemptTimeout`` in the
  body, interrupting even a blocking sleep or socket read, as Celery's soft limit does;
- in another thread (the threads pool), where no signal can reach the body, a watchdog
  raises ``AttemptTimeout`` in it at its next Python instruction and, because a blocking
  call may never get there, records the attempt as timed out itself at the deadline (the
  body's late result is then a duplicate and ignored), as Celery's hard limit does.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from billiard.process import current_process
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init

_in_pool_child = False


class AttemptTimeout(Exception):
    """An attempt ran past its timeout on a pool without Celery time limits."""


def _mark_pool_child(**_: Any) -> None:
    global _in_pool_child
    # the solo pool sends worker_process_init too, from the worker's main process
    _in_pool_child = current_process().name != "MainProcess"


worker_process_init.connect(_mark_pool_child, weak=False)


def celery_enforces_limits() -> bool:
    """True inside a prefork pool process, where Celery's time limits apply."""
    return _in_pool_child


class SoftLimitGate:
    """Lets Celery's soft time limit through to a saga body only, in a prefork child.

    A saga task calls ``begin`` first and ``end`` last; between them a soft limit that
    comes outside the body is held back: before the body, the body then starts by raising
    it (its time ran out first, so it is a timed-out attempt); after it, it is dropped (the
    body has ended; its end, recorded in full, says whether it was late).  One that
    reached the body makes the attempt a timed-out one even if the body swallowed it and
    returned: Celery counts the limit from the task's start, before the commit that starts
    the attempt, so the body's own duration may still look inside the timeout.  Outside saga
    tasks, and in every other process, the handler installed before is called as it was.
    """

    def __init__(self) -> None:
        self.holding = False  # between begin and end, outside the body
        self.held = False  # a soft limit came while holding
        self.reached = False  # a soft limit was let through to the body
        self.installed_in = 0  # the process id the handler was looked at in
        self.wrapped = False  # whether it was there to wrap

    def begin(self) -> None:
        if not _in_pool_child or threading.current_thread() is not threading.main_thread():
            return
        if self.installed_in != os.getpid():
            self.installed_in, self.wrapped = os.getpid(), self._install()
        self.holding, self.held = self.wrapped, False

    def end(self) -> None:
        self.holding = self.held = False

    def run_body(self, fn: Callable[[], Any]) -> Any:
        if not self.holding:  # not a prefork child's main thread, or nothing to wrap
            return fn()
        if self.held:
            self.held = False
            raise SoftTimeLimitExceeded("the soft time limit came before the body began")
        self.holding, self.reached = False, False
        try:
            output = fn()
        finally:
            self.holding = True
        if self.reached:
            raise SoftTimeLimitExceeded("the body returned after its soft time limit "
                                        "reached it (it swallowed the exception)")
        return output

    def _install(self) -> bool:
        previous = signal.getsignal(SOFT_LIMIT_SIGNAL)
        if not callable(previous):  # no soft-limit handler to stand in front of
            return False

        def handle(signum: int, frame: FrameType | None) -> None:
            if self.holding:
                self.held = True
                return
            self.reached = True
            previous(signum, frame)

        signal.signal(SOFT_LIMIT_SIGNAL, handle)
        return True


SOFT_LIMIT_SIGNAL = signal.SIGUSR1
soft_limit_gate = SoftLimitGate()


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, SoftTimeLimitExceeded | AttemptTimeout)


def call_with_timeout(fn: Callable[[], Any], timeout_s: float,
                      on_deadline: Callable[[], None] | None = None) -> Any:
    """Run ``fn`` in this thread; stop it with ``AttemptTimeout`` once ``timeout_s`` passes.

    ``on_deadline`` runs at the deadline on a pool thread, where the body may be stuck in a
    call no exception can interrupt.
    """
    if celery_enforces_limits():
        return soft_limit_gate.run_body(fn)
    if threading.current_thread() is threading.main_thread():
        return _with_alarm(fn, timeout_s)
    return _with_watchdog(fn, timeout_s, on_deadline)


def _raise_timeout(signum: int, frame: FrameType | None) -> None:
    raise AttemptTimeout


def _with_alarm(fn: Callable[[], Any], timeout_s: float) -> Any:
    """``fn`` under a ``SIGALRM`` timer; a timer set before (pytest-timeout's, around a test
    that runs sagas in process with ``saga_celery.testing``) is set again afterwards for
    what is left of it, not cancelled (it fires at once if it fell due meanwhile)."""
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    outer, interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    begun = time.monotonic()
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:
            left = outer - (time.monotonic() - begun)
            signal.setitimer(signal.ITIMER_REAL, max(left, OVERDUE_ALARM_S), interval)


OVERDUE_ALARM_S = 0.001
"""When an outer timer that fell due while a body ran goes off: at once, after it."""


class _Watchdog:
    def __init__(self, thread_id: int, on_deadline: Callable[[], None] | None) -> None:
        self.thread_id = thread_id
        self.on_deadline = on_deadline
        self.lock = threading.Lock()
        self.running = True

    def fire(self) -> None:
        with self.lock:
            if not self.running:
                return
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self.thread_id), ctypes.py_object(AttemptTimeout))
        if self.on_deadline is not None:
            self.on_deadline()

    def finish(self) -> None:
        with self.lock:
            self.running = False


def _with_watchdog(fn: Callable[[], Any], timeout_s: float,
                   on_deadline: Callable[[], None] | None) -> Any:
    watchdog = _Watchdog(threading.get_ident(), on_deadline)
    timer = threading.Timer(timeout_s, watchdog.fire)
    timer.daemon = True
    timer.start()
    try:
        return fn()
    finally:
        watchdog.finish()
        timer.cancel()
