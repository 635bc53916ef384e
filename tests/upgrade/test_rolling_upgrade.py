"""A fleet upgraded worker by worker with sagas in flight finishes every saga right (SPEC 9).

The previous release (0.1.0, commit ``PREVIOUS``) is built from git history into a
virtualenv of its own.  Two prefork workers of it run ``fleet_app.py``; a caller of that
release starts sagas (some complete, some retry, some fail and roll back).  While they run,
each worker is stopped (warm shutdown: its running tasks finish, its unacknowledged
messages go back to the queue) and replaced by a worker of this release, which creates
sagas in format 1 (``SAGA_WRITE_FORMAT=1``) as the README's upgrade procedure says, so
that the old worker still running reads them.  A caller of this release starts more sagas
meanwhile.  Once only new workers run, the setting goes and new sagas are in the newest
format.

No beat runs.  Every saga must end as its shape says, no effect may be applied twice (under
two idempotency keys), and every step a failed saga started must be compensated once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from saga_celery._core.model import FORMAT
from tests.integration.harness import REPO_ROOT, WorkerProcess, _wait_ready, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PREVIOUS = "45a748d"
"""saga_celery 0.1.0: main as it stood before the 0.2.0 work."""
CACHE = REPO_ROOT / ".upgrade-cache"
APP = Path(__file__).with_name("fleet_app.py")
PER_CALLER = 12
"""Sagas each caller starts: a third of each shape."""


def release_python(commit: str) -> Path:
    """The interpreter of a virtualenv holding saga_celery as it was at ``commit``.

    Its dependencies are this environment's (a ``.pth`` line: the same celery, kombu and
    redis the new release runs on); only saga_celery itself is that release's: the source
    of ``git archive`` of the commit, installed as an editable install is (on the path,
    with its metadata), which needs no build and no download.  Kept under
    ``.upgrade-cache/`` between runs.
    """
    root = CACHE / commit
    python = root / "venv" / "bin" / "python"
    if python.exists():
        return python
    shutil.rmtree(root, ignore_errors=True)
    source = root / "src"
    source.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", commit],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")],
                   check=True)
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    # Installed as an editable install would be: its source on the path, and its metadata.
    (site / "saga-celery-release.pth").write_text(
        f"{source}\n{sysconfig.get_paths()['purelib']}\n")
    version = tomllib.loads((source / "pyproject.toml").read_text())["project"]["version"]
    info = site / f"saga_celery-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: saga-celery\nVersion: {version}\n")
    return python


def release_of(python: Path, cwd: Path) -> str:
    found = subprocess.run([str(python), "-c", "from importlib.metadata import version; "
                            "import saga_celery, os; print(version('saga-celery'), "
                            "os.path.dirname(saga_celery.__file__))"],
                           cwd=cwd, check=True, capture_output=True, text=True)
    return found.stdout.strip()


class Fleet:
    """Workers and callers of either release, all running ``fleet_app.py`` from ``home``."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.workers: list[WorkerProcess] = []

    def environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
        env.update(self.env, PYTHONPATH=str(self.home), PYTHONUNBUFFERED="1", **(extra or {}))
        return env

    def worker(self, python: Path, name: str, extra: dict[str, str] | None = None
               ) -> WorkerProcess:
        node = f"{name}-{uuid.uuid4().hex[:6]}@upgrade"
        log = self.home / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [str(python), "-m", "celery", "-A", "fleet_app", "worker", "-P", "prefork",
                 "-c", "2", "-n", node, "--loglevel", "INFO", "--without-gossip",
                 "--without-mingle"],
                cwd=self.home, env=self.environ(extra), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, process_group=0)
        worker = WorkerProcess(popen, node, log)
        _wait_ready(worker, 60)
        self.workers.append(worker)
        return worker

    def call(self, python: Path, saga_ids: list[str], extra: dict[str, str] | None = None
             ) -> None:
        subprocess.run([str(python), "fleet_app.py", *saga_ids], cwd=self.home,
                       env=self.environ(extra), check=True, capture_output=True, timeout=60)

    def replace(self, old: WorkerProcess, python: Path, name: str,
                extra: dict[str, str] | None = None) -> WorkerProcess:
        """Warm shutdown of ``old`` (its running tasks finish), then a new worker."""
        old.stop(timeout=60)
        return self.worker(python, name, extra)

    def stop(self) -> None:
        for worker in self.workers:
            worker.kill()


