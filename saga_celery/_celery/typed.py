"""What mypy sees of a saga step and a rollback handler: ``SagaStep[P, R]``, ``SagaRollback[R]``.

At run time a step is a Celery task instance (``SagaStepTask``), and celery ships no type
information, so without these a decorated function is ``Any`` to a user's type checker.
These protocols describe, for type checkers only, what a user calls on one (as dramatiq's
``Actor[P, R]`` does): calling it runs the function with its own parameters and return type,
``.delay()`` and ``.si()`` take exactly those parameters, ``.rollback`` is a typed decorator.
Nothing here changes what runs: these are protocol classes, never instantiated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, overload, runtime_checkable

from saga_celery._context import RollbackContext
from saga_celery._core.config import RetryConfig

if TYPE_CHECKING:
    from celery.canvas import Signature
    from celery.result import AsyncResult

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

Retries = RetryConfig | Mapping[str, Any]
"""``retries=``: a ``RetryConfig`` or its fields (``{"limit": 3, "delay": "10 seconds"}``)."""
Duration = str | float | timedelta
"""``timeout=``: ``"30 seconds"``, a number of milliseconds, or a ``timedelta``."""
RollbackHandler = Callable[[RollbackContext], object]
"""What ``rollback=`` and ``@step.rollback`` take: a function of the ``RollbackContext``."""


class _CeleryTask(Protocol):
    """What every saga task has because it is a Celery task."""

    @property
    def name(self) -> str:
        """The Celery task name: the step's name in status, events and contexts."""
        ...

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A Celery signature, for a saga stage.

        Not checked against the function's parameters: in a saga, a step after the first gets
        the previous stage's output as its first positional argument at run time, so its
        ``.s()`` leaves that argument out; whether it does depends on the step's place in the
        saga, which its type cannot know.  ``.si()`` (no argument is added) is checked.
        """
        ...

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> AsyncResult:
        """Celery's ``apply_async``: outside a saga, the task runs like any Celery task."""
        ...

    if TYPE_CHECKING:
        # The rest of Celery's Task API (.map, .apply, .AsyncResult, ...) is as untyped as
        # celery itself: Any, as it was before these protocols, rather than an error.
        def __getattr__(self, name: str) -> Any: ...


@runtime_checkable
class SagaStep(_CeleryTask, Protocol[P, R_co]):
    """A saga step made from a function ``(*P) -> R``, as ``@sagas.step`` returns it.

    ``isinstance(x, SagaStep)`` checks only that ``x`` has these members."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Outside a saga, calling a step just runs its function."""
        ...

    def si(self, *args: P.args, **kwargs: P.kwargs) -> Signature:
        """An immutable signature: the step gets exactly these arguments, nothing before."""
        ...

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """Send the step as a plain Celery task, outside any saga."""
        ...

    @overload
    def rollback(self, fn: Callable[[RollbackContext], R], /, *, retries: Retries | None = None,
                 timeout: Duration | None = None, name: str | None = None,
                 **task_options: Any) -> SagaRollback[R]: ...

    @overload
    def rollback(self, *, retries: Retries | None = None, timeout: Duration | None = None,
                 name: str | None = None, **task_options: Any) -> RollbackDecorator: ...


@runtime_checkable
class SagaRollback(_CeleryTask, Protocol[R_co]):
    """A step's rollback handler, as ``@step.rollback`` returns it."""

    def __call__(self, ctx: RollbackContext, /) -> R_co:
        """Outside a saga, calling a handler just runs its function."""
        ...

    def si(self, *args: Any, **kwargs: Any) -> Signature: ...

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult: ...


class StepDecorator(Protocol):
    """``@sagas.step(...)`` with options: turns a function ``(*P) -> R`` into a step."""

    def __call__(self, fn: Callable[P, R], /) -> SagaStep[P, R]: ...


class RollbackDecorator(Protocol):
    """``@step.rollback(...)`` with options: registers a handler of the ``RollbackContext``."""

    def __call__(self, fn: Callable[[RollbackContext], R], /) -> SagaRollback[R]: ...
