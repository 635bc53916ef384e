"""History at scale (SPEC section 11) in real prefork workers on a real Redis: finished
sagas compacted (at most 2 KB), archived to PostgreSQL (a tombstone of at most 512 bytes
left), read back transparently, kept by outcome, deleted; a process killed between
finishing a saga and archiving it loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import pytest
import redis

from saga_celery import SagaStateError
from saga_celery._celery.dispatch import build_message
from saga_celery._core.model import Dispatch, Kind, SagaStatus
from saga_celery._errors import SagaNotFoundError
from saga_celery.cli import main
from tests.integration.harness import REPO_ROOT, WorkerFactory, import_copy
from tests.integration.history_pg import archive_url  # noqa: F401  (a fixture)
from tests.unit.clirunner import cli_runner

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("deployed")]

APP = "tests.integration.history_app"
_DEPLOYED: list[ModuleType] = []
WAIT_S = 60


@pytest.fixture
def deployed() -> Iterator[list[ModuleType]]:
    """The app copies a test deployed; their archive connections are closed after it."""
    yield _DEPLOYED
    while _DEPLOYED:
        app = _DEPLOYED.pop()
        if app.sagas.reader.archive is not None:
            app.sagas.reader.archive.close()


def _deploy(redis_url: str, prefix: str, **extra: str) -> tuple[dict[str, str], ModuleType]:
    env = {"SAGA_TEST_REDIS_URL": redis_url, "SAGA_TEST_PREFIX": prefix,
           "SAGA_TEST_QUEUE_PREFIX": prefix, **extra}
    origin = str(REPO_ROOT / "tests" / "integration" / "history_app.py")
    app = import_copy(origin, f"history_app_{uuid.uuid4().hex[:8]}", env)
    _DEPLOYED.append(app)
    return env, app


def _footprint(client: redis.Redis, prefix: str, saga_id: str) -> int:
    """MEMORY USAGE of every key of one saga (state hash, event stream, leases)."""
    keys = list(client.scan_iter(match=f"{prefix}{{{saga_id}}}*"))
    return sum(int(client.memory_usage(k, samples=0) or 0) for k in keys)


def _until(predicate: Any, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def _finished(client: redis.Redis, prefix: str, saga_id: str, field: str) -> bool:
    """Whether the finisher compacted (``c``) or archived (``a``) the saga, and unmarked it."""
    return (client.hexists(f"{prefix}{{{saga_id}}}:state", field)
            and client.zscore(f"{prefix}finishing", saga_id) is None)


def _send_duplicate(app: ModuleType, saga_id: str, key: str) -> None:
    """Send step ``key``'s first attempt again, as a redelivery or a late copy would."""
    run = app.sagas.reader.run(saga_id)
    dispatch = Dispatch(kind=Kind.STEP, key=key, attempt=1, due_at=datetime.now(UTC),
                        retries=0, origin="saga")
    message = build_message(run, dispatch, datetime.now(UTC))
    app.app.tasks[message.task].apply_async(args=message.args, kwargs=message.kwargs)


def _queues_empty(client: redis.Redis, prefix: str) -> bool:
    return all(client.llen(f"{prefix}saga.{q}") == 0 for q in ("steps", "rollbacks"))


