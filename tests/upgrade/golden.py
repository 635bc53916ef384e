"""Write golden fixtures of the stored formats of the saga_celery release on ``sys.path``.

``python -m tests.upgrade.golden OUT.json`` runs a few sagas of one definition through that
release's own engine and store (on fakeredis, in process) and stops each at a moment worth
keeping: queued, mid-flight (a start journaled), retrying, completed, rolled back, a failed
rollback.  It writes what Redis then holds for each (the state hash, the event stream, the
leases) and the task messages the release sends, as JSON, with what its state says.

Run it under an old release (``PYTHONPATH=<its source>``) to keep that release's formats:
every later release's tests read them (``test_golden_formats.py``).  It uses only what every
release has: ``SagaApp(store=...)``, the engine's ``submit``/``handle`` and the core events.
"""

from __future__ import annotations

import base64
import inspect
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import fakeredis
from celery import Celery

import saga_celery
from saga_celery import RollbackContext, SagaApp
from saga_celery._celery.dispatch import build_message
from saga_celery._core.events import AttemptFailed, AttemptStarted, AttemptSucceeded
from saga_celery._core.model import ErrorInfo, Kind
from saga_celery._core.state import to_state
from saga_celery._engine import Engine, Lease, lease_name
from saga_celery._store import RedisStore

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=250)
        return self.now


def build() -> tuple[SagaApp, Any]:
    app = Celery("golden", broker="memory://", set_as_current=False)
    client = fakeredis.FakeRedis()
    sagas = SagaApp(app, store=RedisStore(client, prefix="saga:"))

    @sagas.step(name="golden.reserve", retries={"limit": 2, "delay": "2 seconds"})
    def reserve(sku: str, qty: int) -> dict[str, Any]:
        return {"reservation": sku, "qty": qty}

    @reserve.rollback(retries={"limit": 0})
    def release(ctx: RollbackContext) -> None:
        return None

    @sagas.step(name="golden.charge", retries={"limit": 1, "delay": 500})
    def charge(reservation: dict[str, Any], amount: int) -> dict[str, Any]:
        return {"charge": amount}

    @charge.rollback(retries={"limit": 1, "delay": 100})
    def refund(ctx: RollbackContext) -> None:
        return None

    @sagas.step(name="golden.ship")
    def ship(charged: dict[str, Any]) -> str:
        return "shipped"

    definition = sagas.saga("golden-order", [reserve.s("sku-1", 2), charge.s(amount=100),
                                             ship.s()])
    return sagas, (definition, client)


def step(key: str, attempt: int = 1, kind: Kind = Kind.STEP) -> dict[str, Any]:
    return {"kind": kind, "key": key, "attempt": attempt}


def ok(key: str, output: Any, attempt: int = 1, kind: Kind = Kind.STEP) -> AttemptSucceeded:
    return AttemptSucceeded(**step(key, attempt, kind), output=output)


def failed(key: str, attempt: int = 1, kind: Kind = Kind.STEP, *, retryable: bool = True
           ) -> AttemptFailed:
    return AttemptFailed(**step(key, attempt, kind), retryable=retryable, draw=0.5,
                         error=ErrorInfo(type="Declined", message=f"{key} {attempt} failed"))


SCENARIOS: dict[str, list[Any]] = {
    "queued": [],
    "mid-flight": [AttemptStarted(**step("golden.reserve#1")),
                   ok("golden.reserve#1", {"reservation": "sku-1", "qty": 2}),
                   AttemptStarted(**step("golden.charge#1"))],
    "retrying": [AttemptStarted(**step("golden.reserve#1")), failed("golden.reserve#1")],
    "complete": [AttemptStarted(**step("golden.reserve#1")),
                 ok("golden.reserve#1", {"reservation": "sku-1", "qty": 2}),
                 AttemptStarted(**step("golden.charge#1")), ok("golden.charge#1", {"charge": 100}),
                 AttemptStarted(**step("golden.ship#1")), ok("golden.ship#1", "shipped")],
    "rolled-back": [AttemptStarted(**step("golden.reserve#1")),
                    ok("golden.reserve#1", {"reservation": "sku-1", "qty": 2}),
                    AttemptStarted(**step("golden.charge#1")),
                    failed("golden.charge#1", retryable=False),
                    AttemptStarted(**step("golden.charge#1", 1, Kind.ROLLBACK)),
                    ok("golden.charge#1", None, 1, Kind.ROLLBACK),
                    AttemptStarted(**step("golden.reserve#1", 1, Kind.ROLLBACK)),
                    ok("golden.reserve#1", None, 1, Kind.ROLLBACK)],
    "rollback-failed": [AttemptStarted(**step("golden.reserve#1")),
                        ok("golden.reserve#1", {"reservation": "sku-1", "qty": 2}),
                        AttemptStarted(**step("golden.charge#1")),
                        failed("golden.charge#1", retryable=False),
                        AttemptStarted(**step("golden.charge#1", 1, Kind.ROLLBACK)),
                        failed("golden.charge#1", 1, Kind.ROLLBACK, retryable=False)],
}


