"""The saga store interface: where ``SagaRun`` documents, their events and leases live.

Every write of one saga is one atomic compare-and-set on the saga's version, together with
the lifecycle events it records and the lease it takes or gives back, so a transition is
either wholly recorded or not at all.  Implementations: ``RedisStore`` (production, and
fakeredis in fast tests) and ``MemoryStore`` (the in-memory twin).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from saga_celery._core.model import SagaRun

EventDict = Mapping[str, Any]


class Snapshot(NamedTuple):
    """A saga as loaded: the run, the version to compare-and-set against, and a lease."""

    run: SagaRun
    version: int
    lease_holder: str | None = None
    """Token holding the lease asked for in ``load(lease=...)``, or None if free/expired."""
    journal: int = 0
    """Journaled starts the run was replayed from (``_store/journal.py``), 0 if none."""


class LeaseAction(StrEnum):
    ACQUIRE = "acquire"
    RELEASE = "release"


class LeaseChange(NamedTuple):
    """A lease taken (only if free) or given back (only by its holder) with a commit."""

    name: str
    token: str
    action: LeaseAction
    ttl_ms: int = 0


class Timer(NamedTuple):
    """A message that is due later than a Celery countdown may wait (SPEC section 8).

    Recorded in the store with the commit that decided it; a worker's timer poller
    (``_celery/timers.py``) claims it once due and sends the outbox entry it names."""

    saga_id: str
    dispatch_id: str
    """The outbox entry to send (``Dispatch.id``)."""
    due_ms: int
    """When it is due, in epoch ms (for a claimed timer: when the claim lapses)."""


def timer_member(timer: Timer) -> str:
    """How a timer is named in a store's timer set: its saga id and outbox entry, as JSON
    (either may hold any character)."""
    return json.dumps([timer.saga_id, timer.dispatch_id], separators=(",", ":"))


def timer_of(member: str, due_ms: int) -> Timer | None:
    """The timer named ``member``; None for a member that is not one (not ours)."""
    try:
        saga_id, dispatch = json.loads(member)
    except (TypeError, ValueError):
        return None
    if not isinstance(saga_id, str) or not isinstance(dispatch, str):
        return None
    return Timer(saga_id, dispatch, due_ms)


class CorruptRecord(NamedTuple):
    """A saga the recovery sweep could not read, moved out of the active index."""

    saga_id: str
    at_ms: int
    """When it was moved aside, in epoch ms."""
    why: str
    """The error that reading it raised."""


class SweepRecord(NamedTuple):
    """What the last recovery sweep saw, written as it ends; ``saga-celery health`` reads it.

    "Overdue" counts the outbox entries (messages recorded as due) whose attempt had not
    started ``grace`` after they were first due; timers (SPEC section 8) add theirs to the
    same three ``oldest_*`` fields and count (``_celery/health.py``, ``SweepTally``).
    """

    swept_at_ms: int
    """When the sweep ended, in epoch ms."""
    sagas: int
    """The unfinished sagas it looked at."""
    overdue: int = 0
    """The overdue messages it found (and re-sent, unless backing off)."""
    oldest_overdue_ms: int | None = None
    """Since when the oldest of them has been waiting, in epoch ms; None if none."""
    oldest_overdue_saga: str | None = None
    """The saga of that oldest overdue message."""
    oldest_overdue_message: str | None = None
    """Which message it is (``step:<key>:<attempt>`` or ``rollback:<key>:<attempt>``)."""
    interval_ms: int | None = None
    """How often beat runs the sweep (``SagaApp.recovery_interval``), as the last sweep that
    beat started recorded it; None until one did.  A sweep run by hand keeps it."""


class SagaStore(Protocol):
    """Persistence for saga runs.  All methods raise ``SagaStoreError`` subclasses only."""

    def ping(self) -> None:
        """Raise ``SagaStoreUnavailableError`` if the store cannot be reached."""

    def create(self, run: SagaRun, events: Sequence[EventDict],
               timers: Sequence[Timer] = ()) -> bool:
        """Store a new run at version 1 with its first events; False if the id exists.

        ``timers``: those of a saga whose first stage waits, recorded with the creation
        (nothing else would record them but the recovery sweep)."""

    def load(self, saga_id: str, *, lease: str | None = None) -> Snapshot | None:
        """The run and its version (None if unknown), and who holds ``lease`` if asked."""

    def load_runs(self, saga_ids: Sequence[str]) -> list[SagaRun | None]:
        """The runs of ``saga_ids`` in their order, None for an unknown id: what a list of
        sagas reads, in one round trip (and one archive query) rather than one a saga."""

    def commit(
        self,
        run: SagaRun,
        *,
        version: int,
        events: Sequence[EventDict],
        lease: LeaseChange | None = None,
        terminal: bool = False,
        journal: bytes | None = None,
        timers: Sequence[Timer] = (),
    ) -> bool:
        """Write ``run`` as version+1 if the stored version is still ``version``.

        Appends ``events`` to the saga's event stream in order, applies ``lease`` (an
        acquire fails the whole commit if another token holds the lease), and when
        ``terminal`` drops the saga from the active index and starts its retention clock.
        Returns False, writing nothing, on a version or lease conflict.  The plan is the
        one ``create`` stored (it never changes).  ``journal``, given for a transition that
        leaves the saga running, is the transition as a journal line: the store may append
        it to the stored run's journal instead of writing the whole run
        (``_store/journal.py``).  ``timers`` are recorded with the commit (only a
        commit that decides a long delay has any); on Redis Cluster, right after it.
        """

    def add_timers(self, timers: Sequence[Timer]) -> None:
        """Record ``timers`` not recorded yet (one already there keeps its due time): the
        recovery sweep's repair of a timer a Cluster commit recorded without."""

    def claim_timers(self, now_ms: int, hold_ms: int, limit: int = 100) -> list[Timer]:
        """Claim at most ``limit`` timers due at ``now_ms``, oldest first, atomically: each
        is due again ``hold_ms`` later, so another claimer skips it and, if the claimer dies
        before ``drop_timer``, it fires again then.  Returned with their original due time."""

    def drop_timer(self, timer: Timer) -> None:
        """Forget a timer whose message is sent (or no longer due)."""

    def renew_lease(self, saga_id: str, name: str, token: str, ttl_ms: int) -> bool:
        """Extend a lease this token holds; False if it no longer holds it."""

    def release_lease(self, saga_id: str, name: str, token: str) -> bool:
        """Give back a lease this token holds; False if it did not hold it."""

    def read_events(
        self,
        saga_id: str,
        *,
        after: str = "0",
        count: int | None = None,
        block_ms: int | None = None,
    ) -> list[tuple[str, dict[str, Any]]]:
        """Events after stream id ``after``, oldest first, waiting up to ``block_ms``."""

    def active_ids(self, limit: int = 1000) -> list[str]:
        """Ids of sagas that may not be terminal yet, oldest first (a superset)."""

    def active_page(self, after_ms: int | None = None, count: int = 1000
                    ) -> tuple[list[str], int | None]:
        """One page of the active index, oldest first, and the cursor of the next page.

        The page holds the ``count`` oldest ids created after ``after_ms`` (epoch ms; None:
        from the oldest), and every other id created in the same ms as its last one, so it
        may run over ``count``.  The cursor is that last creation time, or None when no page
        follows.  Paging from None to the end (``active_pages``) visits every saga active
        throughout exactly once, whatever joins or leaves the index meanwhile.
        """

    def mark_corrupt(self, saga_id: str, why: str, *, at_ms: int) -> None:
        """Move an id whose record cannot be read from the active index to the corrupt
        records, with when (epoch ms) and why; marking it again updates both."""

    def corrupt_records(self, limit: int = 100) -> list[CorruptRecord]:
        """The sagas moved aside by ``mark_corrupt``, the most recently moved first."""

    def list_ids(self, limit: int = 100) -> list[str]:
        """Ids of known sagas, newest first."""

    def forget_active(self, saga_id: str) -> None:
        """Drop an id from the active index (the sweeper found it terminal or gone)."""

    def prune_index(self, limit: int = 1000) -> int:
        """Drop the ids among the ``limit`` oldest indexed whose saga expired; how many."""

    def record_sweep(self, record: SweepRecord) -> None:
        """Replace the record of the last sweep with ``record``, in one write; an
        ``interval_ms`` of None keeps the one recorded before."""

    def last_sweep(self) -> SweepRecord | None:
        """The record of the last sweep, None if no sweep ever ran; one read, so a probe
        may call it every few seconds."""

    # -- finished sagas (SPEC section 11; ``history.py``, ``finisher.py``) ---------------

    def delete(self, saga_id: str) -> bool:
        """Remove an ended saga everywhere it is kept (and from the indexes); False if
        there was none.  ``SagaStateError`` while it runs, deleting nothing."""

    def finish_pending(self, older_than_ms: int = 60_000, limit: int = 1000) -> int:
        """Compact or archive the ended sagas a dead process left marked for longer than
        ``older_than_ms`` (the recovery sweep calls it); how many were finished."""


def active_pages(store: SagaStore, count: int = 1000) -> Iterator[list[str]]:
    """Every page of the active index, oldest first (see ``SagaStore.active_page``)."""
    ids, after = store.active_page(None, count)
    yield ids
    while after is not None:
        ids, after = store.active_page(after, count)
        yield ids
