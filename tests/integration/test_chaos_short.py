"""The short chaos run: about 100 sagas through killed workers, a SIGSTOP and a Redis restart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.integration.harness import REPO_ROOT, worker_env

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 420


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_short_chaos_run_loses_and_doubles_nothing() -> None:
    """Every saga of the short chaos run ends with its effects once and its compensations in
    reverse start order, through worker kills, a SIGSTOP and a Redis restart."""
    if shutil.which("redis-server") is None:
        message = "the chaos run starts its own redis-server, and none is installed"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    done = subprocess.run([sys.executable, "-m", "tests.chaos.run", "--short"],
                          cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-6000:]}"
    summary = json.loads(done.stdout)
    assert summary["violations"] == 0, summary
    assert summary["duplicate_effects"] == 0, summary
    assert summary["lost_sagas"] == 0, summary
    assert summary["sagas"] == 100, summary
    assert summary["kills"] == 2, summary
    assert summary["redis_restarts"] == 1, summary
    assert summary["sigstops"] == 1, summary
