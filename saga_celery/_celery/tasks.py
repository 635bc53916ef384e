"""Saga step and rollback tasks: ordinary Celery tasks that know when they run in a saga."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
from celery import Celery, Task
from celery.exceptions import Reject
from celery.local import Proxy, maybe_evaluate

from saga_celery._celery.control import Control, split_control
from saga_celery._celery.dispatch import ARGS_REPR
from saga_celery._celery.security import signing
from saga_celery._core.config import StepConfig
from saga_celery._errors import SagaConfigError, SagaDefinitionError, SagaFormatError
from saga_celery._internals.celery import task_settings

if TYPE_CHECKING:
    from saga_celery._celery.runtime import Runtime

log = structlog.get_logger("saga_celery")

TIME_LIMIT_GRACE_S = 2.0
"""The hard limit falls this long after the soft one, for a body that ignores the soft one."""

_GENERATED = frozenset({"app", "name", "run", "_decorated", "__doc__", "__module__",
                        "__annotations__", "__header__", "__wrapped__", "__qualname__",
                        "__dict__", "__weakref__"})
CELERY_RETRY_OPTIONS = frozenset({"autoretry_for", "retry_backoff", "retry_backoff_max",
                                  "retry_jitter", "retry_kwargs", "max_retries",
                                  "default_retry_delay"})
"""Celery's own retry machinery: saga tasks retry through ``retries=`` (the library sets
``max_retries`` from it)."""
_FORCED = frozenset({"acks_late", "reject_on_worker_lost", "serializer", "Request", "typing"})
"""Options a saga task must keep: redelivery and the hard-timeout hook depend on them."""


class SagaTask(Task):  # type: ignore[misc]
    """Common ground: late acks, redelivery on worker loss, JSON, ids-only kwargs repr."""

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    typing = False  # checked in apply_async, minus the saga's control kwarg
    Request = "saga_celery._celery.request:SagaRequest"
    saga_runtime: ClassVar[Runtime]
    """What runs the task's attempts in a saga (the only part of the app a task needs)."""
    saga_config: ClassVar[StepConfig]

    @property
    def serializer(self) -> str:
        """JSON, signed (Celery's ``auth``) when the app signs messages: never pickle."""
        return "auth" if signing(self.app.conf) else "json"

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        control, _ = split_control(dict(kwargs or {}))
        if control is None:
            if self.app.strict_typing:  # Celery's own check, which the control kwarg would fail
                self.__header__(*(args or ()), **(kwargs or {}))
        else:
            options.setdefault("kwargsrepr", control.kwargs_repr())
            options.setdefault("argsrepr", ARGS_REPR)
        return super().apply_async(args, kwargs, **options)


class SagaStepTask(SagaTask):
    """A saga step.  Outside a saga (plain ``.delay()``) it runs like any Celery task."""

    saga_rollback: ClassVar[SagaRollbackTask | None] = None
    saga_register_rollback: ClassVar[Callable[..., SagaRollbackTask]]
    """Registers a rollback handler for this step (``SagaApp.register_rollback``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        control, rest = _received(kwargs)
        if control is None:
            return super().__call__(*args, **kwargs)
        self.saga_runtime.run_step(self, control, args, rest, self.saga_config)
        return None

    def rollback(self, fn: Callable[..., Any] | None = None, *, retries: Any = None,
                 timeout: Any = None, name: str | None = None, **task_options: Any) -> Any:
        """Register this step's rollback handler: ``@step.rollback(retries=..., timeout=...)``."""

        def register(handler: Callable[..., Any]) -> SagaRollbackTask:
            return self.saga_register_rollback(self, handler, retries=retries,
                                               timeout=timeout, name=name,
                                               task_options=task_options)

        return register if fn is None else register(fn)


class SagaRollbackTask(SagaTask):
    """A rollback handler: called with a ``RollbackContext``."""

    saga_step_name: ClassVar[str]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        control, _rest = _received(kwargs)
        if control is None:
            return super().__call__(*args, **kwargs)
        self.saga_runtime.run_rollback(self, control, self.saga_config)
        return None


FORMAT_PAUSE_S = 1.0
"""How long a worker waits before handing back a message in a format it cannot read."""


