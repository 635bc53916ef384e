"""A declared saga: its stages turned into a ``Plan``, validated when declared."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from celery import Task
from celery.canvas import Signature, chord, group

from saga_celery._celery.coordinator import Coordinator, SagaReader
from saga_celery._celery.handle import SagaHandle
from saga_celery._celery.tasks import SagaStepTask
from saga_celery._core.durations import parse_duration
from saga_celery._core.model import (
    Backoff,
    OnFailure,
    OnRollbackError,
    Plan,
    Policy,
    RollbackMode,
    StepSpec,
    WaitKind,
    WaitSpec,
)
from saga_celery._errors import SagaDefinitionError, SagaError

SAGA_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}$")


class SagaDefinition:
    """``sagas.saga(name, stages)``: start runs of it with ``apply_async``."""

    def __init__(self, name: str, stages: Sequence[Any], *, tasks: Mapping[str, Any],
                 coordinator: Coordinator, reader: SagaReader, rollback_mode: str,
                 on_rollback_error: str, on_failure: str = "rollback",
                 hold_timeout: object = None) -> None:
        self._coordinator = coordinator
        self._reader = reader
        self.name = name
        failure = _choice(OnFailure, "on_failure", on_failure)
        if hold_timeout is not None and failure != OnFailure.HOLD:
            raise SagaDefinitionError(f"saga {name!r}: hold_timeout applies to "
                                      "on_failure='hold' only")
        self.plan = Plan(stages=_stages(tasks, name, stages),
                         rollback_mode=_choice(RollbackMode, "rollback_mode", rollback_mode),
                         on_rollback_error=_choice(OnRollbackError, "on_rollback_error",
                                                   on_rollback_error),
                         on_failure=failure,
                         hold_timeout_ms=None if hold_timeout is None
                         else _positive_ms(hold_timeout, f"hold_timeout of saga {name!r}"))

    def apply_async(self, *, saga_id: str | None = None, params: Any = None) -> SagaHandle:
        """Start a run (or return the existing one with this ``saga_id`` and params)."""
        saga_id = _checked_id(saga_id)
        text = _json_text(params if params is not None else {}, f"params of saga {saga_id!r}")
        _check_size(text, self._coordinator.max_params_bytes, saga_id)
        self._coordinator.submit(saga_id=saga_id, name=self.name, plan=self.plan,
                                 params=json.loads(text))
        return SagaHandle(self._reader, self._coordinator, saga_id)

    def __repr__(self) -> str:
        steps = [[s.name for s in stage] for stage in self.plan.stages]
        return f"<SagaDefinition {self.name!r} {steps}>"


def _checked_id(saga_id: str | None) -> str:
    if saga_id is None:
        return uuid.uuid4().hex
    if not isinstance(saga_id, str) or not SAGA_ID_RE.match(saga_id):
        raise SagaError(f"invalid saga_id {saga_id!r}: use 1-200 characters of letters, digits "
                        "and . _ : @ / - (starting with a letter or digit)")
    return saga_id


_E = TypeVar("_E", RollbackMode, OnRollbackError, OnFailure)


def _choice(enum: type[_E], field: str, value: str) -> _E:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise SagaDefinitionError(f"{field}={value!r} is not one of {allowed}") from None


def _json_text(value: object, what: str) -> str:
    """``value`` as JSON text, as Celery's JSON serializer would send it; ``SagaDefinitionError``
    naming ``what`` when it has no JSON form (an object, a set, NaN, nesting too deep)."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SagaDefinitionError(f"{what} must be JSON-serializable: {exc}") from exc


def _round_trip(value: object, what: str) -> Any:
    """``value`` as the step will receive it: a tuple becomes a list, a dict key a string."""
    return json.loads(_json_text(value, what))


def _check_size(params: str, limit: int, saga_id: str) -> None:
    """Params live in the saga record, rewritten by every transition: cap them like outputs."""
    size = len(params.encode())
    if size > limit:
        raise SagaDefinitionError(
            f"params of saga {saga_id!r} are {size} bytes of JSON, over the limit of {limit} "
            "(SagaApp(max_output_bytes=...)): pass a reference to the data (an id, a URL) "
            "instead of the data itself", saga_id=saga_id)


def _stages(tasks: Mapping[str, Any], name: str, stages: Sequence[Any]
            ) -> list[list[StepSpec]]:
    if isinstance(stages, Signature) or not isinstance(stages, Sequence) or not stages:
        raise SagaDefinitionError(f"saga {name!r} has no steps: pass a non-empty list of step "
                                  "signatures or groups")
    counts: Counter[str] = Counter()
    plan = []
    for index, item in enumerate(stages):
        if isinstance(item, WaitStage):
            plan.append([item.spec(index, counts)])
            continue
        in_group = isinstance(item, group)
        members = list(item.tasks) if in_group else [item]
        if not members:
            raise SagaDefinitionError(f"saga {name!r}: stage {index} is an empty group")
        plan.append([_spec(tasks, name, member, index, pos, in_group, counts)
                     for pos, member in enumerate(members)])
    return plan


