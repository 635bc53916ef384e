"""Turn outbox entries into Celery task messages and send them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from celery import Celery

from saga_celery._celery.control import CONTROL_KEY, Control
from saga_celery._core.machine import stage_output
from saga_celery._core.model import Dispatch, Kind, SagaRun

_TASK_ID_NS = uuid.UUID("6b0c8d1e-1f0e-4c7a-9a57-5a6a0f1c2b3d")
ARGS_REPR = "(…)"
"""Shown in events and Flower instead of the arguments: payloads stay out of events."""


class Message(NamedTuple):
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    control: Control
    countdown: float
    task_id: str
    retries: int

    def options(self) -> dict[str, Any]:
        return {
            "countdown": self.countdown or None,
            "task_id": self.task_id,
            "retries": self.retries,
            "kwargsrepr": self.control.kwargs_repr(),
            "argsrepr": ARGS_REPR,
            # send_task ignores the task's own ignore_result: without this a caller whose app
            # has a result backend subscribes to a result channel for every saga message
            "ignore_result": True,
        }


def build_message(run: SagaRun, dispatch: Dispatch, now: datetime) -> Message:
    """The task, arguments and options of one outbox entry, resolved from the run."""
    spec = run.plan.spec(dispatch.key)
    control = Control(saga_id=run.id, kind=dispatch.kind, key=spec.key, step=spec.name,
                      count=spec.count, attempt=dispatch.attempt)
    if dispatch.kind == Kind.STEP:
        task = spec.task
        args = list(spec.args)
        if spec.stage > 0 and not spec.immutable:
            args.insert(0, stage_output(run, spec.stage - 1))
        kwargs: dict[str, Any] = {**spec.kwargs, CONTROL_KEY: control.as_kwarg()}
    else:
        assert spec.rollback_task is not None
        task, args, kwargs = spec.rollback_task, [], {CONTROL_KEY: control.as_kwarg()}
    budget = dispatch.attempt - dispatch.retries
    task_id = uuid.uuid5(_TASK_ID_NS, f"{run.id}|{dispatch.kind}|{spec.key}|{budget}")
    countdown = max((dispatch.due_at - now).total_seconds(), 0.0)
    return Message(task=task, args=args, kwargs=kwargs, control=control, countdown=countdown,
                   task_id=str(task_id), retries=dispatch.retries)


class Dispatcher:
    """Sends messages through ``app.send_task`` so ``task_routes`` routes every one."""

    def __init__(self, app: Celery, clock: Callable[[], datetime]) -> None:
        self.app = app
        self.clock = clock

    def send(self, run: SagaRun, dispatches: Sequence[Dispatch]) -> None:
        if not dispatches:
            return
        now = self.clock()
        messages = [build_message(run, d, now) for d in dispatches]
        with self.app.producer_or_acquire() as producer:
            for m in messages:
                self.app.send_task(m.task, m.args, m.kwargs, producer=producer, **m.options())
