"""The fleet's structlog configuration (workers/logs.py): one JSON line per event on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import structlog
from workers.logs import configure_logging
configure_logging()
log = structlog.get_logger("saga_celery")
log.info("saga.step_started", saga_event="step_started", saga_id="o-1",
         event_id="o-1/2.0", timestamp="2026-11-29T05:00:00.123456+00:00", step="reserve")
log.warning("plain line", thing=object.__new__(type("Odd", (), {"__repr__": lambda s: "<odd>"})))
log.debug("filtered out")
"""


def _lines() -> list[dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_each_event_is_one_json_line_with_level_and_logged_at() -> None:
    lifecycle, plain = _lines()  # the debug line is below the INFO threshold
    assert lifecycle == {
        "saga_event": "step_started", "saga_id": "o-1", "event_id": "o-1/2.0",
        "timestamp": "2026-11-29T05:00:00.123456+00:00", "step": "reserve",
        "event": "saga.step_started", "level": "info",
        # a lifecycle event is stamped with its own commit time, not the clock again
        "logged_at": "2026-11-29T05:00:00.123456+00:00",
    }
    assert plain["event"] == "plain line"
    assert plain["level"] == "warning"
    assert plain["thing"] == "<odd>"  # what JSON cannot hold is written as its repr()
    stamped = datetime.fromisoformat(str(plain["logged_at"]).replace("Z", "+00:00"))
    assert stamped.utcoffset() is not None and stamped.utcoffset().total_seconds() == 0
