"""The engine: load a saga, apply one event with the pure core, commit it atomically.

Between the core (pure) and the Celery adapter (messages): it owns the compare-and-set
loop, leases, event ids and the structlog line of every lifecycle event.  No Celery here.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import structlog
from pydantic import JsonValue

from saga_celery._core.attempts import find_attempt
from saga_celery._core.events import (
    AttemptFailed,
    AttemptStarted,
    AttemptSucceeded,
    Decision,
    Event,
    Transition,
)
from saga_celery._core.machine import apply_owned, start_saga
from saga_celery._core.model import FORMAT, Dispatch, Kind, Plan, SagaRun, SagaStatus
from saga_celery._errors import SagaConflictError, SagaNotFoundError, SagaStoreError
from saga_celery._store.base import LeaseAction, LeaseChange, SagaStore, Snapshot, Timer
from saga_celery._store.encoding import encode_progress
from saga_celery._store.journal import MAX_ENTRIES, encode_entry

log = structlog.get_logger("saga_celery")

MAX_CONFLICTS = 200
"""Compare-and-set retries before giving up: only a pathological storm of writers hits it."""

BEHIND_PAUSES_S = (0.001, 0.002, 0.005, 0.01)
"""How long a start waits here, read after read, for the commit that sent its message
(~20 ms in all).  Past that the answer is ``Decision.BEHIND``: the message comes back later,
without using an attempt, rather than holding a worker slot."""

def utcnow() -> datetime:
    return datetime.now(UTC)


class Lease(NamedTuple):
    """The lease a delivery takes when it runs an attempt, and gives back when it ends."""

    name: str
    token: str
    ttl_ms: int


def lease_name(kind: str, key: str, format: int = FORMAT) -> str:
    """The lease an attempt of ``kind`` (step or rollback) of step ``key`` takes.

    From format 2, one lease per step, held by whichever attempt of the step or of its
    rollback runs, so no two of them ever run at once (a retry waits for the attempt before
    it, a handler for the step it undoes, even where a body outlives its recorded timeout).
    A format-1 saga keeps 0.1.0's names, one per kind, so old and new workers running it
    exclude each other."""
    return f"step:{key}" if format >= 2 else f"{kind}:{key}"


class Engine:
    """Applies events to stored sagas; every write is one atomic commit.

    After a commit the engine knows the saga's exact state and version, so the next event
    for it in this thread (a step's end, often the next step's start) goes straight to the
    compare-and-set without loading first.  A stale entry only costs a conflict and a real
    load; an answer that changes nothing is never taken from it without a real load.

    The remembered state is the committed ``SagaRun`` object itself (validating it again
    from JSON cost more than the commit's own Python work), and it is the one a transition
    returns.  Each thread remembers its own: the run a transition hands a caller is never
    changed by another thread, only by this thread's next event for the same saga, which
    the caller sends once it is done reading the run.
    """

    def __init__(self, store: SagaStore, *, clock: Callable[[], datetime] = utcnow,
                 cache_size: int = 1024,
                 max_countdown_s: Callable[[], float | None] = lambda: None) -> None:
        self.store = store
        self.clock = clock
        self.max_countdown_s = max_countdown_s
        """The longest delay a Celery countdown may carry; None: no limit (no timers)."""
        self._local = threading.local()
        self._cache_size = cache_size
        self._horizon = Horizon()
        self.on_ended: Callable[[SagaRun], None] | None = None
        """Called with a saga's run once this process committed its terminal status
        (``saga_celery.otel``: the saga's root span); never raises into the engine."""

    def rebind(self, store: SagaStore, clock: Callable[[], datetime]
               ) -> tuple[SagaStore, Callable[[], datetime]]:
        """Use ``store`` and ``clock`` from now on, forgetting every remembered saga (in every
        thread); returns the store and clock used until now, to put back later (the
        in-process harness, ``saga_celery.testing``)."""
        before = self.store, self.clock
        self.store, self.clock = store, clock
        self._local = threading.local()
        return before

    @property
    def _cache(self) -> OrderedDict[str, Snapshot]:
        """This thread's remembered sagas."""
        cache: OrderedDict[str, Snapshot] | None = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = OrderedDict()
        return cache

    def submit(self, *, saga_id: str, name: str, plan: Plan, params: JsonValue,
               format: int = FORMAT) -> tuple[Transition, bool]:
        """Create the saga, or return the existing one if it has the same name and params.

        The existing one comes with its first messages to send again if none has started
        yet: the call that created it may have failed before sending them (the broker went
        away), and calling again is how the caller retries.  Receivers drop duplicates."""
        transition = start_saga(saga_id=saga_id, name=name, plan=plan, params=params,
                                now=self.clock(), format=format)
        events = _with_ids(transition.events, saga_id, 1)
        # A saga that starts with a waiting stage records its timers with its creation.
        if self.store.create(transition.run, events, timers=self.timers_of(transition)):
            _log(events)
            return transition, True
        existing = self.load(saga_id).run
        if existing.name != name or existing.params != params:
            raise SagaConflictError(
                f"saga id {saga_id!r} is already used by a {existing.name!r} saga with "
                f"params {existing.params!r}; got {name!r} with params {params!r}. "
                "Use a new saga_id, or the same params to get the existing run.",
                saga_id=saga_id)
        self.repair_timers(existing)  # the call that created it may have lost them (Cluster)
        unstarted = list(existing.outbox.values()) if existing.status == SagaStatus.QUEUED else []
        return Transition(run=existing, dispatches=unstarted), False

    def load(self, saga_id: str) -> Snapshot:
        snapshot = self.store.load(saga_id)
        if snapshot is None:
            raise SagaNotFoundError(
                f"no saga with id {saga_id!r} (never started, or its retention expired)",
                saga_id=saga_id)
        return snapshot

    def handle(self, saga_id: str, event: Event, *, lease: Lease | None = None,
               not_before: int | None = None) -> Transition:
        """Apply ``event`` and commit it; retried on concurrent writes.

        With ``lease`` and an ``AttemptStarted`` event, the lease is taken with the commit
        when the answer is RUN; with an end event it is given back with the commit, or on
        its own when the end changes nothing (the attempt was already recorded as ended, a
        body that outlived its timeout).  A start that leaves the saga running is committed
        as a journal line (``_store/journal.py``) rather than the whole run.

        ``not_before``: the version whose commit sent the message being started.  A store
        behind it is read again for a moment, as the commit may still be on its way; then
        the answer is ``Decision.BEHIND`` (nothing applied): the message is to come back.
        """
        memo = self._cached_for(self._cache.pop(saga_id, None), event)
        if memo is not None and not_before is not None and memo[0].version < not_before:
            memo = None  # this thread's copy predates the message
        fresh: tuple[Snapshot, Event] | None = None
        for _ in range(MAX_CONFLICTS):
            snapshot, applied = memo or fresh or self._load_for(saga_id, event, lease,
                                                                not_before)
            from_memo, memo, fresh = memo is not None, None, None
            lease = _of_format(lease, event, snapshot.run.format)
            if snapshot.version < (not_before or 0):
                return Transition(run=snapshot.run, decision=Decision.BEHIND)
            was_terminal = snapshot.run.is_terminal
            now = self.clock()
            transition = apply_owned(snapshot.run, applied, now=now)
            if not transition.changed:
                if from_memo:
                    continue  # "nothing to do" must come from the stored state
                self._give_back(saga_id, event, lease)
                # A redelivery: its first delivery's commit may have lost its timers.
                self.repair_timers(snapshot.run)
                return transition
            journal = (encode_entry(applied, now)
                       if isinstance(applied, AttemptStarted) and not transition.run.is_terminal
                       and snapshot.journal < MAX_ENTRIES else None)
            if self._commit(snapshot, was_terminal, transition, event, lease, journal):
                if self.on_ended is not None:
                    self._ended(was_terminal, transition)
                return transition
            fresh = self._load_for(saga_id, event, lease)
            if _landed(fresh[0], snapshot.version, transition):
                self._committed(fresh[0], transition)
                if self.on_ended is not None:
                    self._ended(was_terminal, transition)
                return transition
        raise SagaStoreError(f"saga {saga_id!r}: too many concurrent writes to apply "
                             f"{type(event).__name__}", saga_id=saga_id)

    def _ended(self, was_terminal: bool, transition: Transition) -> None:
        if self.on_ended is not None and not was_terminal and transition.run.is_terminal:
            try:
                self.on_ended(transition.run)
            except Exception as exc:  # an observer never costs a commit its answer
                log.warning("saga.observer_failed", saga_id=transition.run.id, error=repr(exc))

    def _give_back(self, saga_id: str, event: Event, lease: Lease | None) -> None:
        """An end that changed nothing still gives its lease back: nothing else will."""
        if lease is not None and not isinstance(event, AttemptStarted):
            self.store.release_lease(saga_id, lease.name, lease.token)

    def _cached_for(self, cached: Snapshot | None, event: Event
                    ) -> tuple[Snapshot, Event] | None:
        """The remembered state, unless the event needs the lease (a redelivery)."""
        if cached is None:
            return None
        if isinstance(event, AttemptStarted) and _has_attempt(cached.run, event):
            return None
        return cached, event

    def _remember(self, saga_id: str, snapshot: Snapshot) -> None:
        self._cache[saga_id] = snapshot
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _load_for(self, saga_id: str, event: Event, lease: Lease | None,
                  not_before: int | None = None) -> tuple[Snapshot, Event]:
        """Load the saga; a start event learns whether another delivery holds the lease."""
        started = lease is not None and isinstance(event, AttemptStarted)
        name = lease.name if lease and started else None
        snapshot = self.store.load(saga_id, lease=name)
        if snapshot is not None and started:
            proper = _of_format(lease, event, snapshot.run.format)
            if proper is not None and proper.name != name:  # a format-1 saga's rollback
                lease, name = proper, proper.name
                snapshot = self.store.load(saga_id, lease=name)
        pauses = iter(BEHIND_PAUSES_S if not_before is not None else ())
        while snapshot is not None and snapshot.version < (not_before or 0):
            pause = next(pauses, None)
            if pause is None:
                break  # handle() answers BEHIND
            time.sleep(pause)  # the commit that sent the message is still on its way
            snapshot = self.store.load(saga_id, lease=name)
        if snapshot is None:
            raise SagaNotFoundError(f"no saga with id {saga_id!r}", saga_id=saga_id)
        if lease is not None and isinstance(event, AttemptStarted):
            live = snapshot.lease_holder not in (None, lease.token)
            event = event.model_copy(update={"lease_live": live})
        return snapshot, event

    def _commit(self, snapshot: Snapshot, was_terminal: bool, transition: Transition,
                event: Event, lease: Lease | None, journal: bytes | None) -> bool:
        """Compare-and-set ``transition`` on ``snapshot``; False when refused."""
        change = _lease_change(transition, event, lease)
        version = snapshot.version
        events = _with_ids(transition.events, transition.run.id, version + 1)
        terminal = transition.run.is_terminal and not was_terminal
        timers = self.timers_of(transition)
        if timers:
            ok = self.store.commit(transition.run, version=version, events=events,
                                   lease=change, terminal=terminal, journal=journal,
                                   timers=timers)
        else:  # the path of every saga that does not wait, exactly as before timers
            ok = self.store.commit(transition.run, version=version, events=events,
                                   lease=change, terminal=terminal, journal=journal)
        if ok:
            self._committed(Snapshot(transition.run, version + 1, None,
                                     snapshot.journal + 1 if journal else 0), transition)
        return ok

    def _committed(self, stored: Snapshot, transition: Transition) -> None:
        """``stored``: the run as committed (``transition.run``), its version and journal."""
        if not transition.run.is_terminal:
            self._remember(transition.run.id, stored if stored.run is transition.run else
                           Snapshot(transition.run, stored.version, None, stored.journal))
        _log(transition.events)  # ``_commit`` gave them their ids

    def timers_of(self, transition: Transition) -> list[Timer]:
        """The timers to record with ``transition``: its messages due later than a Celery
        countdown may wait (SPEC section 8)."""
        return self._long_timers(transition.run, transition.dispatches)

    def repair_timers(self, run: SagaRun) -> None:
        """Record again the timers of ``run``'s messages still waiting out a long delay
        (SPEC section 8).  On Redis Cluster a commit writes its timers beside it, not in it:
        a cut between the two leaves the commit in and a timer out, and the message that
        made the commit is handed back.  Its redelivery, a creation submitted again and the
        recovery sweep call this; a timer already recorded keeps its due time.  Nothing to
        read or write for a saga that does not wait."""
        waiting = self._long_timers(run, list(run.outbox.values()))
        if waiting:
            self.store.add_timers(waiting)

    def _long_timers(self, run: SagaRun, dispatches: Sequence[Dispatch]) -> list[Timer]:
        """The timers of those of ``dispatches`` that wait longer than a Celery countdown
        may (or are a waiting stage's wake-up); no clock read for a saga that does not wait."""
        if not dispatches:
            return []
        limit = self.max_countdown_s()
        if limit is None and not run.plan.waits:
            return []
        horizon, clock = self._horizon, self.clock
        return [Timer(run.id, d.id, epoch_ms(d.due_at)) for d in dispatches
                if horizon.is_long(d, clock, limit)]

    def release(self, saga_id: str, lease: Lease) -> None:
        self.store.release_lease(saga_id, lease.name, lease.token)

    def renew(self, saga_id: str, lease: Lease) -> bool:
        return self.store.renew_lease(saga_id, lease.name, lease.token, lease.ttl_ms)


def epoch_ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def is_long(dispatch: Dispatch, now: datetime, max_countdown_s: float | None) -> bool:
    """Whether ``dispatch`` waits as a timer in the store: a waiting stage's wake-up always
    (it is no message), a message when due later than a Celery countdown may wait."""
    if dispatch.kind == Kind.WAKE:
        return True
    return (max_countdown_s is not None
            and (dispatch.due_at - now).total_seconds() > max_countdown_s)


class Horizon:
    """``is_long`` without reading the clock for a message due no later than a past reading
    of it plus the limit: the clock only moves on, so such a message is due no later than
    now plus the limit either.  Only a message due later reads the clock (and moves the
    horizon): a saga that does not wait pays for no clock reading and no date arithmetic."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        # One attribute, replaced whole: threads sharing it never see a mixed pair.
        self._last: tuple[Callable[[], datetime], float, datetime] | None = None

    def is_long(self, dispatch: Dispatch, clock: Callable[[], datetime],
                max_countdown_s: float | None) -> bool:
        if dispatch.kind == Kind.WAKE:
            return True
        if max_countdown_s is None:
            return False
        last = self._last
        if (last is not None and dispatch.due_at <= last[2] and last[1] == max_countdown_s
                and last[0] == clock):
            return False
        at = clock() + timedelta(seconds=max_countdown_s)
        self._last = (clock, max_countdown_s, at)
        return dispatch.due_at > at


def _of_format(lease: Lease | None, event: Event, format: int) -> Lease | None:
    """``lease`` named as the saga's format names the lease of ``event``'s attempt."""
    if lease is None or not isinstance(event, AttemptStarted | AttemptSucceeded | AttemptFailed):
        return lease
    name = lease_name(event.kind, event.key, format)
    return lease if name == lease.name else lease._replace(name=name)


def _lease_change(transition: Transition, event: Event, lease: Lease | None
                  ) -> LeaseChange | None:
    if lease is None:
        return None
    if isinstance(event, AttemptStarted):
        if transition.decision == Decision.RUN:
            return LeaseChange(lease.name, lease.token, LeaseAction.ACQUIRE, lease.ttl_ms)
        return None
    return LeaseChange(lease.name, lease.token, LeaseAction.RELEASE)


def _with_ids(events: list[dict[str, Any]], saga_id: str, version: int) -> list[dict[str, Any]]:
    """Give each event of the transition committed as ``version`` its id, in place: the
    transition's events are its own, and a transition is committed at most once."""
    for i, e in enumerate(events):
        e["event_id"] = f"{saga_id}/{version}.{i}"
    return events


def _log(events: list[dict[str, Any]]) -> None:
    if not events:
        return
    info = log.bind().info  # the proxy resolves the logger once per transition, not per line
    for e in events:
        fields = e.copy()
        kind = fields.pop("type")
        info(f"saga.{kind}", saga_event=kind, **fields)


def _has_attempt(run: SagaRun, event: AttemptStarted) -> bool:
    step = run.steps.get(event.key)
    item = step if event.kind == Kind.STEP or step is None else step.rollback
    return item is None or find_attempt(item, event.attempt) is not None


def _landed(stored: Snapshot, version: int, transition: Transition) -> bool:
    """Whether a commit reported as a conflict was in fact written.

    redis-py retries a command whose reply was lost with the connection; the retry then
    fails the version check of the write that did land.  Replaying the event would be wrong
    (a start would count its own lease as a lost worker, a terminate would be refused).
    """
    return (stored.version == version + 1
            and encode_progress(stored.run) == encode_progress(transition.run))
