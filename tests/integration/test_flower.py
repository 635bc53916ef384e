"""Flower finds every task of one saga, steps and rollbacks apart, with bounded task names.

A real Flower process (``celery -A tests.integration.shop flower``, basic auth on) watches a
real worker started with task events (``-E``); the test reads Flower's HTTP API only.
"""

from __future__ import annotations

import ast
import base64
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from saga_celery import SagaState
from tests.integration.harness import REPO_ROOT, WorkerFactory, wait_until, worker_env
from tests.integration.shop_fixtures import SHOP

pytestmark = pytest.mark.integration

USER, PASSWORD = "user", "pass"
FINAL_STATES = frozenset({"SUCCESS", "FAILURE"})


class Flower:
    """A running Flower and a tiny client for its HTTP API."""

    def __init__(self, base: str, log_path: Path) -> None:
        self.base = base
        self.log_path = log_path

    def get(self, path: str, *, auth: tuple[str, str] | None = (USER, PASSWORD),
            **query: str) -> tuple[int, Any]:
        """GET ``path`` with ``query``; returns the status and the decoded JSON (or text)."""
        url = f"{self.base}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url)
        if auth is not None:
            token = base64.b64encode(":".join(auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def tasks(self, saga_id: str) -> dict[str, dict[str, Any]]:
        """``/api/tasks`` searched with ``kwargs:saga_id=<id>``, as Flower's UI searches."""
        status, body = self.get("/api/tasks", search=f"kwargs:saga_id={saga_id}")
        assert status == 200, body
        tasks: dict[str, dict[str, Any]] = body
        return tasks

    def sees_worker(self, hostname: str) -> bool:
        """Whether Flower has had events from ``hostname`` (its event receiver is live)."""
        status, body = self.get("/workers", json="1")
        return status == 200 and any(w.get("hostname") == hostname for w in body["data"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _up(flower: Flower) -> bool:
    try:
        return flower.get("/healthcheck", auth=None)[0] == 200
    except OSError:
        return False


@pytest.fixture
def flower(shop_env: dict[str, str], tmp_path: Path) -> Iterator[Flower]:
    """``celery flower`` on a free port with basic auth, stopped after the test."""
    port = _free_port()
    log_path = tmp_path / "flower.log"
    command = [sys.executable, "-m", "celery", "-A", SHOP, "flower", "--address=127.0.0.1",
               f"--port={port}", f"--basic-auth={USER}:{PASSWORD}"]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=worker_env(shop_env),
                                   stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, process_group=0)
    running = Flower(f"http://127.0.0.1:{port}", log_path)
    try:
        ready = wait_until(lambda: process.poll() is not None or _up(running), timeout=30,
                           interval=0.2)
        assert ready and process.poll() is None, log_path.read_text()
        yield running
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _expected(state: SagaState) -> dict[str, str]:
    """Every task the saga ran, by name, with the final state Flower should show for it."""
    expected = {}
    for step in state.steps:
        if step.attempts:
            expected[step.name] = "SUCCESS" if step.status == "complete" else "FAILURE"
        if step.rollback is not None and step.rollback.attempts:
            done = step.rollback.status == "complete"
            expected[f"{step.name}.rollback"] = "SUCCESS" if done else "FAILURE"
    return expected


def _listed(tasks: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {task["name"]: task["state"] for task in tasks.values()}


def test_flower_lists_every_step_and_rollback_of_a_failed_saga_with_its_final_state(
        shop: ModuleType, worker_factory: WorkerFactory, shop_env: dict[str, str],
        flower: Flower, saga_id: str) -> None:
    """Searching kwargs:saga_id=<id> finds each step and rollback task, in its final state."""
    worker = worker_factory(SHOP, env=shop_env, extra_args=["-E"])
    assert wait_until(lambda: flower.sees_worker(worker.hostname), timeout=30, interval=0.2)
    other = shop.order.apply_async(saga_id=f"{saga_id}-ok")
    params = {"fail": {"shop.ticket": "always"}, "rollback_fail": {"shop.charge": "times:1"}}
    state = shop.order.apply_async(saga_id=saga_id, params=params).wait(timeout=30)
    assert other.wait(timeout=30).status == "complete"
    assert state.status == "errored" and state.rollback is not None
    assert len(state.step("shop.ticket").attempts) == 3  # retried, then failed for good
    charge_rollback = state.step("shop.charge").rollback
    assert charge_rollback is not None and len(charge_rollback.attempts) == 2
    expected = _expected(state)
    assert len(expected) == 6
    found: dict[str, dict[str, Any]] = {}

    def complete() -> bool:
        found.update(flower.tasks(saga_id))
        listed = _listed(found)
        return listed == expected and set(listed.values()) <= FINAL_STATES

    assert wait_until(complete, timeout=20, interval=0.3), (_listed(found), expected)
    assert len(found) == 6  # one Flower task per step and per rollback: retries keep the id
    for task in found.values():
        kwargs = ast.literal_eval(task["kwargs"])
        assert kwargs["saga_id"] == saga_id
        assert (kwargs["kind"] == "rollback") == task["name"].endswith(".rollback")
        assert task["name"].removesuffix(".rollback") == kwargs["step"]
        assert saga_id not in task["name"]  # bounded names: Prometheus labels stay bounded
        assert "sku-1" not in task["args"] + task["kwargs"]  # ids only, never the payload
    assert _listed(flower.tasks(f"{saga_id}-ok")) == {
        "shop.reserve": "SUCCESS", "shop.charge": "SUCCESS", "shop.ticket": "SUCCESS"}


def test_flower_api_refuses_requests_without_valid_basic_auth(flower: Flower) -> None:
    """Flower's task API answers 401 without credentials or with a wrong password."""
    assert flower.get("/api/tasks", auth=None)[0] == 401
    assert flower.get("/api/tasks", auth=(USER, "wrong"))[0] == 401
    assert flower.get("/api/tasks", search="kwargs:saga_id=x")[0] == 200
