"""The public surface of ``saga_celery``: a curated, sorted ``__all__`` (httpx/structlog style)."""

from __future__ import annotations

import saga_celery

EXPECTED = [
    "NonRetryableError",
    "OutputNotSerializableError",
    "OutputTooLargeError",
    "RetryConfig",
    "RetryLater",
    "RollbackContext",
    "SagaApp",
    "SagaConfigError",
    "SagaConflictError",
    "SagaCorruptStateError",
    "SagaDefinition",
    "SagaDefinitionError",
    "SagaError",
    "SagaFormatError",
    "SagaHandle",
    "SagaNotFoundError",
    "SagaRollback",
    "SagaState",
    "SagaStateError",
    "SagaStep",
    "SagaStoreError",
    "SagaStoreUnavailableError",
    "StepConfig",
    "StepContext",
    "StepOutputError",
    "current_step",
]


def test_all_is_exactly_the_public_api() -> None:
    """``saga_celery.__all__`` is exactly the public API: a name added or dropped is a choice."""
    assert saga_celery.__all__ == EXPECTED


def test_all_is_sorted() -> None:
    """``__all__`` is kept sorted, so a diff shows what changed."""
    assert saga_celery.__all__ == sorted(saga_celery.__all__)


def test_every_exported_name_is_importable() -> None:
    """Each name in ``__all__`` is an attribute of the package (``from saga_celery import X``)."""
    namespace: dict[str, object] = {}
    exec("from saga_celery import *", namespace)
    for name in saga_celery.__all__:
        assert getattr(saga_celery, name) is namespace[name], name


def test_public_names_are_defined_in_private_modules() -> None:
    """Every exported class or function lives in a private module: users import from the root."""
    for name in saga_celery.__all__:
        module = getattr(saga_celery, name).__module__
        assert module.startswith("saga_celery._"), (name, module)
