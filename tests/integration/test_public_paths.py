"""The core saga scenarios again, on the public paths: workers with every fast path off.

``SAGA_CELERY_FAST_PATHS=off`` in the workers' environment turns off every fast path that
reaches into kombu's or Celery's internals (``saga_celery._internals``), as a probe does when
the installed version is not what it expects: the worker's main process then acknowledges
every message, as Celery does.  The scenarios are the ones in ``test_sagas`` and
``test_failures``, imported (so collected here once more) and run with this module's
``shop`` and ``shop_env`` fixtures.  Which process acknowledged what: ``test_acks``.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from saga_celery._internals import FAST_PATHS_ENV
from tests.integration.shop_fixtures import import_shop_copy
from tests.integration.test_failures import (  # noqa: F401 (collected here again)
    test_killed_pool_process_is_redelivered_and_next_step_runs_once,
)
from tests.integration.test_sagas import (  # noqa: F401 (collected here again)
    test_failure_rolls_back_in_reverse_start_order_with_outputs_and_error,
    test_happy_path_completes_with_chained_outputs,
    test_parallel_sibling_in_flight_is_compensated_after_it_finishes,
    test_terminate_with_rollback_lets_running_step_finish_then_compensates,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shop_env(redis_url: str) -> dict[str, str]:
    """The shop's workers with every fast path off."""
    return {"SAGA_TEST_REDIS_URL": redis_url, FAST_PATHS_ENV: "off"}


@pytest.fixture(scope="module")
def shop(shop_env: dict[str, str]) -> Iterator[ModuleType]:
    """A private copy of the shop module built with ``shop_env`` (the session's stays)."""
    module = import_shop_copy(shop_env, "public")
    yield module
    module.app.close()
