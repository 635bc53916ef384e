"""The dashboard's Flower links open the saga's tasks in a real Flower.

A real Flower (``tests/integration/test_flower.py``'s fixture, basic auth on) watches a real
worker started with task events; every link on a rolled-back saga's page is a Flower task
page that Flower serves (200, not its 404 for an unknown task) for the task named there.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest

from tests.dashboard.dashboard_process import start_dashboard
from tests.integration.harness import WorkerFactory, wait_until
from tests.integration.shop_fixtures import SHOP
from tests.integration.test_flower import Flower, flower  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_every_link_is_a_task_page_flower_serves(
        shop: ModuleType, worker_factory: WorkerFactory, shop_env: dict[str, str],
        flower: Flower, saga_id: str, tmp_path: Path) -> None:  # noqa: F811
    """Each step and rollback link of the page opens that task's page in Flower."""
    worker = worker_factory(SHOP, env=shop_env, extra_args=["-E"])
    assert wait_until(lambda: flower.sees_worker(worker.hostname), timeout=30, interval=0.2)
    params = {"fail": {"shop.ticket": "always"}, "rollback_fail": {"shop.charge": "times:1"}}
    state = shop.order.apply_async(saga_id=saga_id, params=params).wait(timeout=60)
    assert state.status == "errored"
    board = start_dashboard(shop, "--flower-url", flower.base + "/", log_dir=tmp_path)
    try:
        status, _, page = board.get(f"/sagas/{saga_id}")
    finally:
        board.stop()
    assert status == 200
    paths = sorted(set(re.findall(re.escape(flower.base) + r"(/task/[0-9a-f-]{36})", page)))
    assert len(paths) == 6  # three steps, three rollbacks: retries keep a task's id

    def served() -> bool:
        return all(flower.get(path)[0] == 200 for path in paths)

    assert wait_until(served, timeout=20, interval=0.3), [
        (path, flower.get(path)[0]) for path in paths]
    names = set()
    for path in paths:
        _, body = flower.get(path)
        names.update(re.findall(r"shop\.[a-z]+(?:\.rollback)?", str(body)))
    assert names >= {"shop.reserve", "shop.charge", "shop.ticket", "shop.reserve.rollback",
                     "shop.charge.rollback", "shop.ticket.rollback"}
    assert flower.get("/task/00000000-0000-0000-0000-000000000000")[0] == 404
