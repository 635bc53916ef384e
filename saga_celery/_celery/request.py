"""The worker-side request of saga tasks: records what a killed pool process cannot.

It runs in the worker's main process.  On a hard time limit the pool process is killed
mid-attempt, so the attempt's failure (a timeout) is recorded here; when a pool process
dies (``WorkerLostError``) its lease is released so the redelivered message runs at once.
"""

from __future__ import annotations

from typing import Any

import structlog
from billiard.exceptions import WorkerLostError
from celery.worker.request import Request

from saga_celery._celery.runtime import control_of

log = structlog.get_logger("saga_celery")


class SagaRequest(Request):  # type: ignore[misc]
    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        control = control_of(self.kwargs)
        if soft or control is None:
            return
        try:
            configured = self.task.saga_config.timeout.total_seconds()  # not the hard limit
            self.task.saga_app.runtime.record_hard_timeout(
                control, self.hostname, self.worker_pid, self.id, configured)
        except Exception:
            log.exception("saga.hard_timeout_not_recorded", saga_id=control.saga_id,
                          step=control.step, attempt=control.attempt)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> None:
        control = control_of(self.kwargs)
        if control is not None and isinstance(exc_info.exception, WorkerLostError):
            try:
                self.task.saga_app.runtime.release_lost_lease(
                    control, self.hostname, self.worker_pid, self.id)
            except Exception:
                log.exception("saga.lease_not_released", saga_id=control.saga_id,
                              step=control.step, attempt=control.attempt)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
