"""saga_celery: saga-style rollbacks for Celery.

Each step of a multi-step operation carries its rollback handler; when the operation fails,
the handlers of the steps that started run in reverse start order, each with its own
retries, backoff and timeout, on ordinary Celery workers with state in Redis.
"""

from saga_celery._celery.app import SagaApp
from saga_celery._celery.definition import SagaDefinition
from saga_celery._celery.handle import SagaHandle
from saga_celery._celery.typed import SagaRollback, SagaStep
from saga_celery._context import RollbackContext, StepContext, current_step
from saga_celery._core.config import RetryConfig, StepConfig
from saga_celery._core.state import SagaState
from saga_celery._errors import (
    NonRetryableError,
    OutputNotSerializableError,
    OutputTooLargeError,
    RetryLater,
    SagaConfigError,
    SagaConflictError,
    SagaCorruptStateError,
    SagaDefinitionError,
    SagaError,
    SagaFormatError,
    SagaNotFoundError,
    SagaStateError,
    SagaStoreError,
    SagaStoreUnavailableError,
    StepOutputError,
)

__all__ = [
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
