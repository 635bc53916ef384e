"""Every error saga_celery raises, under one root.

    SagaError
    ├── SagaConfigError          (also ValueError)  bad retries/timeout/options, at decoration
    ├── SagaDefinitionError      (also ValueError)  a saga with no steps, a rollback twice, ...
    ├── SagaNotFoundError        (also LookupError) no saga with that id
    ├── SagaConflictError                           a saga id reused with different params
    ├── SagaStateError                              an operation the saga's status forbids
    ├── SagaFormatError                             written by a newer release: left untouched
    ├── StepOutputError                             a step output that cannot be stored
    │   ├── OutputNotSerializableError
    │   └── OutputTooLargeError
    └── SagaStoreError                              the saga store failed
        ├── SagaStoreUnavailableError (also ConnectionError)  Redis cannot be reached
        └── SagaCorruptStateError                   a stored record is not saga_celery's

    NonRetryableError  raised by user code in a step or rollback handler: do not retry.
    RetryLater         raised by user code: retry after this delay (still within the limit).

Errors carry structured attributes (``saga_id``, ``step``) where they belong to one.
"""

from __future__ import annotations


class SagaError(Exception):
    """Root of every error saga_celery raises."""

    def __init__(self, message: str, *, saga_id: str | None = None, step: str | None = None):
        super().__init__(message)
        self.saga_id = saga_id
        self.step = step


class SagaConfigError(SagaError, ValueError):
    """A step's or rollback's configuration is invalid (raised when the module is imported)."""


class SagaDefinitionError(SagaError, ValueError):
    """A saga or step is declared in a way that cannot run."""


class SagaNotFoundError(SagaError, LookupError):
    """No saga with that id exists (or its retention expired)."""


class SagaConflictError(SagaError):
    """A saga id was reused with different params or a different saga."""


class SagaStateError(SagaError):
    """The saga's status does not allow the requested operation."""


class StepOutputError(SagaError):
    """A step returned an output saga_celery cannot store; the saga fails and rolls back."""


class OutputNotSerializableError(StepOutputError):
    """The step's output is not JSON-serializable."""


class OutputTooLargeError(StepOutputError):
    """The step's JSON output is larger than ``SagaApp(max_output_bytes=...)``."""


class SagaStoreError(SagaError):
    """The saga store failed to read or write saga state."""


class SagaStoreUnavailableError(SagaStoreError, ConnectionError):
    """The saga store (Redis) cannot be reached."""


class SagaFormatError(SagaError):
    """A stored saga or a message is in a format newer than this release reads: it was
    written by a newer saga_celery, and is left untouched for a process that reads it."""


class SagaCorruptStateError(SagaStoreError):
    """A record under the saga key prefix is not a saga_celery record this version can read."""


class NonRetryableError(Exception):
    """Raise it in a step or rollback handler to skip the remaining retries."""


class RetryLater(Exception):
    """Raise it in a step or rollback handler to set the delay before its next retry
    yourself (a rate limit's Retry-After): ``raise RetryLater("30 seconds", "rate limited")``.

    ``delay`` is a duration as in ``retries=``: a ``timedelta``, a string such as
    ``"30 seconds"``, or a number of milliseconds.  The retry still counts against the
    limit; with none left the attempt fails for good, like any other failure.
    """

    def __init__(self, delay: object, message: str = "") -> None:
        from saga_celery._core.durations import parse_duration

        try:
            self.delay = parse_duration(delay)
        except ValueError as exc:
            raise SagaConfigError(f"RetryLater({delay!r}): {exc}") from exc
        super().__init__(message or f"retry in {self.delay.total_seconds():g} s")

    @property
    def delay_ms(self) -> float:
        return self.delay.total_seconds() * 1000.0

    def __reduce__(self) -> tuple[type[RetryLater], tuple[object, str]]:
        """Rebuilt from its delay and message (Celery pickles a task's exception)."""
        return (type(self), (self.delay, str(self)))