def test_a_finished_saga_is_compacted_to_2kb_and_reads_as_before(
        worker_factory: WorkerFactory, redis_url: str, prefix: str,
        redis_client: redis.Redis) -> None:
    """The bench's five-step saga ends, its keys shrink to at most 2,048 bytes, and
    ``status()``/``events()`` answer as they did before; a duplicate message is dropped."""
    env, app = _deploy(redis_url, prefix)
    worker_factory(APP, env=env, concurrency=2)
    handle = app.five(order=1).apply_async()
    state = handle.wait(timeout=WAIT_S)
    assert state.status == SagaStatus.COMPLETE
    _until(lambda: _finished(redis_client, prefix, handle.id, "c"))
    size = _footprint(redis_client, prefix, handle.id)
    assert size <= 2048, f"a compacted five-step saga takes {size} bytes"
    assert redis_client.exists(f"{prefix}{{{handle.id}}}:events") == 0
    again = app.sagas.run(handle.id)
    assert again.status() == state
    events = again.events()
    assert [e["type"] for e in events][:2] == ["saga_queued", "saga_started"]
    assert events[-1]["type"] == "saga_completed"
    assert len([e for e in events if e["type"] == "step_completed"]) == 5

    version = redis_client.hget(f"{prefix}{{{handle.id}}}:state", "v")
    _send_duplicate(app, handle.id, "history.reserve#1")
    _until(lambda: _queues_empty(redis_client, prefix))
    time.sleep(1.0)  # the worker has taken it; let it finish handling it
    assert int(app.ledger.get(app.runs_key("reserve", 1))) == 1  # not run again
    assert redis_client.hget(f"{prefix}{{{handle.id}}}:state", "v") == version
    assert app.sagas.run(handle.id).status() == state


def test_archive_keeps_history_and_redis_a_tombstone(
        worker_factory: WorkerFactory, redis_url: str, prefix: str,
        redis_client: redis.Redis, archive_url: str) -> None:  # noqa: F811
    """With an archive, a finished saga is in PostgreSQL whole and Redis keeps at most 512
    bytes; status, events and list read the archive; delete removes it everywhere."""
    env, app = _deploy(redis_url, prefix, SAGA_TEST_ARCHIVE=archive_url)
    worker_factory(APP, env=env, concurrency=2)
    ok = app.five(order=2).apply_async()
    bad = app.failing(order=2).apply_async()
    done, failed = ok.wait(timeout=WAIT_S), bad.wait(timeout=WAIT_S)
    assert (done.status, failed.status) == (SagaStatus.COMPLETE, SagaStatus.ERRORED)
    for handle in (ok, bad):
        _until(lambda h=handle: _finished(redis_client, prefix, h.id, "a"))
        size = _footprint(redis_client, prefix, handle.id)
        assert size <= 512, f"a tombstone takes {size} bytes"
    archive = app.sagas.reader.archive
    assert archive is not None and archive.count() == 2
    assert app.sagas.run(ok.id).status() == done
    assert app.sagas.run(bad.id).status() == failed
    events_before = app.sagas.run(ok.id).events()
    assert events_before[-1]["type"] == "saga_completed"
    page = app.sagas.reader.archived(status="errored")
    assert [s.id for s in page.sagas] == [bad.id]
    first = app.sagas.reader.archived(limit=1)
    second = app.sagas.reader.archived(limit=1, after=first.next)
    assert {first.sagas[0].id, second.sagas[0].id} == {ok.id, bad.id}
    assert second.next is None

    _send_duplicate(app, ok.id, "history.notify#1")  # late: read from the archive, dropped
    _until(lambda: _queues_empty(redis_client, prefix))
    time.sleep(1.0)
    assert int(app.ledger.get(app.runs_key("notify", 2))) == 1
    assert app.sagas.run(ok.id).status() == done

    # Redis's tombstone gone before the archive's row (retention, eviction): still read.
    bad_events = app.sagas.run(bad.id).events()
    redis_client.delete(f"{prefix}{{{bad.id}}}:state")
    assert app.sagas.run(bad.id).status() == failed
    assert app.sagas.run(bad.id).events() == bad_events

    app.sagas.run(ok.id).delete()
    assert archive.count() == 1
    assert not redis_client.exists(f"{prefix}{{{ok.id}}}:state")
    with pytest.raises(SagaNotFoundError):
        app.sagas.run(ok.id)


