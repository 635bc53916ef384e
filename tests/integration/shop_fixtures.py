"""Fixtures for tests that run ``tests/integration/shop.py`` in real workers."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from tests.integration.harness import WorkerFactory, WorkerProcess, import_copy, start_worker

SHOP = "tests.integration.shop"


@pytest.fixture(scope="session")
def shop_env(redis_url: str) -> dict[str, str]:
    return {"SAGA_TEST_REDIS_URL": redis_url}


@pytest.fixture(scope="session")
def shop(shop_env: dict[str, str]) -> ModuleType:
    """The shop app module, imported in this process with the workers' settings."""
    os.environ.update(shop_env)
    return importlib.import_module(SHOP)


@pytest.fixture
def shop_worker(worker_factory: WorkerFactory, shop_env: dict[str, str]) -> WorkerProcess:
    """A prefork worker (2 processes) consuming every queue of the shop app."""
    return worker_factory(SHOP, env=shop_env, concurrency=2)


@pytest.fixture
def saga_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def ledger(shop: ModuleType, saga_id: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in shop.ledger.lrange(shop.ledger_key(saga_id), 0, -1)]


def entries(shop: ModuleType, saga_id: str, kind: str, step: str | None = None
            ) -> list[dict[str, Any]]:
    return [e for e in ledger(shop, saga_id)
            if e["kind"] == kind and (step is None or e["step"] == step)]


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def import_shop_copy(env: dict[str, str], suffix: str) -> ModuleType:
    """``shop.py`` again as ``<shop>_<suffix>`` built with ``env``: a test module's own
    deployment of the shop (the session's ``shop`` stays as it is)."""
    spec = importlib.util.find_spec(SHOP)
    assert spec is not None and spec.origin is not None
    return import_copy(spec.origin, f"{SHOP}_{suffix}", env)


def module_shop_worker(env: dict[str, str], factory: pytest.TempPathFactory
                       ) -> Iterator[WorkerProcess]:
    """A prefork worker (2 processes) of the shop deployed with ``env``, for the tests of one
    module: yield from it in a module-scoped fixture."""
    with start_worker(SHOP, env=env, concurrency=2, log_dir=factory.mktemp("logs")) as worker:
        yield worker