def _spec(tasks: Mapping[str, Any], saga: str, item: Any, stage: int, index: int,
          in_group: bool,
          counts: Counter[str]) -> StepSpec:
    if isinstance(item, WaitStage):
        raise SagaDefinitionError(f"saga {saga!r}, stage {stage}: {item!r} is in a group; a "
                                  "sleep or wait_for_event is a stage of its own")
    sig = item.s() if isinstance(item, Task) else item
    if not isinstance(sig, Signature) or isinstance(sig, chord | group) or (
            sig.subtask_type == "chain"):  # a | b is no instance of the public ``chain``
        raise SagaDefinitionError(
            f"saga {saga!r}, stage {stage}: {item!r} is not a step signature; a stage is "
            "one step signature (step.s(...)) or a group of them")
    task = tasks.get(sig.task)
    if not isinstance(task, SagaStepTask):
        raise SagaDefinitionError(f"saga {saga!r}: task {sig.task!r} is not a saga step "
                                  "(decorate it with @sagas.step)", step=sig.task)
    counts[task.name] += 1
    rollback = type(task).saga_rollback
    where = f"arguments of step {task.name!r} in saga {saga!r}"
    return StepSpec(
        key=f"{task.name}#{counts[task.name]}", name=task.name, count=counts[task.name],
        stage=stage, index=index, task=task.name, args=_round_trip(list(sig.args), where),
        kwargs=_round_trip(dict(sig.kwargs), where), immutable=bool(sig.immutable),
        in_group=in_group, policy=task.saga_config.policy(),
        rollback_task=None if rollback is None else rollback.name,
        rollback_policy=None if rollback is None else rollback.saga_config.policy(),
    )


_NO_RETRIES = Policy(limit=0, delay_ms=0.0, backoff=Backoff.CONSTANT, timeout_ms=0.0)
"""A waiting stage's policy: it runs no task, and is never retried."""


class WaitStage:
    """A stage that waits (SPEC section 8): ``sagas.sleep(...)`` or
    ``sagas.wait_for_event(...)``, placed in ``sagas.saga(name, [...])`` like a step."""

    def __init__(self, wait: WaitSpec, name: str) -> None:
        self.wait = wait
        self.name = name

    def __repr__(self) -> str:
        return f"<WaitStage {self.name!r} {self.wait.kind}>"

    def spec(self, stage: int, counts: Counter[str]) -> StepSpec:
        counts[self.name] += 1
        count = counts[self.name]
        return StepSpec(key=f"{self.name}#{count}", name=self.name, count=count, stage=stage,
                        index=0, task="", policy=_NO_RETRIES, wait=self.wait)


def sleep_stage(duration: object, name: str) -> WaitStage:
    """``sagas.sleep(duration, name=...)``: SagaDefinitionError for a bad duration or name."""
    stage = _stage_name(name)
    return WaitStage(WaitSpec(kind=WaitKind.SLEEP,
                              duration_ms=_positive_ms(duration, f"sleep {stage!r}")), stage)


def wait_stage(event_type: str, timeout: object, name: str | None) -> WaitStage:
    """``sagas.wait_for_event(event_type, timeout=..., name=...)``."""
    if not isinstance(event_type, str) or not event_type or len(event_type) > 200:
        raise SagaDefinitionError(f"wait_for_event: event_type must be a non-empty string of "
                                  f"at most 200 characters, not {event_type!r}")
    stage = _stage_name(name if name is not None else f"wait:{event_type}")
    limit = None if timeout is None else _positive_ms(timeout, f"timeout of {stage!r}")
    return WaitStage(WaitSpec(kind=WaitKind.WAIT, duration_ms=limit, event_type=event_type),
                     stage)


def _stage_name(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 200 or "#" in name:
        raise SagaDefinitionError(f"a waiting stage's name must be a non-empty string of at "
                                  f"most 200 characters without '#', not {name!r}")
    return name


def _positive_ms(value: object, owner: str) -> float:
    try:
        duration = parse_duration(value)
    except ValueError as exc:
        raise SagaDefinitionError(f"{owner}: {exc}") from exc
    if duration.total_seconds() <= 0:
        raise SagaDefinitionError(f"{owner}: the duration must be positive, got {value!r}")
    return duration.total_seconds() * 1000
