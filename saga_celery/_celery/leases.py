"""One background thread per process that keeps the leases of running attempts alive."""

from __future__ import annotations

import os
import threading

import structlog

from saga_celery._engine import Engine, Lease
from saga_celery._errors import SagaStoreError

log = structlog.get_logger("saga_celery")


class LeaseKeeper:
    """Renews every held lease each ``ttl/3``; a killed process simply stops renewing."""

    def __init__(self, engine: Engine, ttl_ms: int) -> None:
        self.engine = engine
        self.interval_s = ttl_ms / 3000.0
        self._held: dict[tuple[str, str, str], Lease] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = 0

    def hold(self, saga_id: str, lease: Lease) -> None:
        """Keep ``lease`` alive until ``drop``: call ``drop`` in a ``finally``.

        (Not a context manager: a generator-based one cost a saga step more than the rest
        of holding its lease.)
        """
        with self._lock:
            self._held[saga_id, lease.name, lease.token] = lease
        self._ensure_thread()

    def drop(self, saga_id: str, lease: Lease) -> None:
        with self._lock:
            self._held.pop((saga_id, lease.name, lease.token), None)

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():  # threads do not survive fork: one per process
            return
        self._pid = os.getpid()
        threading.Thread(target=self._loop, name="saga-lease-keeper", daemon=True).start()

    def _loop(self) -> None:
        while not self._wake.wait(self.interval_s):
            with self._lock:
                held = list(self._held.items())
            for (saga_id, _, _), lease in held:
                self._renew(saga_id, lease)

    def _renew(self, saga_id: str, lease: Lease) -> None:
        """Renew one lease; whatever goes wrong is logged and the thread goes on, since
        every lease this process holds lapses if it stops."""
        try:
            if not self.engine.renew(saga_id, lease):
                log.warning("saga.lease_lost", saga_id=saga_id, lease=lease.name)
        except SagaStoreError as exc:
            log.warning("saga.lease_renew_failed", saga_id=saga_id, lease=lease.name,
                        error=str(exc))
        except Exception as exc:
            log.error("saga.lease_renew_failed", saga_id=saga_id, lease=lease.name,
                      error=repr(exc), exc_info=True)
