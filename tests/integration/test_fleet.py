"""``python -m workers.fleet`` (``make fleet``): the deploy/ topology as real local processes."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.harness import REPO_ROOT
from workers.processes import group_members

FLEET_TIMEOUT_S = 170
STARTED = re.compile(r"^  (\w+)\s+pid (\d+)\s+(.*)$", re.MULTILINE)
LOG_DIR = re.compile(r"^Starting the fleet \(logs in (\S+)\):$", re.MULTILINE)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGA_", "FLOWER_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _started(output: str) -> dict[str, tuple[int, str]]:
    """What the fleet says it started: name -> (pid, command line); the last of each name."""
    return {name: (int(pid), command) for name, pid, command in STARTED.findall(output)}


def _still_alive(pids: list[int]) -> list[int]:
    """Processes (not zombies) left in the process groups the fleet's children led."""
    return [pid for pgid in pids for pid in group_members(pgid)]


def _need_redis_server() -> None:
    if shutil.which("redis-server") is None:
        message = "the fleet starts its own redis-server, and none is on PATH"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture
def port_base() -> int:
    """A spare range for the fleet's private Redis and Flower (6400-6499, per test run)."""
    return 6400 + random.randrange(0, 80)


@pytest.mark.integration
@pytest.mark.timeout(FLEET_TIMEOUT_S + 20)
def test_headless_fleet_runs_sagas_through_both_pools_and_stops_everything(
    port_base: int,
) -> None:
    """The headless fleet exits 0 after its sagas, names Flower's URL, and leaves no process."""
    _need_redis_server()
    done = subprocess.run(
        [sys.executable, "-m", "workers.fleet", "--headless", "--sagas", "6",
         "--port-base", str(port_base)],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=FLEET_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    started = _started(done.stdout)

    assert done.returncode == 0, output
    assert re.search(r"Flower: http://127\.0\.0\.1:\d+  \(user admin, password \S+\)", output)
    assert set(started) == {"redis", "steps", "rollbacks", "beat", "flower"}, output
    assert "celery -A workers.app worker -Q saga.steps" in started["steps"][1]
    assert "celery -A workers.app worker -Q saga.rollbacks" in started["rollbacks"][1]
    assert "celery -A workers.app beat" in started["beat"][1]
    assert "celery -A workers.app flower" in started["flower"][1]
    assert "deploy/redis/redis.conf" in started["redis"][1]
    assert len(re.findall(r"^  ok  order-\w+-\d ", output, re.MULTILINE)) == 6, output
    assert "status=errored   rollback=complete (3/3 steps compensated)" in output
    assert "6/6 sagas ended as expected" in output
    assert "Health checks" in output and "Beat: saga_celery.recover" in output
    assert _still_alive([pid for pid, _ in started.values()]) == []
    assert not Path(LOG_DIR.findall(output)[0]).exists()  # removed once all went well


@pytest.mark.integration
@pytest.mark.timeout(FLEET_TIMEOUT_S + 20)
def test_interactive_fleet_stops_every_process_on_sigint(port_base: int) -> None:
    """Without --headless the fleet runs until Ctrl-C (SIGINT), then stops all it started."""
    _need_redis_server()
    fleet = subprocess.Popen(
        [sys.executable, "-m", "workers.fleet", "--sagas", "1", "--port-base", str(port_base)],
        cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert fleet.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + FLEET_TIMEOUT_S
        while time.monotonic() < deadline and not any("Press Ctrl-C" in x for x in lines):
            line = fleet.stdout.readline()
            if not line:
                break
            lines.append(line)
        assert any("Press Ctrl-C" in x for x in lines), "".join(lines)
        fleet.send_signal(signal.SIGINT)
        rest, _ = fleet.communicate(timeout=90)
    finally:
        if fleet.poll() is None:
            fleet.kill()
            fleet.wait()
    output = "".join(lines) + rest

    assert fleet.returncode == 0, output
    assert "SIGINT: stopping the fleet" in output
    assert "Stopped all 5 processes the fleet started." in output
    assert _still_alive([pid for pid, _ in _started(output).values()]) == []
    assert not Path(LOG_DIR.findall(output)[0]).exists()
