"""The failures ``saga_celery.testing.SagaTestEnv`` injects, attempt by attempt.

``Faults`` keeps what a test asked for (an error or a timeout in place of an attempt's body,
an action to run while an attempt runs) by (step or rollback, step name, count, attempt), and
applies it through the runtime's body hook: the attempt's start and end are recorded by the
runtime's own path, only its body is replaced.  It also notes every error raised in a body's
place, so the environment can tell an attempt's failure (recorded as such) from a fault of
the library or the test (shown, not hidden).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from celery import Celery

from saga_celery._celery.control import Control
from saga_celery._celery.runtime import Body
from saga_celery._celery.tasks import SagaRollbackTask, SagaStepTask
from saga_celery._celery.timeouts import AttemptTimeout, is_timeout
from saga_celery._core.config import StepConfig
from saga_celery._core.model import Kind
from saga_celery._errors import SagaConfigError, StepOutputError

Key = tuple[Kind, str, int, int]
"""(step or rollback, step name, count, attempt): what an injected failure replaces."""

Attempts = int | Iterable[int]
"""One attempt number, or several."""


class Faults:
    """Failures and actions injected per attempt, for the registered steps of ``app``.

    ``elapse(duration)`` moves the environment's clock: an injected timeout takes the
    timeout's time before it fails."""

    def __init__(self, app: Celery, elapse: Callable[[timedelta], None]) -> None:
        self._app = app
        self._elapse = elapse
        self._injected: dict[Key, Callable[[StepConfig], Body]] = {}
        self._during: dict[Key, list[Callable[[], object]]] = {}
        self._body_errors: list[BaseException] = []

    # --- what a test asks for --------------------------------------------------------------

    def fail(self, step: object, attempt: Attempts, count: int, *, rollback: bool,
             error: BaseException | None) -> None:
        """Attempt(s) ``attempt`` raise ``error`` (a ``RuntimeError`` naming the attempt)."""
        name = self.step_name(step, rollback=rollback)
        what = f"rollback of {name}" if rollback else name
        for n in _attempts(attempt):
            self._inject((_kind(rollback), name, count, n), _raising(error, what, n))

    def timeout(self, step: object, attempt: Attempts, count: int, *, rollback: bool) -> None:
        """Attempt(s) ``attempt`` run past their timeout."""
        name = self.step_name(step, rollback=rollback)
        for n in _attempts(attempt):
            self._inject((_kind(rollback), name, count, n), self._timing_out)

    def during(self, step: object, action: Callable[[], object], attempt: Attempts,
               count: int, *, rollback: bool) -> None:
        """Call ``action`` while attempt(s) ``attempt`` run, before the body."""
        name = self.step_name(step, rollback=rollback)
        for n in _attempts(attempt):
            _check_count(count, name)
            self._during.setdefault((_kind(rollback), name, count, n), []).append(action)

    def fix(self, step: object, *, rollback: bool) -> None:
        """Drop every failure injected for ``step`` in attempts not run yet."""
        name = self.step_name(step, rollback=rollback)
        kind = _kind(rollback)
        for key in [k for k in self._injected if k[0] == kind and k[1] == name]:
            del self._injected[key]

    def step_name(self, step: object, *, rollback: bool) -> str:
        """The name of a registered step (given as itself or its name); ``SagaConfigError``
        for anything else, or, with ``rollback``, a step with no rollback handler."""
        name = getattr(step, "name", step)
        task = self._app.tasks.get(name) if isinstance(name, str) else None
        if not isinstance(task, SagaStepTask):
            raise SagaConfigError(f"{step!r} is not a saga step of this app (give the step "
                                  "or its name)")
        if rollback and not isinstance(type(task).saga_rollback, SagaRollbackTask):
            raise SagaConfigError(f"step {task.name!r} has no rollback handler to fail",
                                  step=task.name)
        return str(task.name)

    # --- applied while a message runs -----------------------------------------------------

    def body(self, control: Control, config: StepConfig, body: Body) -> Body:
        """The runtime's body hook: an injected failure in place of the body, and every
        error raised in the body's place noted (``attempt_failure``)."""
        key = (control.kind, control.step, control.count, control.attempt)
        injected = self._injected.get(key)
        run = body if injected is None else injected(config)
        actions = self._during.get(key, [])

        def observed() -> Any:
            for action in actions:
                action()
            try:
                return run()
            except BaseException as exc:
                self._body_errors.append(exc)
                raise

        return observed

    def attempt_failure(self, exc: BaseException) -> bool:
        """Whether ``exc`` is an attempt's failure (recorded as such), not a fault."""
        return (any(exc is e for e in self._body_errors) or is_timeout(exc)
                or isinstance(exc, StepOutputError))

    def forget_errors(self) -> None:
        """Forget the errors noted so far (before and after each message)."""
        self._body_errors.clear()

    def _timing_out(self, config: StepConfig) -> Body:
        def late() -> Any:
            self._elapse(config.timeout)
            raise AttemptTimeout

        return late

    def _inject(self, key: Key, body: Callable[[StepConfig], Body]) -> None:
        _check_count(key[2], key[1])
        self._injected[key] = body


def _kind(rollback: bool) -> Kind:
    return Kind.ROLLBACK if rollback else Kind.STEP


def _check_count(count: int, step: str) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SagaConfigError(f"count must be 1 or more, not {count!r}", step=step)


def _attempts(attempt: Attempts) -> list[int]:
    numbers = [attempt] if isinstance(attempt, int) else list(attempt)
    bad = [n for n in numbers if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad or not numbers:
        raise SagaConfigError(f"attempt numbers start at 1; got {attempt!r}")
    return numbers


def _raising(error: BaseException | None, what: str, attempt: int
             ) -> Callable[[StepConfig], Body]:
    if error is not None and not isinstance(error, Exception):
        raise SagaConfigError(f"error= must be an exception instance, got {error!r}")
    chosen = error or RuntimeError(f"injected failure of {what}, attempt {attempt}")

    def body(config: StepConfig) -> Body:
        def fail() -> Any:
            raise chosen

        return fail

    return body
