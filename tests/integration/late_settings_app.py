"""A saga app whose settings replace ``broker_transport_options`` after ``SagaApp()`` was built,
as a settings module applied late would: its step no longer fits the visibility timeout.

The visibility timeout comes from ``$LATE_VISIBILITY_TIMEOUT_S`` (default 30 s, under the
step's 50 s timeout).
"""

from __future__ import annotations

import os

from celery import Celery

from saga_celery import SagaApp

URL = os.environ.get("SAGA_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")

app = Celery("late_settings", broker=URL)
app.conf.broker_connection_retry_on_startup = True
sagas = SagaApp(app, redis_url=URL, steps_queue="late.steps", rollbacks_queue="late.rollbacks")


@sagas.step(name="late.slow", retries={"limit": 0}, timeout="50 seconds")
def slow() -> None:
    return None


app.conf.broker_transport_options = {
    "visibility_timeout": float(os.environ.get("LATE_VISIBILITY_TIMEOUT_S", "30"))}