def test_a_running_saga_cannot_be_deleted(
        worker_factory: WorkerFactory, redis_url: str, prefix: str) -> None:
    """``delete()`` refuses a saga that has not ended, and leaves it be."""
    env, app = _deploy(redis_url, prefix)
    handle = app.five(order=3).apply_async()  # no worker yet: it stays queued
    with pytest.raises(SagaStateError, match="still running"):
        handle.delete()
    worker_factory(APP, env=env, concurrency=2)
    assert handle.wait(timeout=WAIT_S).status == SagaStatus.COMPLETE
    handle.delete()
    with pytest.raises(SagaNotFoundError):
        app.sagas.run(handle.id)


_KILLED_BETWEEN = """
import os, sys
from saga_celery._store.finisher import Finisher
Finisher.submit = lambda self, saga_id: os._exit(17)   # dies right after the ending commit
import importlib
app = importlib.import_module("tests.integration.history_app")
handle = app.sagas.run(sys.argv[1])
handle.terminate(rollback=False)
"""


def test_a_process_killed_between_finishing_and_archiving_loses_nothing(
        worker_factory: WorkerFactory, redis_url: str, prefix: str,
        redis_client: redis.Redis, archive_url: str) -> None:  # noqa: F811
    """A process ends a saga (its terminal commit lands) and dies before archiving it: the
    marker it wrote with the commit stays, and the recovery sweep archives the saga."""
    env, app = _deploy(redis_url, prefix, SAGA_TEST_ARCHIVE=archive_url)
    handle = app.five(order=4).apply_async()  # no worker: queued until terminated
    child = subprocess.run([sys.executable, "-c", _KILLED_BETWEEN, handle.id],
                           env={**os.environ, **env, "PYTHONPATH": str(REPO_ROOT)},
                           capture_output=True, text=True, timeout=60, check=False)
    assert child.returncode == 17, child.stderr
    state_key = f"{prefix}{{{handle.id}}}:state"
    assert redis_client.hget(state_key, "t") == "1"  # ended ...
    assert redis_client.zscore(f"{prefix}finishing", handle.id) is not None  # ... marked
    assert not redis_client.hexists(state_key, "a")  # ... and not archived
    assert app.sagas.reader.archive is not None
    assert app.sagas.reader.archive.count() == 0
    time.sleep(0.05)
    assert app.sagas.recover(grace=1) == 0  # the sweep finishes it
    assert _finished(redis_client, prefix, handle.id, "a")
    assert app.sagas.reader.archive.count() == 1
    state = app.sagas.run(handle.id).status()
    assert state.status == SagaStatus.TERMINATED
    assert app.sagas.recover(grace=1) == 0  # again: nothing archived twice
    assert app.sagas.reader.archive.count() == 1


def test_a_worker_killed_between_finishing_and_archiving_loses_nothing(
        worker_factory: WorkerFactory, redis_url: str, prefix: str,
        redis_client: redis.Redis, archive_url: str) -> None:  # noqa: F811
    """A pool process dies right after the commit that ends a saga, before archiving it:
    the saga stays ended with its marker, its record whole; the recovery sweep archives it
    once, and it reads as it ended."""
    env, app = _deploy(redis_url, prefix, SAGA_TEST_ARCHIVE=archive_url,
                       SAGA_TEST_DIE_AFTER_END="1")
    worker_factory(APP, env=env, concurrency=1)
    handle = app.five(order=6).apply_async()
    _until(lambda: redis_client.lrange(f"died:{prefix}", 0, -1) != [])
    state_key = f"{prefix}{{{handle.id}}}:state"
    assert redis_client.hget(state_key, "t") == "1"
    assert redis_client.zscore(f"{prefix}finishing", handle.id) is not None
    assert not redis_client.hexists(state_key, "a") and redis_client.hexists(state_key, "p")
    archive = app.sagas.reader.archive
    assert archive is not None and archive.count() == 0
    ended = app.sagas.run(handle.id).status()
    assert ended.status == SagaStatus.COMPLETE

    time.sleep(0.05)
    app.sagas.recover(grace=1)  # the recovery sweep, run here, archives it
    assert _finished(redis_client, prefix, handle.id, "a")
    assert archive.count() == 1
    assert app.sagas.run(handle.id).status() == ended
    app.sagas.recover(grace=1)
    assert archive.count() == 1


