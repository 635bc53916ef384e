"""A 0.2.0 process beside this release's compaction (SPEC sections 9 and 11).

Sagas of format 4 are compacted when they end, which 0.2.0 cannot read: it must refuse such
a record as a newer format (``SagaFormatError``) and leave it untouched, never call it
corrupt.  Sagas created for 0.2.0 readers (``write_format=2``, during a rolling upgrade) are
kept whole when they end, so a 0.2.0 process reads them as before.  0.2.0 is the commit
``PREVIOUS`` (main as it stood before the history work), its ``saga_celery`` package taken
from git history and imported in a process of its own, on the real Redis.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import redis

from saga_celery._engine import Engine
from saga_celery._store import RedisStore
from tests.integration.conftest import prefix, redis_client  # noqa: F401  (fixtures)
from tests.integration.harness import REPO_ROOT
from tests.unit.test_history import run_to_end

pytestmark = [pytest.mark.integration]

PREVIOUS = "5c8b3ba"
"""saga_celery 0.2.0: main as it stood before the history work."""

_READ = """
import json, sys
# This release is installed in editable mode, by a finder ahead of sys.path: drop it, so
# that saga_celery comes from PYTHONPATH (0.2.0's).
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import redis
from saga_celery._errors import SagaError
from saga_celery._store import RedisStore
import saga_celery._core.model as model
store = RedisStore(redis.Redis.from_url(sys.argv[1]), prefix=sys.argv[2])
out = {"formats": sorted(model.FORMATS)}
for saga_id in sys.argv[3:]:
    try:
        snapshot = store.load(saga_id)
        events = store.read_events(saga_id)
        out[saga_id] = {"status": str(snapshot.run.status), "events": len(events)}
    except SagaError as exc:
        out[saga_id] = {"error": type(exc).__name__, "message": str(exc)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.2.0's ``saga_celery`` package, from git history."""
    root = tmp_path_factory.mktemp("previous")
    try:
        tar = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", PREVIOUS, "saga_celery"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"0.2.0 ({PREVIOUS}) cannot be taken from git history: {exc}")
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(root, filter="data")
    return root


def test_0_2_0_refuses_a_compacted_saga_as_newer_and_reads_a_format_2_one(
        previous: Path, redis_url: str, prefix: str,  # noqa: F811
        redis_client: redis.Redis) -> None:  # noqa: F811
    raw = redis.Redis.from_url(redis_url)  # bytes: a compacted history is binary
    store = RedisStore(raw, prefix=prefix)
    engine = Engine(store)
    run_to_end(engine, "new", format=4)
    run_to_end(engine, "old", format=2)
    assert store.finisher.drain(30.0)
    state_key = f"{prefix}{{new}}:state"
    assert redis_client.hexists(state_key, "c")
    before = raw.hgetall(state_key)

    child = subprocess.run([sys.executable, "-c", _READ, redis_url, prefix, "new", "old"],
                           capture_output=True, text=True, timeout=60, check=False,
                           cwd=previous, env={**os.environ, "PYTHONPATH": str(previous)})
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout)
    assert seen["formats"] == [1, 2]  # it is 0.2.0 indeed
    assert seen["new"]["error"] == "SagaFormatError", seen["new"]
    assert "format 4" in seen["new"]["message"]
    assert seen["old"] == {"status": "complete", "events": len(store.read_events("old"))}
    assert raw.hgetall(state_key) == before  # left untouched
    raw.close()