def dump(client: Any, saga_id: str) -> dict[str, Any]:
    """Every key of one saga as Redis holds it: hashes, streams (entries), strings."""
    keys: dict[str, Any] = {}
    for raw in sorted(client.keys(f"saga:{{{saga_id}}}*")):
        key = raw.decode()
        kind = client.type(raw).decode()
        if kind == "hash":
            keys[key] = {"hash": {f.decode(): _text(v) for f, v in client.hgetall(raw).items()}}
        elif kind == "stream":
            keys[key] = {"stream": [[i.decode(), {f.decode(): v.decode() for f, v in e.items()}]
                                    for i, e in client.xrange(raw)]}
        else:
            keys[key] = {"string": client.get(raw).decode()}
    return keys


def run_scenario(sagas: SagaApp, definition: Any, client: Any, name: str) -> dict[str, Any]:
    clock = Clock()
    engine = Engine(sagas._store, clock=clock)
    saga_id = f"golden-{name}"
    transition, _ = engine.submit(saga_id=saga_id, name=definition.name, plan=definition.plan,
                                  params={"customer": "c-7"})
    messages = [transition]
    for event in SCENARIOS[name]:  # each attempt takes its lease, and its end gives it back
        lease = Lease(name=_lease_name(event.kind, event.key), token="golden-worker",
                      ttl_ms=3_600_000)
        messages.append(engine.handle(saga_id, event, lease=lease))
    sent = [build_message(t.run, d, clock.now) for t in messages for d in t.dispatches]
    _drain(sagas)
    state = to_state(engine.load(saga_id).run)
    return {
        "saga_id": saga_id,
        "keys": dump(client, saga_id),
        "messages": [{"task": m.task, "args": m.args, "kwargs": m.kwargs} for m in sent],
        "expect": {"status": str(state.status),
                   "steps": {f"{s.name}#{s.count}": str(s.status) for s in state.steps},
                   "rollback": None if state.rollback is None else
                   {"outcome": state.rollback.outcome and str(state.rollback.outcome),
                    "completed_steps": state.rollback.completed_steps}},
    }


def main(out: str) -> None:
    sagas, (definition, client) = build()
    version = getattr(saga_celery, "__version__", None) or _version()
    fixtures = {"release": version,
                "sagas": {name: run_scenario(sagas, definition, client, name)
                          for name in SCENARIOS}}
    with open(out, "w") as f:
        json.dump(fixtures, f, indent=1, sort_keys=True)
        f.write("\n")


def _text(value: bytes) -> str | dict[str, str]:
    """A stored value as text, or ``{"base64": ...}`` if it is binary (a compacted history,
    format 4: ``_store/history.py``)."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode()}


def _drain(sagas: SagaApp) -> None:
    """Let the store's finisher compact what ended (releases that compact finished sagas)."""
    finisher = getattr(sagas._store, "finisher", None)
    if finisher is not None:
        assert finisher.drain(30.0), "the finisher did not catch up"


def _lease_name(kind: Kind, key: str) -> str:
    """The release's own lease name for a saga of its newest format."""
    takes = len(inspect.signature(lease_name).parameters)
    return lease_name(kind.value, key) if takes >= 2 else lease_name(key)  # type: ignore[call-arg]


def _version() -> str:
    from importlib.metadata import version
    return version("saga-celery")


if __name__ == "__main__":
    main(sys.argv[1])