def test_retention_by_outcome_sets_each_outcome_its_own_ttl(
        worker_factory: WorkerFactory, redis_url: str, prefix: str,
        redis_client: redis.Redis) -> None:
    """``retention={"complete": ..., "errored": ...}``: each ended saga's keys expire after
    its outcome's retention."""
    retention = json.dumps({"complete": "1 hour", "errored": "30 days"})
    env, app = _deploy(redis_url, prefix, SAGA_TEST_RETENTION=retention)
    worker_factory(APP, env=env, concurrency=2)
    ok, bad = app.five(order=5).apply_async(), app.failing(order=5).apply_async()
    assert ok.wait(timeout=WAIT_S).status == SagaStatus.COMPLETE
    assert bad.wait(timeout=WAIT_S).status == SagaStatus.ERRORED
    for handle in (ok, bad):
        _until(lambda h=handle: _finished(redis_client, prefix, h.id, "c"))
    hour, month = 3600 * 1000, 30 * 86400 * 1000
    ok_ttl = redis_client.pttl(f"{prefix}{{{ok.id}}}:state")
    bad_ttl = redis_client.pttl(f"{prefix}{{{bad.id}}}:state")
    assert hour - 120_000 < ok_ttl <= hour
    assert month - 120_000 < bad_ttl <= month


def test_the_cli_reads_pages_and_deletes_archived_sagas(
        worker_factory: WorkerFactory, redis_url: str, prefix: str,
        redis_client: redis.Redis, archive_url: str) -> None:  # noqa: F811
    """``saga-celery status/events`` read an archived saga, ``list --archive`` pages by
    status, name and time, and ``delete`` removes a saga everywhere."""
    env, app = _deploy(redis_url, prefix, SAGA_TEST_ARCHIVE=archive_url)
    worker_factory(APP, env=env, concurrency=2)
    handles = [app.five(order=10 + i).apply_async() for i in range(3)]
    handles.append(app.failing(order=13).apply_async())
    for handle in handles:
        handle.wait(timeout=WAIT_S)
        _until(lambda h=handle: _finished(redis_client, prefix, h.id, "a"))
    runner = cli_runner()
    base = ["--redis-url", redis_url, "--prefix", prefix, "--archive-url", archive_url]

    def cli(*args: str) -> str:
        result = runner.invoke(main, [*base, *args])
        assert result.exit_code == 0, result.output + result.stderr
        return result.stdout

    ok, bad = handles[0].id, handles[-1].id
    assert "complete" in cli("status", ok)
    lines = [json.loads(line) for line in cli("events", ok).splitlines()]
    assert lines[0]["type"] == "saga_queued" and lines[-1]["type"] == "saga_completed"
    assert bad in cli("list", "--archive", "--status", "errored")
    assert ok not in cli("list", "--archive", "--status", "errored")
    assert bad not in cli("list", "--archive", "--name", "history.five")
    seen: list[str] = []
    page = cli("list", "--archive", "--limit", "3")
    while True:
        seen += [i for i in (h.id for h in handles) if i in page]
        cursor = next((line.split("--page ")[1].strip("'") for line in page.splitlines()
                       if line.startswith("next page:")), None)
        if cursor is None:
            break
        page = cli("list", "--archive", "--limit", "3", "--page", cursor)
    assert sorted(seen) == sorted(h.id for h in handles)
    future = datetime(2100, 1, 1).isoformat(timespec="seconds")
    assert "no archived sagas" in cli("list", "--archive", "--ended-after", future)
    assert cli("delete", ok).strip() == f"saga {ok}: deleted"
    gone = runner.invoke(main, [*base, "status", ok])
    assert gone.exit_code == 1 and "no saga" in gone.stderr
    if app.sagas.reader.archive is not None:
        app.sagas.reader.archive.close()
