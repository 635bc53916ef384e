"""Fixtures for tests against a real Redis and real ``celery worker`` subprocesses.

- ``redis_url`` (session): the Redis at ``$REDIS_URL`` (default ``redis://127.0.0.1:6379/0``),
  moved to database ``TEST_DB`` (``$SAGA_TEST_REDIS_DB``, default 9) and flushed once at
  session start. Unreachable: the test fails when ``$CI`` is set, and is skipped otherwise.
- ``redis_client``: a redis-py client on ``redis_url``, closed after the test.
- ``prefix``: a saga key prefix of the test's own, its keys deleted after the test.
- ``worker_factory``: ``start_worker`` (see ``harness``) whose workers are stopped at
  teardown and whose logs are added to the report of a failed test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from tests.integration.harness import WorkerFactory, WorkerProcess, start_worker

TEST_DB = int(os.environ.get("SAGA_TEST_REDIS_DB", "9"))
"""The Redis database the integration tests own and flush (never 0); two runs sharing one
Redis at once need different ``$SAGA_TEST_REDIS_DB`` values."""

_LOG_TAIL_LINES = 400
_WORKERS = pytest.StashKey[list[WorkerProcess]]()


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def _flush(url: str) -> str | None:
    """Flush the database at ``url``; return why that failed, or None."""
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10) as client:
            client.ping()
            client.flushdb()
    except redis.RedisError as exc:
        return f"Redis at {url} cannot be reached ({exc}): start redis-server or set REDIS_URL"
    return None


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of a real, reachable, freshly flushed Redis database for this test session."""
    url = _with_db(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), TEST_DB)
    problem = _flush(url)
    if problem is not None:
        if _in_ci():
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    return url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A redis-py client on the test database, closed after the test."""
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A saga key prefix of this test's own, whose keys are deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}:"
    yield name
    keys = list(redis_client.scan_iter(match=f"{name}*"))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def worker_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkerFactory]:
    """Start workers with ``start_worker``'s arguments; every one is stopped at teardown."""
    workers: list[WorkerProcess] = []
    request.node.stash[_WORKERS] = workers
    log_dir = tmp_path / "worker-logs"
    log_dir.mkdir()

    def start(app_module: str, **options: Any) -> WorkerProcess:
        worker = start_worker(app_module, log_dir=log_dir, **options)
        workers.append(worker)
        return worker

    yield start
    for worker in reversed(workers):
        worker.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Add the log of each worker the test started to the report of a failed phase."""
    report = yield
    if report.failed:
        for worker in item.stash.get(_WORKERS, []):
            lines = worker.log().splitlines()[-_LOG_TAIL_LINES:]
            report.sections.append((f"worker log {worker.hostname}", "\n".join(lines)))
    return report


from tests.integration.shop_fixtures import saga_id, shop, shop_env, shop_worker  # noqa: E402,F401