def batch(label: str) -> list[str]:
    return [f"{shape}-{label}{i}" for shape in ("ok", "fail", "flaky")
            for i in range(PER_CALLER // 3)]


@pytest.fixture
def fleet(redis_url: str) -> Iterator[Fleet]:
    home = Path(tempfile.mkdtemp(prefix="saga-upgrade-"))
    shutil.copy(APP, home / "fleet_app.py")
    prefix = f"upgrade-{uuid.uuid4().hex[:8]}:"
    running = Fleet(home, {"UPGRADE_REDIS_URL": redis_url, "UPGRADE_PREFIX": prefix})
    yield running
    running.stop()
    failed = any(w.returncode not in (None, 0) for w in running.workers)
    if not failed:
        shutil.rmtree(home, ignore_errors=True)


def test_a_fleet_upgraded_worker_by_worker_finishes_every_saga(fleet: Fleet) -> None:
    """0.1.0 workers replaced one by one with this release's while 48 sagas of both
    releases' callers run: each ends as its shape says, no effect twice, no compensation
    lost, with no beat."""
    old, new = release_python(PREVIOUS), Path(sys.executable)
    assert release_of(old, fleet.home).startswith("0.1.0")
    assert not release_of(new, fleet.home).startswith("0.1.0")
    compat = {"SAGA_WRITE_FORMAT": "1"}

    first = fleet.worker(old, "old-1")
    second = fleet.worker(old, "old-2")
    fleet.call(old, batch("a"))  # started by a 0.1.0 caller
    time.sleep(1.0)
    fleet.replace(first, new, "new-1", compat)
    fleet.call(new, batch("b"), compat)  # a caller of this release, in format 1
    time.sleep(1.0)
    fleet.replace(second, new, "new-2", compat)
    fleet.call(new, batch("c"), compat)
    fleet.call(new, batch("d"))  # every 0.1.0 process is gone: the newest format
    ids = batch("a") + batch("b") + batch("c") + batch("d")

    sagas = _client(fleet)
    assert wait_until(lambda: all(_terminal(sagas, i) for i in ids), timeout=180), (
        {i: _status(sagas, i) for i in ids if not _terminal(sagas, i)})
    problems = [p for saga_id in ids for p in _check(fleet, sagas, saga_id)]
    assert problems == [], problems
    formats = Counter(_format(sagas, i) for i in ids)
    assert formats == {1: 3 * PER_CALLER, FORMAT: PER_CALLER}  # the newest, once 0.1.0 is gone


def _client(fleet: Fleet) -> Any:
    os.environ.update(fleet.env)
    sys.path.insert(0, str(fleet.home))
    try:
        import fleet_app  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(fleet.home))
    return fleet_app


def _status(app: Any, saga_id: str) -> str:
    return str(app.sagas.run(saga_id).status().status)


def _terminal(app: Any, saga_id: str) -> bool:
    return _status(app, saga_id) in ("complete", "errored", "terminated")


def _format(app: Any, saga_id: str) -> int:
    snapshot = app.sagas._store.load(saga_id)
    return int(snapshot.run.format)


def _check(fleet: Fleet, app: Any, saga_id: str) -> list[str]:
    state = app.sagas.run(saga_id).status()
    shape = saga_id.split("-", maxsplit=1)[0]
    applied = [tuple(json.loads(e)) for e in app.ledger.lrange(app.applied_key(saga_id), 0, -1)]
    slots = Counter(slot for slot, _ in applied)
    problems = [f"{saga_id}: {slot} applied {n} times" for slot, n in slots.items() if n > 1]
    want = "errored" if shape == "fail" else "complete"
    if str(state.status) != want:
        problems.append(f"{saga_id}: {state.status}, expected {want}")
    undone = {slot for slot in slots if slot.startswith("rollback:")}
    expected = ({"rollback:upgrade.a:1", "rollback:upgrade.b:1", "rollback:upgrade.c:1"}
                if shape == "fail" else set())
    if undone != expected:
        problems.append(f"{saga_id}: compensated {sorted(undone)}, expected {sorted(expected)}")
    return problems
