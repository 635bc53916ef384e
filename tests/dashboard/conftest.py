"""The dashboard's tests reuse the integration fixtures: a real Redis, real shop workers."""

from tests.integration.conftest import (  # noqa: F401
    pytest_runtest_makereport,
    redis_client,
    redis_url,
    worker_factory,
)
from tests.integration.shop_fixtures import saga_id, shop, shop_env, shop_worker  # noqa: F401
