"""The core saga scenarios again, with RabbitMQ as the broker and saga state in Redis.

The scenarios are the ones in ``test_sagas`` and ``test_failures``, imported (so collected
here once more) and run with this module's ``shop`` and ``shop_env`` fixtures: a private copy
of the shop app whose broker is ``$SAGA_TEST_AMQP_URL`` (default the local RabbitMQ) and whose
queues and exchanges carry the prefix ``t<db>.``, so runs on a shared vhost collide with
nobody.  The queues are purged before and deleted after the module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType

import pytest
from kombu import Connection, Exchange, Queue

from tests.integration.conftest import TEST_DB, _in_ci
from tests.integration.shop_fixtures import import_shop_copy
from tests.integration.test_failures import (  # noqa: F401 (collected here again)
    test_killed_pool_process_is_redelivered_and_next_step_runs_once,
    test_whole_worker_killed_mid_step_and_a_new_worker_finishes,
)
from tests.integration.test_sagas import (  # noqa: F401 (collected here again)
    test_failure_rolls_back_in_reverse_start_order_with_outputs_and_error,
    test_halt_then_retry_rollback_resumes_with_fresh_budget,
    test_happy_path_completes_with_chained_outputs,
    test_parallel_sibling_in_flight_is_compensated_after_it_finishes,
    test_terminate_with_rollback_lets_running_step_finish_then_compensates,
)

pytestmark = pytest.mark.integration

AMQP_URL = os.environ.get("SAGA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE_PREFIX = f"t{TEST_DB}."
QUEUES = ("saga.steps", "saga.rollbacks", "shop.default")


@pytest.fixture(scope="module")
def shop_env(redis_url: str) -> dict[str, str]:
    """The shop on RabbitMQ: broker and queue names from here, saga state in the test Redis."""
    return {"SAGA_TEST_REDIS_URL": redis_url, "SAGA_TEST_BROKER_URL": AMQP_URL,
            "SAGA_TEST_QUEUE_PREFIX": QUEUE_PREFIX}


@pytest.fixture(scope="module")
def shop(shop_env: dict[str, str]) -> Iterator[ModuleType]:
    """A private copy of the shop module built with ``shop_env`` (the Redis one stays as is)."""
    problem = _reach(AMQP_URL)
    if problem is not None:
        if _in_ci():
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    module = import_shop_copy(shop_env, "amqp")
    _clear_queues(delete=False)
    yield module
    module.app.close()
    _clear_queues(delete=True)


def _reach(url: str) -> str | None:
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"RabbitMQ at {url} cannot be reached ({exc}): start it or set SAGA_TEST_AMQP_URL"
    return None


def _clear_queues(*, delete: bool) -> None:
    """Purge (or delete) this run's own queues and exchanges: left-overs of an earlier run."""
    with Connection(AMQP_URL) as conn:
        channel = conn.default_channel
        for name in QUEUES:
            queue = Queue(f"{QUEUE_PREFIX}{name}", Exchange(f"{QUEUE_PREFIX}{name}", "direct"),
                          routing_key=f"{QUEUE_PREFIX}{name}")
            bound = queue(channel)
            if delete:
                bound.delete()
                bound.exchange.delete()
            else:
                bound.declare()
                bound.purge()
        if delete:
            for exchange in (f"{QUEUE_PREFIX}celery.pidbox", f"reply.{QUEUE_PREFIX}celery.pidbox",
                             f"{QUEUE_PREFIX}celeryev"):
                Exchange(exchange, channel=channel).delete()
