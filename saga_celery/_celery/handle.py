"""``SagaHandle``: what ``apply_async`` and ``sagas.run(id)`` return."""

from __future__ import annotations

import time
from typing import Any

from saga_celery._celery.coordinator import Coordinator, SagaReader
from saga_celery._core.events import (
    RedriveRequested,
    RetryRollbackRequested,
    RollbackRequested,
    TerminateRequested,
)
from saga_celery._core.state import SagaState

WAIT_BLOCK_MS = 1000
"""Longest single block on the event stream while waiting: the state is re-read after it."""


_ENDINGS = frozenset({"saga_completed", "saga_errored", "saga_terminated"})


class SagaHandle:
    """One saga run: read its status and events, wait for it, terminate or resume it."""

    def __init__(self, reader: SagaReader, coordinator: Coordinator, saga_id: str) -> None:
        self._reader = reader
        self._coordinator = coordinator
        self.id = saga_id

    def __repr__(self) -> str:
        return f"<SagaHandle {self.id!r}>"

    def status(self) -> SagaState:
        """The saga's state now."""
        return self._reader.state(self.id)

    def events(self) -> list[dict[str, Any]]:
        """Every lifecycle event so far, oldest first."""
        self._reader.run(self.id)  # SagaNotFoundError for an unknown id
        return [event for _, event in self._reader.events(self.id)]

    def wait(self, timeout: float | None = None) -> SagaState:
        """Block until the saga is terminal; the builtin ``TimeoutError`` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = "0"
        state = self.status()
        while not state.is_terminal:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"saga {self.id!r} is still {state.status} after "
                                   f"{timeout:g} s")
            block = WAIT_BLOCK_MS if remaining is None else min(WAIT_BLOCK_MS,
                                                                 max(int(remaining * 1000), 1))
            batch = self._reader.events(self.id, after=last, block_ms=block)
            if batch:
                last = batch[-1][0]
            # Only an event that ends the saga can make it terminal: load the state then
            # (or when a block ran out without news), not after every step's events.
            if not batch or any(e.get("type") in _ENDINGS for _, e in batch):
                state = self.status()
        return state

    def terminate(self, *, rollback: bool = False,
                  reason: str = "terminated by request") -> SagaState:
        """Stop the saga: no new step starts; with ``rollback=True`` compensate what started."""
        return self._coordinator.request(self.id, TerminateRequested(rollback=rollback,
                                                                     reason=reason))

    def send_event(self, event_type: str, payload: Any = None,
                   event_id: str | None = None) -> SagaState:
        """Send an event to the saga (SPEC section 8): the ``wait_for_event`` stage waiting
        for ``event_type`` ends with ``payload`` as its output; sent before that wait began,
        it is kept for it (per type, oldest first).  The same ``event_id`` twice counts once.
        ``SagaNotFoundError`` for an unknown id, ``SagaStateError`` once the saga ended."""
        return self._coordinator.send_event(self.id, event_type, payload, event_id)

    def redrive(self) -> SagaState:
        """Run a held saga's failed steps again, with a fresh retry budget, as their tasks are
        registered now (a fixed deploy is picked up); completed steps never run again.
        ``SagaStateError`` unless the saga is ``held``."""
        return self._coordinator.request(self.id, RedriveRequested())

    def rollback(self) -> SagaState:
        """Roll a held saga back, as for a failure; ``SagaStateError`` unless it is held."""
        return self._coordinator.request(self.id, RollbackRequested())

    def retry_rollback(self) -> SagaState:
        """Resume a rollback whose outcome is ``failed``, each handler with a fresh budget."""
        return self._coordinator.request(self.id, RetryRollbackRequested())

    def delete(self) -> None:
        """Remove the finished saga everywhere: Redis and the archive (SPEC section 11).
        ``SagaStateError`` while it runs; ``SagaNotFoundError`` if it is already gone."""
        self._reader.delete(self.id)
