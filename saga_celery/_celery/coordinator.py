"""The narrow faces of a ``SagaApp``: reading sagas, and asking them to do something.

``SagaApp`` builds one of each and hands every collaborator only the face it needs: a
``SagaHandle`` reads (``SagaReader``) and sends requests (``Coordinator.request``); a
``SagaDefinition`` submits (``Coordinator.submit``); the CLI and the dashboard read.  None of
them holds the app, the engine, the store or the dispatcher.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from pydantic import JsonValue

from saga_celery._celery.dispatch import Dispatcher
from saga_celery._core.events import Event, EventSent
from saga_celery._core.model import WAIT_FORMAT, Plan, SagaRun
from saga_celery._core.state import SagaState, to_state
from saga_celery._engine import Engine
from saga_celery._errors import SagaConfigError, SagaError, SagaNotFoundError, SagaStateError
from saga_celery._store.archive import ArchivePage, PostgresArchive
from saga_celery._store.base import CorruptRecord, SagaStore, SweepRecord
from saga_celery._store.history import History, events_after

LIST_SCAN_FACTOR = 10
"""``recent`` with a filter looks at this many times ``limit`` of the newest sagas."""
LIST_READ_BATCH = 100
"""``recent`` reads up to this many sagas (``limit``, if fewer) in one round trip and one
archive query."""


class SagaReader:
    """Read sagas: their state, their events, the newest of them, the unreadable ones."""

    def __init__(self, store: SagaStore) -> None:
        self._store = store

    def rebind(self, store: SagaStore) -> SagaStore:
        """Read ``store`` from now on; returns the store read until now (``saga_celery.testing``
        puts it back)."""
        before, self._store = self._store, store
        return before

    def run(self, saga_id: str) -> SagaRun:
        """The saga as stored; ``SagaNotFoundError`` if there is none."""
        snapshot = self._store.load(saga_id)
        if snapshot is None:
            archived = self._archived(saga_id)
            if archived is not None:  # its tombstone expired (or went) before its row
                return archived.run
            raise SagaNotFoundError(
                f"no saga with id {saga_id!r} (never started, or its retention expired)",
                saga_id=saga_id)
        return snapshot.run

    def state(self, saga_id: str) -> SagaState:
        """The saga's state now; ``SagaNotFoundError`` if there is none."""
        return to_state(self.run(saga_id))

    def events(self, saga_id: str, *, after: str = "0", count: int | None = None,
               block_ms: int | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Events after stream id ``after``, oldest first, waiting up to ``block_ms``."""
        found = self._store.read_events(saga_id, after=after, count=count, block_ms=block_ms)
        if not found and self.archive is not None and self._store.load(saga_id) is None:
            archived = self._archived(saga_id)  # no longer in Redis at all: the archive's
            if archived is not None:
                return events_after(archived.events, after, count)
        return found

    def recent(self, *, status: str | None = None, name: str | None = None,
               limit: int = 100) -> Iterator[SagaRun]:
        """Up to ``limit`` sagas, newest first, with that status and name, among the
        ``LIST_SCAN_FACTOR`` x ``limit`` newest."""
        found = 0
        ids = self._store.list_ids(limit * LIST_SCAN_FACTOR)
        batch = max(1, min(limit, LIST_READ_BATCH))  # a page unfiltered, in one read
        for start in range(0, len(ids), batch):
            for run in self._store.load_runs(ids[start:start + batch]):
                if run is None:  # retention expired; the index keeps the id a while longer
                    continue
                if (status is None or run.status == status) and (name is None
                                                                  or run.name == name):
                    yield run
                    found += 1
                    if found == limit:
                        return

    def corrupt(self, limit: int = 100) -> list[CorruptRecord]:
        """The sagas the recovery sweep moved aside as unreadable, most recent first."""
        return self._store.corrupt_records(limit)

    def last_sweep(self) -> SweepRecord | None:
        """What the last recovery sweep recorded (``saga-celery health``), or None."""
        return self._store.last_sweep()

    def ping(self) -> None:
        """Raise ``SagaStoreUnavailableError`` if the store cannot be reached."""
        self._store.ping()

    # -- history at scale (SPEC section 11): the archive, deletion -----------------------

    def _archived(self, saga_id: str) -> History | None:
        archive = self.archive
        return None if archive is None else archive.fetch(saga_id)

    @property
    def archive(self) -> PostgresArchive | None:
        """The archive finished sagas go to, None if there is none (``SagaApp(archive=)``).

        ``run``, ``state`` and ``events`` read it already when Redis keeps only a saga's
        tombstone (the store does); ``archived`` pages through it."""
        archive = getattr(self._store, "archive", None)
        return archive if isinstance(archive, PostgresArchive) else None

    def archived(self, *, status: str | None = None, name: str | None = None,
                 ended_before: datetime | None = None, ended_after: datetime | None = None,
                 after: str | None = None, limit: int = 100) -> ArchivePage:
        """One page of the archive, newest ended first; ``after``: the last page's ``next``.
        ``SagaConfigError`` without an archive."""
        archive = self.archive
        if archive is None:
            raise SagaConfigError("this app has no archive: give SagaApp(archive="
                                  "\"postgresql://...\") to page through finished sagas")
        return archive.page(status=status, name=name, ended_before=ended_before,
                            ended_after=ended_after, after=after, limit=limit)

    def delete(self, saga_id: str) -> None:
        """Remove a finished saga from Redis and the archive.  ``SagaStateError`` while it
        runs, ``SagaNotFoundError`` if neither holds it."""
        if not self._store.delete(saga_id):
            raise SagaNotFoundError(f"no saga with id {saga_id!r} to delete (never started, "
                                    "deleted, or its retention expired)", saga_id=saga_id)

    def exporter_source(self) -> SagaStore:
        """The store, for the metrics exporter, which follows every saga's events."""
        return self._store


class Coordinator:
    """Start sagas and apply requests to them, sending what each transition decides."""

    def __init__(self, engine: Engine, dispatcher: Dispatcher, *, write_format: int,
                 max_params_bytes: int) -> None:
        self._engine = engine
        self._dispatcher = dispatcher
        self.write_format = write_format
        """The format new sagas are created in."""
        self.max_params_bytes = max_params_bytes
        """The largest JSON a saga's params may take (they are rewritten by every commit)."""

    def submit(self, *, saga_id: str, name: str, plan: Plan, params: JsonValue) -> None:
        """Create the saga (or find it, with the same params) and send its first messages.
        A saga that waits is created in format 3 (``WAIT_FORMAT``) or a newer default."""
        written = max(WAIT_FORMAT, self.write_format) if plan.waits else self.write_format
        transition, _ = self._engine.submit(saga_id=saga_id, name=name, plan=plan,
                                            params=params, format=written)
        self._dispatcher.send(transition.run, transition.dispatches)

    def send_event(self, saga_id: str, event_type: str, payload: object,
                   event_id: str | None) -> SagaState:
        """Deliver an event to the saga's waits (SPEC section 8); ``SagaNotFoundError`` for
        an unknown id, ``SagaStateError`` for a terminal saga, ``SagaError`` for bad input."""
        event = EventSent(event_type=_checked_name(event_type, "event_type"),
                          payload=self._checked_payload(payload, saga_id),
                          event_id=None if event_id is None else _checked_name(event_id,
                                                                               "event_id"))
        return self.request(saga_id, event)

    def _checked_payload(self, payload: object, saga_id: str) -> JsonValue:
        """The payload as the wait's output will hold it: JSON, at most ``max_params_bytes``."""
        try:
            text = json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise SagaError(f"the payload of an event for saga {saga_id!r} must be "
                            f"JSON-serializable: {exc}", saga_id=saga_id) from exc
        if len(text.encode()) > self.max_params_bytes:
            raise SagaError(
                f"the payload of an event for saga {saga_id!r} is {len(text.encode())} bytes "
                f"of JSON, over the limit of {self.max_params_bytes} "
                "(SagaApp(max_output_bytes=...)): send a reference to the data instead",
                saga_id=saga_id)
        value: JsonValue = json.loads(text)
        return value

    def request(self, saga_id: str, event: Event) -> SagaState:
        """Apply an owner's request (terminate, retry the rollback); ``SagaStateError`` if
        the saga's status refuses it."""
        transition = self._engine.handle(saga_id, event)
        if transition.refusal is not None:
            raise SagaStateError(transition.refusal, saga_id=saga_id)
        self._dispatcher.send(transition.run, transition.dispatches)
        return to_state(transition.run)


NAME_LIMIT = 200
"""The longest event type or event id taken (they are stored with the saga)."""


def _checked_name(value: object, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > NAME_LIMIT:
        raise SagaError(f"{field} must be a non-empty string of at most {NAME_LIMIT} "
                        f"characters, not {value!r}")
    return value
