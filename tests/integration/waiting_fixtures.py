"""Fixtures for the tests of sagas that wait (``waiting_app.py``) on real workers."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import redis

from tests.integration.harness import WorkerFactory, WorkerProcess, import_copy

APP = "tests.integration.waiting_app"


@pytest.fixture
def env(redis_url: str, prefix: str) -> dict[str, str]:
    return {"SAGA_TEST_REDIS_URL": redis_url, "SAGA_TEST_PREFIX": prefix}


@pytest.fixture
def waiting(env: dict[str, str], prefix: str) -> Iterator[ModuleType]:
    """The app module, imported in this process with the workers' settings."""
    spec = importlib.util.find_spec(APP)
    assert spec is not None and spec.origin is not None
    module = import_copy(spec.origin, f"{APP}_{prefix.strip(':')}", env)
    yield module
    module.ledger.close()


def start(factory: WorkerFactory, env: dict[str, str], prefix: str) -> WorkerProcess:
    return factory(APP, env=env, concurrency=2,
                   queues=[f"{prefix}steps", f"{prefix}rollbacks", f"{prefix}default"])


def ledger(waiting: ModuleType, saga_id: str) -> list[dict[str, Any]]:
    raw = waiting.ledger.lrange(waiting.ledger_key(saga_id), 0, -1)
    return [json.loads(entry) for entry in raw]


def timers(client: redis.Redis, prefix: str) -> int:
    """How many timers the store holds under ``prefix``."""
    return int(client.zcard(f"{prefix}timers"))
