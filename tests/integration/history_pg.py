"""A PostgreSQL database of a test's own for the archive (SPEC section 11).

``archive_url``: ``postgresql://postgres@127.0.0.1:5432/saga_celery_test_<hex>`` (the server
from ``$SAGA_TEST_PG_URL``, default that one without the database), created for the test
and dropped after it.  No server: the test fails when ``$CI`` is set, else it is skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

SERVER = os.environ.get("SAGA_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.fixture
def archive_url() -> Iterator[str]:
    """A fresh database ``saga_celery_test_<hex>``, dropped after the test."""
    try:
        import psycopg
    except ImportError:
        if _in_ci():
            pytest.fail("psycopg is not installed: pip install 'saga-celery[archive]'")
        pytest.skip("psycopg is not installed")
    name = f"saga_celery_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        problem = f"PostgreSQL at {SERVER} cannot be reached ({exc}): start it or set " \
                  "SAGA_TEST_PG_URL"
        if _in_ci():
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    try:
        yield f"{SERVER}/{name}"
    finally:
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
