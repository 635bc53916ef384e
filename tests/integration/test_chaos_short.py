"""The short chaos run: about 100 sagas through killed workers, a SIGSTOP and a Redis restart,
with beat sending the recovery sweep and without it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest

from saga_celery._celery.routing import restore_options_read
from tests.integration.harness import REPO_ROOT, worker_env

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 420
OLD_KOMBU_RESTORE_S = 0.0 if restore_options_read() else 110.0
"""What kombu before 5.7 adds to a dead worker's redelivery: a scan for its messages every
100 s, where later ones scan every 2 s (README, "Dependencies")."""
NO_BEAT_DRAIN_S = 60.0 + OLD_KOMBU_RESTORE_S
NO_BEAT_TIMEOUT_S = 240 + NO_BEAT_DRAIN_S
"""Submitting takes about a minute and the drain at most 60 s without beat (then it fails)."""


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _run_short(*flags: str, timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    """``python -m tests.chaos.run --short`` with ``flags``; its summary, once it passed."""
    if shutil.which("redis-server") is None:
        message = "the chaos run starts its own redis-server, and none is installed"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    done = subprocess.run([sys.executable, "-m", "tests.chaos.run", "--short", *flags],
                          cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-6000:]}"
    summary: dict[str, Any] = json.loads(done.stdout)
    assert summary["violations"] == 0, summary
    assert summary["duplicate_effects"] == 0, summary
    assert summary["lost_sagas"] == 0, summary
    assert summary["stalled"] == 0, summary
    for sample in summary["broker_window_samples"]:  # each one proven from the AOF
        assert sample["broker_window"], sample
        assert all(e["taker"] and e["taker_ended"] for e in sample["broker_window"]), sample
    assert summary["sagas"] == 100, summary
    assert summary["kills"] == 2, summary
    assert summary["redis_restarts"] == 1, summary
    assert summary["sigstops"] == 1, summary
    return summary


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_short_chaos_run_loses_and_doubles_nothing() -> None:
    """Every saga of the short chaos run ends with its effects once and its compensations in
    reverse start order, through worker kills, a SIGSTOP and a Redis restart."""
    summary = _run_short()
    assert summary["beat"] is True, summary
    assert summary["stalled_in_broker_window"] == 0, summary  # the sweep re-sent them


@pytest.mark.slow
@pytest.mark.timeout(NO_BEAT_TIMEOUT_S + 30)
def test_short_chaos_run_without_beat_ends_every_saga() -> None:
    """With no beat, so no recovery sweep, every saga of the short chaos run still ends, and
    correctly: liveness rests on redeliveries alone (SPEC section 1).  Only a saga whose
    awaited message kombu's Redis transport lost (taken off its queue by a consumer that
    died before recording it unacked: no redelivery exists) may stay open, counted apart."""
    summary = _run_short("--no-beat", "--drain-timeout", str(NO_BEAT_DRAIN_S),
                         timeout=NO_BEAT_TIMEOUT_S)
    assert summary["beat"] is False, summary
    assert summary["sweeps_run"] == 0, summary
