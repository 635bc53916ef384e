"""Compacting and archiving finished sagas off the step's path: one thread per process.

The commit that ends a saga also adds its id to ``<prefix>finishing`` (``keys.py``): the
durable "to compact / to archive" marker.  Once the commit is answered, the store hands the
id to this process's ``Finisher``, whose thread compacts the saga (or archives it and leaves
a tombstone) and then removes the marker.  The task that ended the saga does not wait for
any of it, and the thread works when the process is quiet (no commit for ``QUIET_S``), in
batches, so saga steps are not slowed by it; it waits ``MAX_DEFER_S`` at most, and never
once ``BATCH`` sagas are waiting.

A process killed between the commit and the end of that work leaves the marker behind: the
recovery sweep (``RedisStore.finish_pending``, called by every sweep) and the thread of any
other process (every ``TAKEOVER_EVERY_S``) finish the sagas whose marker is older than a
grace, so nothing is lost; the work is idempotent, so nothing is done twice in effect.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import structlog

log = structlog.get_logger("saga_celery")

TAKEOVER_EVERY_S = 30.0
"""How often a process's finisher thread looks for markers other processes left behind."""
TAKEOVER_GRACE_MS = 60_000
"""How old a marker must be before another process takes it over."""
BATCH = 200
"""Most sagas finished together (one read, one archive transaction, one write); a queue this
long is worked off at once, however busy the process."""
QUIET_S = 0.05
"""The thread waits until the process has committed nothing for this long (no saga task is
running in it): the steps' own work goes first, and ended sagas gather into batches."""
MAX_DEFER_S = 2.0
"""Longest an ended saga waits for a quiet moment before it is finished anyway."""


class Finisher:
    """A queue of finished saga ids and the daemon thread that works it off.

    ``finish(ids)`` does the work of a batch of sagas (``RedisStore.finish_many``); ``takeover()``
    finishes what other processes left (``RedisStore.finish_pending``).  Started on first use
    in each process (a prefork child starts its own: threads do not survive a fork)."""

    def __init__(self, finish: Callable[[list[str]], object],
                 takeover: Callable[[], int] | None = None) -> None:
        # Weakly: the store owns its finisher, and a store dropped must be freed at once (it
        # hands its thread's Redis connection back then); the thread ends with it.
        self._finish = _weak(finish)
        self._takeover = None if takeover is None else _weak(takeover)
        self._queue: queue.Queue[str] = queue.Queue()
        self._pid = 0
        self._lock = threading.Lock()
        self._busy = 0
        self._active_at = 0.0
        me = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_in_child(me))

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's lock (maybe held), queue and thread are not ours."""
        self._lock = threading.Lock()
        self._queue = queue.Queue()
        self._busy = 0
        self._pid = 0

    def activity(self) -> None:
        """The process is working on sagas now (the store calls it at every commit): the
        thread waits for a quiet moment (``QUIET_S``) before it works off its queue."""
        self._active_at = time.monotonic()

    def submit(self, saga_id: str) -> None:
        """Finish this saga soon, on the thread; never blocks, never raises."""
        self._ensure_thread()
        with self._lock:
            self._busy += 1
        self._queue.put(saga_id)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted saga is finished (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._busy == 0:
                    return True
            time.sleep(0.01)
        return False

    def _ensure_thread(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid:
                return
            self._pid = pid
            threading.Thread(target=self._work, name="saga-finisher", daemon=True).start()

    def _work(self) -> None:
        next_takeover = time.monotonic() + TAKEOVER_EVERY_S
        while True:
            batch = self._next_batch()
            finish = self._finish()
            if finish is None:
                return  # its store is gone
            if batch:
                self._safely(partial(finish, batch), ",".join(batch))
                with self._lock:
                    self._busy -= len(batch)
            if self._takeover is not None and time.monotonic() >= next_takeover:
                next_takeover = time.monotonic() + TAKEOVER_EVERY_S
                takeover = self._takeover()
                if takeover is not None:
                    self._safely(takeover, None)

    def _next_batch(self) -> list[str]:
        try:
            batch = [self._queue.get(timeout=1.0)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + MAX_DEFER_S
        while self._queue.qsize() + 1 < BATCH:
            now = time.monotonic()
            quiet_for = now - self._active_at
            if quiet_for >= QUIET_S or now >= deadline:
                break
            time.sleep(min(QUIET_S - quiet_for, deadline - now))
        while len(batch) < BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    @staticmethod
    def _safely(action: Callable[[], object], saga_id: str | None) -> None:
        try:
            action()
        except Exception as exc:
            log.warning("saga.finish_deferred", saga_id=saga_id, error=str(exc))


def _weak(method: Callable[..., Any]) -> Callable[[], Callable[..., Any] | None]:
    """A weak reference to a bound method (a plain function is kept as it is)."""
    if hasattr(method, "__self__"):
        return weakref.WeakMethod(method)
    return lambda: method


def _reset_in_child(finisher: weakref.ref[Finisher]) -> None:
    found = finisher()
    if found is not None:
        found.reset_after_fork()
