"""The lease keeper: one thread per process renews the leases of running attempts."""

from __future__ import annotations

import threading
import time

from structlog.testing import capture_logs

from saga_celery._celery.leases import LeaseKeeper
from saga_celery._engine import Engine, Lease
from saga_celery._store.memory import MemoryStore


class Flaky(Engine):
    """An engine whose first renewal fails with an error nobody planned for."""

    def __init__(self) -> None:
        super().__init__(MemoryStore())
        self.renewals = 0
        self.renewed = threading.Event()

    def renew(self, saga_id: str, lease: Lease) -> bool:
        self.renewals += 1
        if self.renewals == 1:
            raise RuntimeError("a bug, a broken pipe, anything")
        self.renewed.set()
        return True


def test_renewal_survives_an_unexpected_error_and_logs_it() -> None:
    """One renewal raising something unexpected neither stops the thread nor the renewals
    after it (it stopped for good before, and every lease it kept lapsed)."""
    engine = Flaky()
    keeper = LeaseKeeper(engine, ttl_ms=30)  # renews every 10 ms
    with capture_logs() as logs:
        keeper.hold("s-1", Lease("step:a#1", "token", 30))
        try:
            assert engine.renewed.wait(2.0), "renewals stopped after the first error"
        finally:
            keeper.drop("s-1", Lease("step:a#1", "token", 30))
    failed = [e for e in logs if e["event"] == "saga.lease_renew_failed"]
    assert failed and failed[0]["error"] == "RuntimeError('a bug, a broken pipe, anything')"
    time.sleep(0.05)
