"""Fixtures shared by the unit tests of the Celery adapter: a fresh app and SagaApp per test,
and the structlog configuration kept across tests of the command line."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog
from celery import Celery
from celery import _state as celery_state

from saga_celery import SagaApp
from saga_celery._store.memory import MemoryStore


@pytest.fixture(autouse=True)
def _forget_shared_tasks() -> Iterator[None]:
    """Celery adds every ``app.task`` to each app finalized later (shared tasks): drop this
    test's, so the next test's fresh app does not inherit its steps under the same names."""
    before = set(celery_state._on_app_finalizers)
    yield
    celery_state._on_app_finalizers.intersection_update(before)


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Each unit test starts from structlog's defaults: a module an earlier test ran in this
    process (the demo's runner, a test app) may have set a WARNING filter, under which
    ``capture_logs`` sees no lifecycle line at all."""
    before = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**before)


@pytest.fixture
def app() -> Iterator[Celery]:
    celery = Celery("t", broker="memory://", set_as_current=False)
    yield celery
    celery.close()


@pytest.fixture
def sagas(app: Celery) -> SagaApp:
    return SagaApp(app, store=MemoryStore())


@pytest.fixture
def keep_structlog_config() -> Iterator[None]:
    """The CLI points structlog at stderr: give later tests the configuration back."""
    before = structlog.get_config()
    yield
    structlog.configure(**before)
