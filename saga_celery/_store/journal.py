"""A step's start committed as its event, not as the whole run: the saga's journal.

A start changes a few fields of the run, but writing the run means serializing all of it,
much of a commit's work.  So a start (any ``AttemptStarted`` that leaves the saga
running) can be committed as the event and the time it was applied, appended to the run's
journal; the next full commit (the step's end, usually) writes the whole run and empties
the journal.  Whoever loads a run with a journal replays it through the state machine,
which is pure: the same run, event and time give the same next run.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict
from pydantic_core import to_json

from saga_celery._core.events import AttemptStarted
from saga_celery._core.machine import apply_owned
from saga_celery._core.model import SagaRun

MAX_ENTRIES = 8
"""Journal entries after which a start is committed in full anyway, so loads stay cheap."""


class Entry(BaseModel):
    """One journaled transition: the start event as it was applied, and when."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at: datetime
    start: AttemptStarted


def encode_entry(event: AttemptStarted, now: datetime) -> bytes:
    """The journal line of ``event`` applied at ``now`` (no newline)."""
    return to_json({"at": now, "start": event})


def replay(run: SagaRun, journal: str | bytes) -> SagaRun:
    """``run`` (a fresh load, changed in place) with every journaled start applied, in order.

    Raises ``ValueError`` (pydantic's ``ValidationError``) for a line that is not an entry.
    """
    for line in journal.splitlines():
        if line:
            entry = Entry.model_validate_json(line)
            apply_owned(run, entry.start, now=entry.at)
    return run


def count_entries(journal: str | bytes | None) -> int:
    """How many entries a stored journal holds."""
    if not journal:
        return 0
    if isinstance(journal, bytes):
        return journal.count(b"\n")
    return journal.count("\n")