def _received(kwargs: dict[str, Any]) -> tuple[Control | None, dict[str, Any]]:
    """The message's control and the user's kwargs.  A message from a newer release that this
    one cannot read is handed back (rejected with requeue) for a worker that can, rather than
    failed, which would drop it."""
    try:
        return split_control(kwargs)
    except SagaFormatError as exc:
        log.warning("saga.message_format_unknown", error=str(exc))
        time.sleep(FORMAT_PAUSE_S)
        raise Reject(str(exc), requeue=True) from exc


def time_limits(config: StepConfig) -> dict[str, float]:
    soft = config.timeout.total_seconds()
    return {"soft_time_limit": soft, "time_limit": soft + TIME_LIMIT_GRACE_S}


@dataclass(frozen=True)
class Target:
    """What ``@sagas.step`` or ``@step.rollback`` decorates, taken apart."""

    fn: Callable[..., Any]
    bind: bool
    name: str | None
    """The wrapped Celery task's name (None for a plain function)."""
    options: dict[str, Any]
    """The task options the wrapped task was given."""
    task: Task | None = None
    """The wrapped Celery task, unregistered only once the saga task replaces it."""


def unwrap(target: Any) -> Target:
    """A function, or an existing Celery task, taken apart; registers and unregisters nothing."""
    if isinstance(target, Proxy):
        target = _behind(target)
    if not isinstance(target, Task):
        if not callable(target):
            raise SagaDefinitionError(f"a saga step must be a function or a Celery task, "
                                      f"got {target!r}")
        return Target(target, False, None, {})
    if isinstance(target, SagaTask):
        raise SagaDefinitionError(f"task {target.name!r} is already a saga step or rollback")
    raw = type(target).__dict__.get("run")
    bind = not isinstance(raw, staticmethod)
    fn = raw.__func__ if isinstance(raw, staticmethod) else raw
    if fn is None:
        raise SagaDefinitionError(f"cannot wrap task {target.name!r}: it defines no run()")
    options = {k: v for k, v in type(target).__dict__.items()
               if k not in _GENERATED | _FORCED and not k.startswith("__")}
    for attr, setting in task_settings():  # filled in from app.conf when Celery bound it
        if attr in options and options[attr] == target.app.conf.get(setting):
            del options[attr]
    return Target(fn, bind, target.name, {**options, **_retry_options(target)}, target)


def _behind(proxy: Proxy) -> Any:
    """What a Celery proxy stands for: a lazy ``@app.task`` evaluates itself; a task behind
    any other proxy (``@shared_task``) is the task its bound methods are bound to."""
    target = maybe_evaluate(proxy)
    if isinstance(target, Proxy) and isinstance(target, Task):
        return target.apply_async.__self__
    return target


def _retry_options(task: Task) -> dict[str, Any]:
    """Celery retry options the task has from its own base class (not Celery's defaults)."""
    unset = object()
    values = {attr: getattr(task, attr, unset) for attr in CELERY_RETRY_OPTIONS}
    return {attr: value for attr, value in values.items()
            if value is not unset and value != getattr(Task, attr, unset)}


def refuse_celery_retries(owner: str, options: Mapping[str, Any]) -> None:
    """Celery's own retries beside the saga's would retry twice over, and record ``Retry``
    as the error: ``SagaConfigError`` naming ``owner`` and the options."""
    given = sorted(CELERY_RETRY_OPTIONS.intersection(options))
    if given:
        raise SagaConfigError(
            f"{owner!r}: Celery's retry options ({', '.join(map(repr, given))}) do not apply "
            "to saga steps and rollbacks, which retry through retries= alone: use e.g. "
            "retries={'limit': 3, 'delay': '10 seconds', 'backoff': 'exponential'}",
            step=owner)


def build_task(app: Celery, target: Target, *, base: type[SagaTask], name: str,
               options: dict[str, Any]) -> Any:
    """Register ``target`` as a saga task, in place of the Celery task it wraps."""
    if target.task is not None:
        target.task.app.tasks.pop(target.task.name, None)
    return app.task(target.fn, base=base, bind=target.bind, name=name, lazy=False,
                    shared=False, **options)
