"""The worker-side request of saga tasks: records what a killed pool process cannot.

It runs in the worker's main process.  On a hard time limit the pool process is killed
mid-attempt, so the attempt's failure (a timeout) is recorded here; when a pool process
dies (``WorkerLostError``) its lease is released so the redelivered message runs at once.
A task that succeeded acknowledged its own message where it could (``acks.py``): the
request then only forgets it in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from billiard.exceptions import WorkerLostError
from celery.worker.request import Request

from saga_celery._celery.acks import is_redis_channel, is_tag
from saga_celery._celery.control import CONTROL_KEY
from saga_celery._celery.runtime import control_of
from saga_celery._internals.kombu import forget

log = structlog.get_logger("saga_celery")


def _noting_own_ack(on_success: Callable[..., None]) -> Callable[..., None]:
    """``on_success`` that first notes whether the task acknowledged its own message."""

    def noted(self: SagaRequest, failed__retval__runtime: Any, **kwargs: Any) -> None:
        self._acked_by_task = not failed__retval__runtime[0] and self._task_acks()
        on_success(self, failed__retval__runtime, **kwargs)

    return noted


class SagaRequest(Request):  # type: ignore[misc]
    _acked_by_task = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The worker runs a subclass Celery builds per task type (``create_request_cls``),
        # whose own ``on_success`` would replace the one below: wrap it too.
        super().__init_subclass__(**kwargs)
        succeeded = cls.__dict__.get("on_success")
        if succeeded is not None:
            cls.on_success = _noting_own_ack(succeeded)

    on_success = _noting_own_ack(Request.on_success)

    def acknowledge(self) -> None:
        if self._acked_by_task and not self.acknowledged:  # type: ignore[has-type]
            try:
                forget(self.message)
            except Exception:  # as kombu's ack_log_error: never take the consumer down
                log.exception("saga.ack_not_forgotten", task_id=self.id)
            self.acknowledged = True
            return
        super().acknowledge()

    def _task_acks(self) -> bool:
        """Whether the task, which returned normally, acknowledged its message itself: the
        same test it made (a control kwarg it could not parse would have failed it)."""
        message = self.message
        return (CONTROL_KEY in (self.kwargs or {}) and is_tag(message.delivery_tag)
                and is_redis_channel(message.channel)
                and self.task.saga_runtime.dispatcher.acks_in_task())

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        control = control_of(self.kwargs)
        if soft or control is None:
            return
        try:
            configured = self.task.saga_config.timeout.total_seconds()  # not the hard limit
            self.task.saga_runtime.record_hard_timeout(
                control, self.hostname, self.worker_pid, self.id, configured)
        except Exception:
            log.exception("saga.hard_timeout_not_recorded", saga_id=control.saga_id,
                          step=control.step, attempt=control.attempt)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> None:
        control = control_of(self.kwargs)
        if control is not None and isinstance(exc_info.exception, WorkerLostError):
            try:
                self.task.saga_runtime.release_lost_lease(
                    control, self.hostname, self.worker_pid, self.id)
            except Exception:
                log.exception("saga.lease_not_released", saga_id=control.saga_id,
                              step=control.step, attempt=control.attempt)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
