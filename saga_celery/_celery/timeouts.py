"""Per-attempt timeouts on pools where Celery's time limits do not apply (threads, solo).

On prefork Celery's soft limit raises ``SoftTimeLimitExceeded`` in the body and its hard
limit kills the child; elsewhere a watchdog timer raises ``AttemptTimeout`` in the thread
running the body, the way Celery's soft limit does with a signal.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init

_in_prefork_child = False


class AttemptTimeout(Exception):
    """An attempt ran past its timeout on a pool without Celery time limits."""


def _mark_prefork_child(**_: Any) -> None:
    global _in_prefork_child
    _in_prefork_child = True


worker_process_init.connect(_mark_prefork_child, weak=False)


def celery_enforces_limits() -> bool:
    """True inside a prefork pool process, where Celery's time limits apply."""
    return _in_prefork_child


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, SoftTimeLimitExceeded | AttemptTimeout)


class _Watchdog:
    def __init__(self, thread_id: int) -> None:
        self.thread_id = thread_id
        self.lock = threading.Lock()
        self.running = True

    def fire(self) -> None:
        with self.lock:
            if self.running:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self.thread_id), ctypes.py_object(AttemptTimeout))

    def finish(self) -> None:
        with self.lock:
            self.running = False


def call_with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    """Run ``fn`` in this thread; raise ``AttemptTimeout`` in it once ``timeout_s`` passes."""
    if celery_enforces_limits():
        return fn()
    watchdog = _Watchdog(threading.get_ident())
    timer = threading.Timer(timeout_s, watchdog.fire)
    timer.daemon = True
    timer.start()
    try:
        return fn()
    finally:
        watchdog.finish()
        timer.cancel()
