"""``saga-celery dashboard`` over HTTP, against the sagas of a real prefork worker.

Auth as Flower's, the JSON API, filters, search and paging of the list, Flower task links
whose ids are the very tasks the worker ran, and clear errors for bad input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from saga_celery import SagaState
from tests.dashboard.dashboard_process import FLOWER, USER, Dashboard, start_dashboard
from tests.dashboard.waiting_sagas import start_held
from tests.integration.harness import WorkerProcess
from tests.redis_servers import Server, free_ports, running

pytestmark = pytest.mark.integration


@pytest.fixture
def dashboard(shop: ModuleType, tmp_path: Path) -> Iterator[Dashboard]:
    board = start_dashboard(shop, "--per-page", "2", log_dir=tmp_path)
    yield board
    board.stop()


def test_every_route_asks_for_basic_auth(shop: ModuleType, shop_worker: WorkerProcess,
                                         dashboard: Dashboard, saga_id: str) -> None:
    """Pages, JSON and static files answer 401 with a Basic challenge without a user, or with
    a wrong password, and 200 with one of the --basic-auth users."""
    shop.order.apply_async(saga_id=saga_id).wait(timeout=60)
    _, headers, page = dashboard.get("/")
    css = re.search(r'href="(/static/dashboard\.css[^"]*)"', page)
    assert css is not None
    for path in ["/", f"/sagas/{saga_id}", "/api/sagas", f"/api/sagas/{saga_id}",
                 f"/api/sagas/{saga_id}/events", css.group(1)]:
        status, headers, _ = dashboard.get(path, auth=None)
        assert status == 401, path
        assert headers["www-authenticate"].startswith("Basic "), path
        assert dashboard.get(path, auth=(USER, "wrong"))[0] == 401, path
        assert dashboard.get(path)[0] == 200, path


def test_the_json_api_serves_state_events_and_the_list(
        shop: ModuleType, shop_worker: WorkerProcess, dashboard: Dashboard,
        saga_id: str) -> None:
    """``/api/sagas/<id>`` is the saga's ``SagaState``, ``/events`` its events, and
    ``/api/sagas`` the list, newest first, filtered by status and name, searched by id and
    paged (two a page here)."""
    ids = [f"{saga_id}-{n}" for n in range(3)]
    ok = shop.order.apply_async(saga_id=ids[0]).wait(timeout=60)
    bad = shop.order.apply_async(saga_id=ids[1],
                                 params={"fail": {"shop.ticket": "nonretryable"}}
                                 ).wait(timeout=60)
    other = shop.with_slow.apply_async(saga_id=ids[2]).wait(timeout=60)
    assert (ok.status, bad.status, other.status) == ("complete", "errored", "complete")

    assert SagaState.model_validate(dashboard.json(f"/api/sagas/{ids[1]}")) == bad
    assert dashboard.json(f"/api/sagas/{ids[1]}/events") == shop.sagas.run(ids[1]).events()

    first = dashboard.json("/api/sagas")
    assert [s["id"] for s in first["sagas"]] == [ids[2], ids[1]]
    assert first["has_next"] is True
    second = dashboard.json("/api/sagas?page=1")
    assert ids[0] in [s["id"] for s in second["sagas"]]
    errored = dashboard.json("/api/sagas?status=errored")["sagas"]
    assert errored[0]["id"] == ids[1]
    assert {s["status"] for s in errored} == {"errored"}
    assert errored[0]["rollback"] == "complete"
    named = dashboard.json("/api/sagas?name=with-slow")["sagas"]
    assert named[0]["id"] == ids[2]
    assert {s["name"] for s in named} == {"with-slow"}
    found = dashboard.json(f"/api/sagas?q={saga_id}")
    assert [s["id"] for s in found["sagas"]] == [ids[2], ids[1]]
    assert found["has_next"] is True
    assert [s["id"] for s in dashboard.json(f"/api/sagas?q={ids[0]}")["sagas"]] == [ids[0]]
    assert dashboard.json(f"/api/sagas?q={saga_id}&status=complete&page=1")["sagas"] == []


def test_flower_links_name_the_tasks_the_worker_ran(
        shop: ModuleType, shop_worker: WorkerProcess, dashboard: Dashboard,
        saga_id: str) -> None:
    """Each step's and each rollback budget's link is ``<flower>/task/<id>`` with the id of
    the Celery task the worker received for it: retries keep a task's id, and
    ``retry_rollback()`` opens a new budget, so a new task, and a new link."""
    run = shop.order.apply_async(saga_id=saga_id, params={
        "fail": {"shop.ticket": "nonretryable"}, "rollback_fail": {"shop.charge": "times:3"},
    })
    failed = run.wait(timeout=60)
    assert failed.rollback is not None and failed.rollback.outcome == "failed"
    run.retry_rollback()
    assert run.wait(timeout=60).rollback.outcome == "complete"  # type: ignore[union-attr]

    status, _, page = dashboard.get(f"/sagas/{saga_id}")
    assert status == 200
    links = set(re.findall(re.escape(FLOWER) + r"/task/([0-9a-f-]{36})", page))
    received = set(re.findall(r"Task (shop\.[a-z.]+)\[([0-9a-f-]{36})\] received",
                              shop_worker.log()))
    linked = sorted(name for name, task in received if task in links)
    # the three steps; ticket's and reserve's rollbacks; charge's rollback twice (two budgets)
    assert linked == ["shop.charge", "shop.charge.rollback", "shop.charge.rollback",
                      "shop.reserve", "shop.reserve.rollback", "shop.ticket",
                      "shop.ticket.rollback"]
    assert len(links) == 7
    assert "rollback from #4" in page


def test_held_sagas_are_listed_by_status_and_show_their_held_row(
        shop: ModuleType, shop_worker: WorkerProcess, dashboard: Dashboard,
        saga_id: str) -> None:
    """A saga held by a failed step: ``status=held`` lists it (page and API), its page says
    held, with the error that held it and an open held bar; rolled back, it leaves the held
    list and its held bar ends, saying how."""
    run = start_held(shop, saga_id)

    held = dashboard.json("/api/sagas?status=held")["sagas"]
    assert saga_id in [s["id"] for s in held] and {s["status"] for s in held} == {"held"}
    _, _, listed = dashboard.get("/?status=held")
    assert f'data-id="{saga_id}" data-status="held"' in listed
    assert '<option value="held" selected>' in listed
    _, _, page = dashboard.get(f"/sagas/{saga_id}")
    assert 'id="saga-status">held<' in page
    assert "NonRetryableError" in page
    [bar] = re.findall(r'<div class="bar ([^"]*)" title="([^"]*)"\s+data-lane="forward" '
                       r'data-kind="hold"', page)
    assert "outcome-held" in bar[0] and bar[1].startswith("held: held, ")
    assert "data-refresh=" in page  # a held saga is not over: the page keeps refreshing

    assert run.rollback().status in ("rolling_back", "errored")
    assert run.wait(timeout=60).status == "errored"
    assert saga_id not in [s["id"] for s in dashboard.json("/api/sagas?status=held")["sagas"]]
    _, _, page = dashboard.get(f"/sagas/{saga_id}")
    [(_, title)] = re.findall(r'<div class="bar ([^"]*)" title="([^"]*)"\s+data-lane="forward" '
                              r'data-kind="hold"', page)
    assert "then rolled back" in title


def test_an_id_with_slashes_and_colons_has_its_page(
        shop: ModuleType, shop_worker: WorkerProcess, dashboard: Dashboard,
        saga_id: str) -> None:
    """Saga ids may hold ``/``, ``:`` and ``@``: the list links to the id quoted whole, and
    the page and the JSON answer for it."""
    odd = f"{saga_id}/eu:order@42"
    shop.order.apply_async(saga_id=odd).wait(timeout=60)
    _, _, listing = dashboard.get("/?q=" + saga_id)
    [href] = re.findall(r'<a href="(/sagas/[^"]+)">', listing)
    assert "/" not in href.removeprefix("/sagas/")
    status, _, page = dashboard.get(href)
    assert status == 200
    assert f'<span id="saga-id">{odd}</span>' in page
    assert dashboard.json("/api" + href)["id"] == odd
    assert dashboard.json("/api" + href + "/events")[0]["saga_id"] == odd


def test_bad_input_gets_a_clear_answer(shop: ModuleType, dashboard: Dashboard) -> None:
    """An unknown saga is a 404 naming it (page and JSON); an unknown status a 400 listing
    the statuses; the server keeps serving."""
    status, _, body = dashboard.get("/api/sagas/no-such-saga")
    assert status == 404
    assert "no-such-saga" in json.loads(body)["error"]
    status, _, page = dashboard.get("/sagas/no-such-saga")
    assert status == 404
    assert "no saga with id" in page
    status, _, body = dashboard.get("/api/sagas?status=sleepy")
    assert status == 400
    assert "rolling_back" in json.loads(body)["error"]
    status, _, body = dashboard.get("/api/sagas?page=x")
    assert (status, json.loads(body)["error"]) == (400, "page must be a number")
    status, _, page = dashboard.get("/?page=100000")
    assert status == 400
    assert "narrow it with status, name or id" in page
    assert dashboard.get("/")[0] == 200


def test_a_store_that_goes_away_is_a_503_naming_it_and_then_comes_back(tmp_path: Path) -> None:
    """With its Redis gone the dashboard answers 503 with one message saying Redis cannot be
    reached (the page and the JSON), keeps running, and serves again once Redis is back."""
    [port] = free_ports(1, range(23700, 23800))
    server = Server("dashboard-redis", port, tmp_path, [])
    with running(lambda: server):
        server.wait_ready()
        board = start_dashboard((f"redis://127.0.0.1:{port}/0", "saga:"), log_dir=tmp_path)
        try:
            assert board.json("/api/sagas")["sagas"] == []
            assert "no sagas found" in board.get("/")[2]
            server.kill()

            status, _, body = board.get("/api/sagas")
            assert status == 503
            assert f"127.0.0.1:{port}" in json.loads(body)["error"]
            status, _, page = board.get("/sagas/any-saga")
            assert status == 503
            assert 'id="error-message"' in page and "Traceback" not in page

            server.start()
            server.wait_ready()
            assert board.json("/api/sagas")["sagas"] == []
            assert board.popen.poll() is None
        finally:
            board.stop()
