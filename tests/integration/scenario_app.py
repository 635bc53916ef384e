"""The sagas ``test_harness_vs_worker.py`` runs both in process (``saga_celery.testing``) and
on a real prefork worker, to compare what each records.

What an attempt does is read from the saga's params, so the same run can be asked of a
worker and of the harness: ``{"steps": {"<step>": {"<attempt>": ACT}}, "rollbacks":
{"<step>": {"<attempt>": ACT}}}``, ACT one of ``fail`` (``RuntimeError``), ``refuse``
(``NonRetryableError``), ``later`` (``RetryLater`` of ``LATER``), ``hang`` (sleeps past the
timeout), ``refuse_once_started:<step>`` (``refuse`` once that sibling's start is recorded)
and ``until_rolling_back`` (succeeds once the saga is rolling back: in flight meanwhile).

The waiting sagas (SPEC section 8) keep their real-time waits short: a 2 s sleep and a 2 s
wait timeout, which a worker's timer bootstep fires (a waiting stage's end is always a timer
in the store) and the harness fires at virtual time.

Environment: ``SAGA_TEST_REDIS_URL`` (broker and saga state).  Queues and keys carry a
prefix of their own, so the worker takes none of another test's messages.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from celery import Celery, group

from saga_celery import (
    NonRetryableError,
    RetryLater,
    RollbackContext,
    SagaApp,
    SagaDefinition,
    current_step,
)

URL = os.environ.get("SAGA_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
LATER = "5 seconds"
"""A ``later`` retry's delay: long enough that a terminate lands before it, on a slow machine."""
SIBLING_WAIT_S = 15.0
"""The longest an attempt waits for a sibling's start or for the rollback."""
HANG_S = 6.0
"""How long ``hang`` sleeps: past the 1 s timeout of ``sc.slow``, Celery's soft limit (or the
harness's alarm) stops it first."""

app = Celery("scenarios", broker=URL)
app.conf.update(
    broker_transport_options={"visibility_timeout": 60},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_default_queue="hvw.default",
)
sagas = SagaApp(app, redis_url=URL, prefix="hvw:", lease_ttl="3 seconds",
                steps_queue="hvw.saga.steps", rollbacks_queue="hvw.saga.rollbacks")

STEP = {"limit": 2, "delay": 100, "backoff": "constant"}
HANDLER = {"limit": 1, "delay": 100, "backoff": "constant"}
SHORT = "10 seconds"


def error_of(act: str, what: str, attempt: int) -> Exception:
    """The exception ``act`` raises in attempt ``attempt`` of ``what``."""
    if act == "fail":
        return RuntimeError(f"{what} failed on attempt {attempt}")
    if act == "refuse":
        return NonRetryableError(f"{what} refused")
    if act == "later":
        return RetryLater(LATER, f"{what} busy")
    raise ValueError(f"unknown act {act!r}")


def act_out(plan: Any, section: str, name: str, attempt: int, saga_id: str) -> None:
    acts = plan.get(section, {}).get(name, {}) if isinstance(plan, dict) else {}
    act = acts.get(str(attempt))
    if act == "hang":
        time.sleep(HANG_S)
    elif act == "until_rolling_back":
        _until(lambda: sagas.run(saga_id).status().status == "rolling_back")
    elif act is not None and act.startswith("refuse_once_started:"):
        sibling = act.split(":", 1)[1]
        _until(lambda: sagas.run(saga_id).status().step(sibling).start_seq is not None)
        raise error_of("refuse", name, attempt)
    elif act is not None:
        raise error_of(act, name, attempt)


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + SIBLING_WAIT_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def step_body(name: str) -> None:
    ctx = current_step()
    act_out(ctx.params, "steps", name, ctx.attempt, ctx.saga_id)


def handler(name: str) -> Callable[[RollbackContext], None]:
    def undo(ctx: RollbackContext) -> None:
        act_out(ctx.params, "rollbacks", name, ctx.attempt, ctx.saga_id)

    return undo


@sagas.step(name="sc.reserve", retries=STEP, timeout=SHORT,
            rollback=handler("sc.reserve"),
            rollback_config={"retries": HANDLER, "timeout": SHORT})
def reserve(sku: str) -> dict[str, str]:
    step_body("sc.reserve")
    return {"reservation": f"r-{sku}"}


@sagas.step(name="sc.charge", retries=STEP, timeout=SHORT, rollback=handler("sc.charge"),
            rollback_config={"retries": HANDLER, "timeout": SHORT})
def charge(reservation: dict[str, str], amount: int) -> dict[str, Any]:
    step_body("sc.charge")
    return {"charged": amount, "for": reservation["reservation"]}


@sagas.step(name="sc.email", retries=STEP, timeout=SHORT, rollback=handler("sc.email"),
            rollback_config={"retries": HANDLER, "timeout": SHORT})
def email(previous: Any) -> str:
    step_body("sc.email")
    return "emailed"


@sagas.step(name="sc.sms", retries=STEP, timeout=SHORT, rollback=handler("sc.sms"),
            rollback_config={"retries": HANDLER, "timeout": SHORT})
def sms(previous: Any) -> str:
    step_body("sc.sms")
    return "texted"


@sagas.step(name="sc.ship", retries=STEP, timeout=SHORT, rollback=handler("sc.ship"),
            rollback_config={"retries": HANDLER, "timeout": SHORT})
def ship(previous: Any) -> str:
    step_body("sc.ship")
    return "shipped"


@sagas.step(name="sc.slow", retries={"limit": 1, "delay": 100, "backoff": "constant"},
            timeout="1 second")
def slow(previous: Any) -> str:
    step_body("sc.slow")
    return "in time"


def _order(name: str, **options: str) -> SagaDefinition:
    return sagas.saga(name, [reserve.s("sku-1"), charge.s(amount=30),
                             group(email.s(), sms.s()), ship.s()], **options)


order = _order("sc-order")
order_continue = _order("sc-order-continue", on_rollback_error="continue")
timed = sagas.saga("sc-timed", [reserve.s("sku-2"), slow.s()])


NAP = "2 seconds"
"""The sleep of ``slept`` and the timeout of ``approval_brief``: short, as a real worker waits
them out."""
APPROVAL = "sc.approval"
"""The event type the ``approval`` sagas wait for."""

slept = sagas.saga("sc-slept", [reserve.s("sku-3"), sagas.sleep(NAP, name="sc.nap"), ship.s()])
approval = sagas.saga("sc-approval", [
    reserve.s("sku-4"), sagas.wait_for_event(APPROVAL, timeout="60 seconds", name="sc.approve"),
    ship.s()])
approval_brief = sagas.saga("sc-approval-brief", [
    reserve.s("sku-5"), sagas.wait_for_event(APPROVAL, timeout=NAP, name="sc.approve"),
    ship.s()])
held = _order("sc-held", on_failure="hold")
