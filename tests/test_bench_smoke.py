"""The benchmark (``make bench``) still runs end to end: a tiny run, no timing asserts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPORTED = (
    "ratio_saga_vs_chain", "ratio_saga_vs_chain_no_backend", "ratio_saga_vs_chain_acks_late",
    "cpu_ratio_saga_vs_chain_acks_late", "chains_acks_late_per_s", "sagas_per_s", "chains_per_s",
    "chains_no_backend_per_s", "redis_cmds_per_step", "store_rtt_per_transition",
    "rollback_path_s", "rollback_path_ms", "failure_to_compensation_sent_ms", "p50_ms",
    "p99_ms", "bytes_per_saga", "machine", "runs", "serial", "round_trips", "retention_check",
    "task_cpu_us", "cpu_ratio_saga_vs_chain", "cpu_ms_per_item",
    "bytes_per_saga_retained", "bytes_per_saga_retained_archive", "archive_ms_p50",
    "ratio_saga_vs_chain_archive", "targets",
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def test_bench_smoke_run_reports_every_figure(tmp_path: Path) -> None:
    """``python -m bench.run --smoke`` (M=20, one pair) completes and writes every key."""
    if shutil.which("redis-server") is None:
        if _in_ci():
            pytest.fail("redis-server is not installed", pytrace=False)
        pytest.skip("redis-server is not installed")
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--quiet", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=170, check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-6000:]}"
    report = json.loads(out.read_text())
    missing = [key for key in REPORTED if key not in report]
    assert not missing, f"missing keys {missing}"
    assert report["ratio_saga_vs_chain"] > 0
    assert report["sagas_per_s"] > 0 and report["chains_per_s"] > 0
    assert report["redis_cmds_per_step"] > 0 and report["bytes_per_saga"] > 0
    assert report["failure_to_compensation_sent_ms"]["n"] == 20  # every failing saga traced
    assert report["retention_check"]["keys_left_after"] == 0
    assert {"cpu_count", "cpu_model", "python", "celery", "redis_server"} <= set(
        report["machine"])
    assert {run["kind"] for run in report["runs"]} == {
        "chain", "chain_nobackend", "chain_acks_late", "saga", "saga_fail"}
    if report.get("history_error") and not _in_ci():  # no PostgreSQL here: CI has one
        pytest.skip(f"the history figures need PostgreSQL: {report['history_error']}")
    assert report.get("history_error") is None, report.get("history_error")
    assert 0 < report["bytes_per_saga_retained"] <= 2048
    assert 0 < report["bytes_per_saga_retained_archive"] <= 512
    assert report["archive_ms_p50"] > 0 and report["ratio_saga_vs_chain_archive"] > 0


@pytest.mark.parametrize("kind", ["saga", "chain"])
def test_instruction_counting_harness_runs_every_task(tmp_path: Path, kind: str) -> None:
    """``bench.instructions``' child (the part valgrind runs) executes every task of M items
    as a pool process would; here without valgrind, so only the task count is checked."""
    if shutil.which("redis-server") is None:
        if _in_ci():
            pytest.fail("redis-server is not installed", pytrace=False)
        pytest.skip("redis-server is not installed")
    from bench.measure import PrivateRedis

    server = PrivateRedis(tmp_path)
    server.start()
    try:
        done = subprocess.run(
            [sys.executable, str(REPO_ROOT / "bench" / "instructions.py"), "--child", kind,
             "--m", "3"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), BENCH_REDIS_URL=server.url,
                     BENCH_LOG="quiet"),
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-4000:]
    assert "TASKS 15" in done.stdout.splitlines()  # 3 items of 5 tasks, all run
