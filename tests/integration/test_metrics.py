"""``saga-celery metrics`` as a real subprocess, scraped over HTTP while sagas run.

The sagas run under a saga name of their own, so the counters labelled with it count
exactly this test's sagas; step histograms are shared by every saga using a step, so
their counts are checked as lower bounds (a worker may finish an earlier test's message).
"""

from __future__ import annotations

import re
import signal
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.integration.harness import REPO_ROOT, WorkerProcess, wait_until, worker_env
from tests.integration.test_cli import saga_celery, store_args

pytestmark = pytest.mark.integration

SERVING = re.compile(r"serving saga metrics on (http://\S+/metrics)")
SAMPLE = re.compile(r"^(\w+)(\{[^}]*\})? (\S+)$", re.MULTILINE)


@pytest.fixture
def metrics_url(shop: ModuleType) -> Iterator[str]:
    """A ``saga-celery metrics --port 0`` subprocess on the shop's store; its /metrics URL."""
    command = [*saga_celery(), *store_args(shop), "metrics", "--port", "0",
               "--addr", "127.0.0.1", "--interval", "0.2"]
    server = subprocess.Popen(command, cwd=REPO_ROOT, env=worker_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert server.stdout is not None
    found = SERVING.search(server.stdout.readline())
    try:
        assert found, "saga-celery metrics did not say where it serves"
        yield found.group(1)
    finally:
        server.send_signal(signal.SIGTERM)  # as a container stops: it closes and exits 0
        try:
            _, err = server.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
    assert server.returncode == 0, err


def scrape(url: str) -> dict[str, float]:
    """``/metrics`` as ``{"name{labels}": value}`` (labels as prometheus-client prints them)."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {f"{m.group(1)}{m.group(2) or ''}": float(m.group(3)) for m in SAMPLE.finditer(text)}


def test_metrics_count_sagas_rollbacks_and_attempt_durations(
        shop: ModuleType, shop_worker: WorkerProcess, metrics_url: str) -> None:
    """Two sagas that complete, one that rolls back and one whose rollback fails show up in
    the scraped counters, rollback outcomes and attempt-duration histograms."""
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    order = shop.sagas.saga(name, [shop.reserve.s("sku-1", 2), shop.charge.s(amount=100),
                                   shop.ticket.s()])
    params = [
        {},
        {},
        {"fail": {"shop.charge": "always"}},
        {"fail": {"shop.ticket": "nonretryable"},
         "rollback_fail": {"shop.reserve": "nonretryable"}},
    ]
    runs = [order.apply_async(saga_id=f"{name}-{i}", params=p) for i, p in enumerate(params)]
    states = [run.wait(timeout=60) for run in runs]
    assert [s.status for s in states] == ["complete", "complete", "errored", "errored"]

    def counted() -> bool:
        return scrape(metrics_url).get(f'saga_active{{saga="{name}"}}') == 0.0 and \
            scrape(metrics_url).get(f'saga_errored_total{{saga="{name}"}}') == 2.0

    assert wait_until(counted, timeout=20), scrape(metrics_url)
    got = scrape(metrics_url)

    def per_saga(metric: str, **labels: str) -> float:
        text = ",".join(f'{k}="{v}"' for k, v in sorted({"saga": name, **labels}.items()))
        return got.get(f"{metric}{{{text}}}", 0.0)

    assert per_saga("saga_started_total") == 4
    assert per_saga("saga_completed_total") == 2
    assert per_saga("saga_errored_total") == 2
    assert per_saga("saga_terminated_total") == 0
    assert per_saga("saga_rollbacks_total", outcome="complete") == 1
    assert per_saga("saga_rollbacks_total", outcome="failed") == 1

    def attempts(kind: str, step: str, outcome: str) -> float:
        key = f'saga_{kind}_attempt_duration_seconds_count{{outcome="{outcome}",step="{step}"}}'
        return got.get(key, 0.0)

    assert attempts("step", "shop.reserve", "success") >= 4
    assert attempts("step", "shop.charge", "success") >= 3
    assert attempts("step", "shop.charge", "failure") >= 3  # 1 attempt + 2 retries
    assert attempts("step", "shop.ticket", "failure") >= 1
    assert attempts("rollback", "shop.charge", "success") >= 2
    assert attempts("rollback", "shop.reserve", "failure") >= 1
    assert got["saga_exporter_up"] == 1.0
