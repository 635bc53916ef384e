"""Every release reads what the releases before it wrote (SPEC section 9).

``tests/fixtures/formats/<release>.json`` holds what a release's own code stored in Redis and
sent as messages for sagas stopped at moments worth keeping (``golden.py`` wrote them, run
under that release).  This release loads each into Redis (fakeredis), reads it, and carries
the unfinished ones to their end.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from saga_celery._celery.control import CONTROL_KEY, Control
from saga_celery._core.events import AttemptStarted, AttemptSucceeded
from saga_celery._core.model import Kind
from saga_celery._core.state import to_state
from saga_celery._engine import Engine
from saga_celery._store import RedisStore

FIXTURES = Path(__file__).parent.parent / "fixtures" / "formats"
RELEASES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def fixture(release: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{release}.json").read_text())
    return data


def seeded(sagas: dict[str, Any]) -> fakeredis.FakeRedis:
    """A Redis holding exactly what the fixture's release stored."""
    client = fakeredis.FakeRedis()
    for saga in sagas.values():
        for key, value in saga["keys"].items():
            if "hash" in value:  # a binary value (a compacted history) kept as base64
                client.hset(key, mapping={f: base64.b64decode(v["base64"]) if isinstance(v, dict)
                                          else v for f, v in value["hash"].items()})
            elif "stream" in value:
                for entry_id, fields in value["stream"]:
                    client.xadd(key, fields, id=entry_id)
            else:
                client.set(key, value["string"])
    return client


@pytest.fixture(params=RELEASES)
def release(request: pytest.FixtureRequest) -> dict[str, Any]:
    return fixture(request.param)


def test_fixtures_of_every_released_format_are_kept() -> None:
    """0.1.0's formats are here, as it wrote them."""
    assert "0.1.0" in RELEASES
    assert fixture("0.1.0")["release"] == "0.1.0"


def test_every_stored_saga_reads_as_its_release_saw_it(release: dict[str, Any]) -> None:
    """State, steps and rollback read back as the writing release reported them."""
    store = RedisStore(seeded(release["sagas"]))
    for saga in release["sagas"].values():
        snapshot = store.load(saga["saga_id"])
        assert snapshot is not None
        state = to_state(snapshot.run)
        expect = saga["expect"]
        assert str(state.status) == expect["status"]
        assert {f"{s.name}#{s.count}": str(s.status) for s in state.steps} == expect["steps"]
        if expect["rollback"] is None:
            assert state.rollback is None
        else:
            assert state.rollback is not None
            assert state.rollback.completed_steps == expect["rollback"]["completed_steps"]


def test_every_stored_event_reads(release: dict[str, Any]) -> None:
    """Each saga's event stream reads in full, oldest first, every event typed."""
    store = RedisStore(seeded(release["sagas"]))
    for saga in release["sagas"].values():
        events = store.read_events(saga["saga_id"])
        streams = [v["stream"] for k, v in saga["keys"].items() if k.endswith(":events")]
        if not streams:  # compacted when it ended (format 4): its events are in its history
            assert events and events[-1][1]["type"].startswith(("saga_", "rollback_"))
            continue
        assert [i for i, _ in events] == [i for i, _ in streams[0]]
        assert all(e["saga_id"] == saga["saga_id"] and "type" in e for _, e in events)


def test_every_message_it_sent_is_understood(release: dict[str, Any]) -> None:
    """The control kwarg of every message the release sent parses, naming its attempt."""
    for saga in release["sagas"].values():
        for message in saga["messages"]:
            control = Control.parse(message["kwargs"][CONTROL_KEY])
            assert control.saga_id == saga["saga_id"]
            assert control.key.startswith(message["task"].removesuffix(".rollback"))


@pytest.mark.parametrize("name", ["queued", "mid-flight", "retrying"])
def test_an_unfinished_saga_of_an_older_release_runs_to_its_end(
        release: dict[str, Any], name: str) -> None:
    """Every step due runs and succeeds on this release until the saga completes."""
    saga = release["sagas"][name]
    engine = Engine(RedisStore(seeded(release["sagas"])))
    saga_id = saga["saga_id"]
    for _ in range(20):
        run = engine.load(saga_id).run
        if run.is_terminal:
            break
        running = [(s.key, s.attempts[-1].attempt) for s in run.steps.values()
                   if s.attempts and s.attempts[-1].ended_at is None]
        due = [(d.key, d.attempt) for d in run.outbox.values() if d.kind == Kind.STEP]
        for key, attempt in due:
            engine.handle(saga_id, AttemptStarted(kind=Kind.STEP, key=key, attempt=attempt))
        for key, attempt in running + due:
            engine.handle(saga_id, AttemptSucceeded(kind=Kind.STEP, key=key, attempt=attempt,
                                                    output=f"{key}@{attempt}"))
    assert str(engine.load(saga_id).run.status) == "complete"
