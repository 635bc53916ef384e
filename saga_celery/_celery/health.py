"""What a recovery sweep tallies for ``saga-celery health``: the overdue messages it saw.

A message is overdue when its attempt has not started ``grace`` after it was first due.  A
message the sweep re-sent is due again from the re-send, so how long it has waited is
counted from before its re-sends: each came at least ``grace·2^n`` after the one before
(``_core/recovery.py``), so the wait is a lower bound that keeps growing while the message
stays lost instead of starting over at every re-send (an alert on it would flap).

Timers (SPEC section 8) plug in at ``SweepTally.saw``: a timer past its deadline that has
not fired is one more overdue item, waiting since its deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from saga_celery._core.model import Dispatch, SagaRun
from saga_celery._core.recovery import MAX_BACKOFF_DOUBLINGS
from saga_celery._store.base import SweepRecord

__all__ = ["SweepTally", "waiting_since"]


@dataclass
class SweepTally:
    """What one sweep has seen so far: sagas, overdue items, and the oldest of those."""

    sagas: int = 0
    overdue: int = 0
    oldest: tuple[datetime, str, str] | None = None
    """Since when the oldest overdue item has waited, its saga, and which item it is."""

    def count(self, run: SagaRun, now: datetime, grace: timedelta) -> None:
        """Count one unfinished saga and its overdue messages."""
        self.sagas += 1
        for dispatch in run.outbox.values():
            since = waiting_since(run, dispatch, grace)
            if since + grace <= now:
                self.saw(since, run.id, dispatch.id)

    def saw(self, since: datetime, saga_id: str, item: str) -> None:
        """Count one overdue item of ``saga_id`` that has waited since ``since``."""
        self.overdue += 1
        if self.oldest is None or since < self.oldest[0]:
            self.oldest = (since, saga_id, item)

    def record(self, at: datetime, interval: timedelta | None) -> SweepRecord:
        """The record of a sweep that ended ``at``; ``interval`` if beat started it."""
        since, saga_id, item = self.oldest if self.oldest is not None else (None, None, None)
        return SweepRecord(
            swept_at_ms=_ms(at), sagas=self.sagas, overdue=self.overdue,
            oldest_overdue_ms=None if since is None else _ms(since),
            oldest_overdue_saga=saga_id, oldest_overdue_message=item,
            interval_ms=None if interval is None else int(interval.total_seconds() * 1000))


def waiting_since(run: SagaRun, dispatch: Dispatch, grace: timedelta) -> datetime:
    """When ``dispatch`` was first due, at the latest: before its re-sends' back-offs, and
    not before its saga was created (a sweep run by hand with a shorter grace re-sends
    sooner than the back-off says)."""
    backoffs = (grace * 2 ** min(n, MAX_BACKOFF_DOUBLINGS) for n in range(dispatch.resends))
    return max(dispatch.due_at - sum(backoffs, timedelta(0)), run.created_at)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)
