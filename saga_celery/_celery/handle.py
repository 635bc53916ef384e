"""``SagaHandle``: what ``apply_async`` and ``sagas.run(id)`` return."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from saga_celery._core.events import Event, RetryRollbackRequested, TerminateRequested
from saga_celery._core.state import SagaState, to_state
from saga_celery._errors import SagaStateError

if TYPE_CHECKING:
    from saga_celery._celery.app import SagaApp

WAIT_BLOCK_MS = 1000
"""Longest single block on the event stream while waiting: the state is re-read after it."""


_ENDINGS = frozenset({"saga_completed", "saga_errored", "saga_terminated"})


class SagaHandle:
    """One saga run: read its status and events, wait for it, terminate or resume it."""

    def __init__(self, sagas: SagaApp, saga_id: str) -> None:
        self._sagas = sagas
        self.id = saga_id

    def __repr__(self) -> str:
        return f"<SagaHandle {self.id!r}>"

    def status(self) -> SagaState:
        """The saga's state now."""
        return to_state(self._sagas.engine.load(self.id).run)

    def events(self) -> list[dict[str, Any]]:
        """Every lifecycle event so far, oldest first."""
        self._sagas.engine.load(self.id)
        return [event for _, event in self._sagas.store.read_events(self.id)]

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
            batch = self._sagas.store.read_events(self.id, after=last, block_ms=block)
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
        return self._request(TerminateRequested(rollback=rollback, reason=reason))

    def retry_rollback(self) -> SagaState:
        """Resume a rollback whose outcome is ``failed``, each handler with a fresh budget."""
        return self._request(RetryRollbackRequested())

    def _request(self, event: Event) -> SagaState:
        sagas = self._sagas
        transition = sagas.engine.handle(self.id, event)
        if transition.refusal is not None:
            raise SagaStateError(transition.refusal, saga_id=self.id)
        sagas.dispatcher.send(transition.run, transition.dispatches)
        return to_state(transition.run)
