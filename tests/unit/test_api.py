"""The public Python API on a Celery app (SPEC sections 1 and 2), without a worker.

Every test builds its own Celery app on the in-memory broker and a ``SagaApp`` on the
in-memory store.  Messages a test must see are caught as Celery publishes them
(``before_task_publish``); a step "runs" by ``Task.apply`` of its message, as a worker would.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
from celery import Celery, Task, group
from celery.canvas import Signature
from celery.exceptions import CDeprecationWarning
from celery.signals import before_task_publish

from saga_celery import (
    RollbackContext,
    SagaApp,
    SagaError,
    SagaHandle,
    SagaState,
    StepConfig,
    StepContext,
    current_step,
)
from saga_celery._celery.dispatch import build_message
from saga_celery._celery.routing import RESTORE_DEFAULTS
from saga_celery._core.events import AttemptStarted, AttemptSucceeded
from saga_celery._core.model import Kind
from saga_celery._store.memory import MemoryStore

TIME_LIMIT_GRACE_MAX_S = 5.0
"""How far above the soft limit the hard limit may sit ("slightly above")."""


@dataclass
class Published:
    task: str
    routing_key: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: Any


@pytest.fixture
def published() -> Iterator[list[Published]]:
    """Every task message published during the test, as the broker gets it."""
    seen: list[Published] = []

    def record(sender: str, body: Any = None, routing_key: str = "", headers: Any = None,
               properties: Any = None, **_: Any) -> None:
        seen.append(Published(sender, routing_key, dict(headers or {}), dict(properties or {}),
                              body))

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


def flower_kwargs_match(key: str, value: str, kwargs_repr: str) -> bool:
    """Flower's ``kwargs:<key>=<value>`` search (``flower/utils/search.py``), verbatim."""
    value = str(value)
    try:
        key_index = kwargs_repr.index(key) + len(key) + 3
    except ValueError:
        return False
    try:
        comma_index = kwargs_repr.index(",", key_index)
    except ValueError:
        comma_index = kwargs_repr.index("}", key_index)
    return value == kwargs_repr[key_index:comma_index].strip("\"'")


def route(app: Celery, name: str, kwargs: dict[str, Any] | None = None) -> str:
    """The queue Celery's router sends task ``name`` to."""
    return str(app.amqp.router.route({}, name, (), kwargs or {})["queue"].name)


def run_due(sagas: SagaApp, saga_id: str) -> list[Any]:
    """Run every due message of the saga in this process, as a worker would (``Task.apply``)."""
    run = sagas._store.load(saga_id).run  # type: ignore[union-attr]
    results = []
    for dispatch in list(run.outbox.values()):
        message = build_message(run, dispatch, sagas._dispatcher.clock())
        task = sagas.app.tasks[message.task]
        results.append(task.apply(args=message.args, kwargs=message.kwargs,
                                  task_id=message.task_id, retries=message.retries))
    return results


def finish_step(sagas: SagaApp, saga_id: str, key: str, output: Any) -> Any:
    """Record one step attempt that started and succeeded (what its worker would record)."""
    sagas._engine.handle(saga_id, AttemptStarted(kind=Kind.STEP, key=key, attempt=1))
    return sagas._engine.handle(saga_id, AttemptSucceeded(kind=Kind.STEP, key=key, attempt=1,
                                                         output=output))


# --- a step is a Celery task ------------------------------------------------------------------


def test_step_is_a_registered_celery_task(app: Celery, sagas: SagaApp) -> None:
    """``@sagas.step`` returns a Celery task, registered under its name, with ``.s()``/``.si()``."""
    @sagas.step
    def reserve(sku: str, qty: int) -> dict[str, str]:
        return {"reservation_id": f"{sku}-{qty}"}

    assert isinstance(reserve, Task)
    assert reserve.name == "tests.unit.test_api.reserve"
    assert app.tasks[reserve.name] is reserve
    signature = reserve.s("sku-1", 2)
    assert isinstance(signature, Signature)
    assert (signature.task, signature.args, signature.immutable) == (reserve.name,
                                                                      ("sku-1", 2), False)
    assert reserve.si("sku-1", 2).immutable


def test_step_task_is_late_acked_with_time_limits_from_its_timeout(sagas: SagaApp) -> None:
    """A step task acks late, is redelivered on worker loss, and its Celery time limits and
    ``max_retries`` come from its config."""
    @sagas.step(retries={"limit": 2, "delay": "1 second"}, timeout="30 seconds")
    def reserve() -> None:
        return None

    assert reserve.acks_late is True
    assert reserve.reject_on_worker_lost is True
    assert reserve.soft_time_limit == 30
    assert 30 < reserve.time_limit <= 30 + TIME_LIMIT_GRACE_MAX_S
    assert reserve.max_retries == 2
    assert isinstance(reserve.saga_config, StepConfig)
    assert reserve.saga_config.retries.limit == 2


def test_step_without_config_gets_the_spec_defaults(sagas: SagaApp) -> None:
    """No config: retries limit 5 (``max_retries``), a 10 minute timeout (soft time limit)."""
    @sagas.step
    def reserve() -> None:
        return None

    assert reserve.max_retries == 5
    assert reserve.soft_time_limit == 600
    assert reserve.saga_config.retries.backoff == "exponential"
    assert reserve.saga_config.retries.delay.total_seconds() == 10


def test_rollback_task_is_late_acked_with_its_own_limits(sagas: SagaApp) -> None:
    """The rollback handler is its own Celery task with its own time limits and retries."""
    @sagas.step(retries={"limit": 1}, timeout="30 seconds")
    def reserve() -> None:
        return None

    @reserve.rollback(retries={"limit": 3, "delay": "15 seconds", "backoff": "linear"},
                      timeout="2 minutes")
    def release(ctx: RollbackContext) -> None:
        return None

    assert isinstance(release, Task)
    assert sagas.app.tasks[release.name] is release
    assert release.acks_late is True and release.reject_on_worker_lost is True
    assert release.soft_time_limit == 120
    assert 120 < release.time_limit <= 120 + TIME_LIMIT_GRACE_MAX_S
    assert release.max_retries == 3
    assert type(reserve).saga_rollback is release


def test_celery_task_options_pass_through(sagas: SagaApp) -> None:
    """Options the library does not own (``rate_limit``, ``track_started``, ...) reach the task."""
    @sagas.step(rate_limit="10/s", track_started=True, ignore_result=False)
    def charge() -> None:
        return None

    assert charge.rate_limit == "10/s"
    assert charge.track_started is True
    assert charge.ignore_result is False


def test_priority_passes_through_to_the_messages(sagas: SagaApp,
                                                 published: list[Published]) -> None:
    """``priority=`` reaches the task and the messages sent for it (Celery 5.7 warns that the
    task attribute is deprecated, as it does for ``@app.task(priority=...)``; 5.6 does not)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"(?s).*'priority' task attribute", CDeprecationWarning)
        @sagas.step(name="api.urgent", priority=7)
        def urgent() -> None:
            return None

    assert urgent.priority == 7
    sagas.saga("s", [urgent.s()]).apply_async()
    assert [p.properties.get("priority") for p in published] == [7]


# --- queues and routing -----------------------------------------------------------------------


def test_steps_rollbacks_and_explicit_queues_are_routed_by_task_routes(app: Celery,
                                                                       sagas: SagaApp) -> None:
    """Steps go to ``saga.steps``, rollbacks to ``saga.rollbacks``, ``queue=`` to its own queue;
    all through the router in ``task_routes``, not the deprecated task attribute."""
    @sagas.step(name="api.charge", queue="payments")
    def charge() -> None:
        return None

    @sagas.step(name="api.reserve")
    def reserve() -> None:
        return None

    @reserve.rollback
    def release(ctx: RollbackContext) -> None:
        return None

    assert sagas.router in app.conf.task_routes
    assert route(app, "api.charge") == "payments"
    assert route(app, "api.reserve") == "saga.steps"
    assert route(app, "api.reserve.rollback") == "saga.rollbacks"
    assert sagas.router("api.charge", (), {}, {}) == {"queue": "payments"}
    assert "queue" not in type(charge).__dict__


def test_published_messages_go_to_the_routed_queues(sagas: SagaApp,
                                                    published: list[Published]) -> None:
    """The first stage's messages are published with the routing key of their queue."""
    @sagas.step(name="api.charge", queue="payments")
    def charge() -> None:
        return None

    @sagas.step(name="api.reserve")
    def reserve() -> None:
        return None

    sagas.saga("s", [group(charge.s(), reserve.s())]).apply_async()
    assert sorted((p.task, p.routing_key) for p in published) == [
        ("api.charge", "payments"), ("api.reserve", "saga.steps")]


def test_queue_names_are_configurable(app: Celery) -> None:
    """``SagaApp(steps_queue=..., rollbacks_queue=...)`` renames both queues."""
    sagas = SagaApp(app, store=MemoryStore(), steps_queue="orders.steps",
                    rollbacks_queue="orders.rollbacks")

    @sagas.step(name="api.reserve")
    def reserve() -> None:
        return None

    @reserve.rollback
    def release(ctx: RollbackContext) -> None:
        return None

    assert route(app, "api.reserve") == "orders.steps"
    assert route(app, "api.reserve.rollback") == "orders.rollbacks"
    assert {q.name for q in app.conf.task_queues} == {"celery", "orders.steps",
                                                      "orders.rollbacks"}


def test_task_queues_hold_the_default_and_both_saga_queues(app: Celery) -> None:
    """A worker started without ``-Q`` consumes the default queue and both saga queues."""
    app.conf.task_default_queue = "shop.default"
    SagaApp(app, store=MemoryStore())
    queues = {q.name: q for q in app.conf.task_queues}
    assert set(queues) == {"shop.default", "saga.steps", "saga.rollbacks"}
    assert queues["saga.steps"].routing_key == "saga.steps"


def test_user_queues_and_routes_are_kept(app: Celery) -> None:
    """Queues and routes the user declared stay; the saga router goes first."""
    app.conf.task_queues = [_direct_queue("mail")]
    app.conf.task_routes = {"mail.*": {"queue": "mail"}}
    sagas = SagaApp(app, store=MemoryStore())
    assert {q.name for q in app.conf.task_queues} == {"mail", "saga.steps", "saga.rollbacks"}
    assert app.conf.task_routes[0] is sagas.router
    assert route(app, "mail.send") == "mail"


def _direct_queue(name: str) -> Any:
    from kombu import Exchange, Queue

    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def test_kombu_restore_options_are_shortened(app: Celery) -> None:
    """``SagaApp`` sets kombu's unacked-restore options to seconds, keeping other options."""
    app.conf.broker_transport_options = {"visibility_timeout": 120}
    SagaApp(app, store=MemoryStore())
    options = app.conf.broker_transport_options
    assert options == {"visibility_timeout": 120, **RESTORE_DEFAULTS}
    assert set(RESTORE_DEFAULTS) == {"unacked_restore_interval", "unacked_restore_throttle",
                                     "unacked_mutex_expire"}
    assert options["unacked_restore_interval"] < 10
    assert options["unacked_mutex_expire"] < 300


def test_kombu_restore_options_the_user_set_are_kept(app: Celery) -> None:
    """An unacked-restore option the user set is not overwritten."""
    app.conf.broker_transport_options = {"unacked_restore_interval": 7}
    SagaApp(app, store=MemoryStore())
    assert app.conf.broker_transport_options["unacked_restore_interval"] == 7
    assert app.conf.broker_transport_options["unacked_mutex_expire"] == (
        RESTORE_DEFAULTS["unacked_mutex_expire"])


# --- decorating an existing Celery task -------------------------------------------------------

def test_existing_celery_task_keeps_its_name_and_options(app: Celery, sagas: SagaApp) -> None:
    """``@sagas.step`` above ``@app.task(name=..., rate_limit=...)`` keeps that name and option."""
    @sagas.step(retries={"limit": 1}, timeout="5 seconds")
    @app.task(name="custom.name", rate_limit="5/s")
    def custom(x: int) -> int:
        return x * 2

    assert custom.name == "custom.name"
    assert app.tasks["custom.name"] is custom
    assert custom.rate_limit == "5/s"
    assert custom.acks_late is True
    assert custom.reject_on_worker_lost is True
    assert custom.max_retries == 1
    assert custom.soft_time_limit == 5
    assert custom(4) == 8
    assert route(app, "custom.name") == "saga.steps"


def test_existing_bound_task_gets_self_and_runs_in_a_saga(app: Celery, sagas: SagaApp) -> None:
    """A ``bind=True`` task wrapped as a step still gets the task as ``self``, outside and
    inside a saga."""
    seen: list[tuple[str, StepContext]] = []

    @sagas.step(retries={"limit": 0})
    @app.task(name="custom.bound", bind=True)
    def bound(self: Task, x: int) -> int:
        seen.append((self.name, current_step()))
        return x + 1

    with pytest.raises(SagaError):
        bound(1)
    run = sagas.saga("s", [bound.s(1)]).apply_async(saga_id="b-1")
    run_due(sagas, "b-1")
    assert [(name, ctx.step) for name, ctx in seen] == [("custom.bound", "custom.bound")]
    assert run.status().output == 2


def test_wrapping_an_existing_task_warns_nothing(app: Celery, sagas: SagaApp) -> None:
    """Wrapping a task that sets no deprecated option emits no Celery deprecation warning."""
    @sagas.step(retries={"limit": 1}, timeout="5 seconds")
    @app.task(name="custom.quiet")
    def quiet() -> None:
        return None

    assert quiet.name == "custom.quiet"


def test_existing_task_accepts_the_saga_control_kwarg_on_apply_async(
        app: Celery, sagas: SagaApp, published: list[Published]) -> None:
    """A wrapped existing task sends itself with the saga control kwarg (what ``Task.retry``
    does on a worker) like any other step."""
    @sagas.step(retries={"limit": 2, "delay": 100})
    @app.task(name="custom.retrying")
    def retrying(x: int) -> int:
        return x

    @sagas.step(name="api.fresh", retries={"limit": 2, "delay": 100})
    def fresh(x: int) -> int:
        return x

    control = {"saga_id": "s", "kind": "step", "key": "k#1", "step": "k", "count": 1,
               "attempt": 2}
    fresh.apply_async(args=(1,), kwargs={"__saga__": control})
    retrying.apply_async(args=(1,), kwargs={"__saga__": control})
    assert [(p.task, p.routing_key) for p in published] == [("api.fresh", "saga.steps"),
                                                            ("custom.retrying", "saga.steps")]
    assert all(p.headers["kwargsrepr"].startswith("{'saga_id': 's'") for p in published)


def test_existing_task_keeps_the_saga_task_defaults_it_did_not_override(
        app: Celery, sagas: SagaApp) -> None:
    """Options the wrapped task never set do not override the saga task defaults."""
    @sagas.step(retries={"limit": 2, "delay": 100})
    @app.task(name="custom.plain")
    def plain() -> None:
        return None

    assert plain.ignore_result is True
    assert plain.typing is False


# --- names ------------------------------------------------------------------------------------


def test_name_overrides_task_and_step_name(app: Celery, sagas: SagaApp) -> None:
    """``name=`` is the Celery task name and the step's name in status and contexts."""
    contexts: list[StepContext] = []

    @sagas.step(name="payments.charge", retries={"limit": 0})
    def charge() -> str:
        contexts.append(current_step())
        return "charged"

    assert charge.name == "payments.charge"
    assert app.tasks["payments.charge"] is charge
    run = sagas.saga("s", [charge.s()]).apply_async(saga_id="n-1")
    run_due(sagas, "n-1")
    assert [c.step for c in contexts] == ["payments.charge"]
    assert [s.name for s in run.status().steps] == ["payments.charge"]


def test_rollback_default_name_is_step_name_dot_rollback(sagas: SagaApp) -> None:
    """A rollback handler's task is ``<step>.rollback`` unless named."""
    @sagas.step(name="payments.charge")
    def charge() -> None:
        return None

    @charge.rollback
    def refund(ctx: RollbackContext) -> None:
        return None

    @sagas.step(name="payments.hold")
    def hold() -> None:
        return None

    @hold.rollback(name="payments.unhold")
    def unhold(ctx: RollbackContext) -> None:
        return None

    assert refund.name == "payments.charge.rollback"
    assert unhold.name == "payments.unhold"
    assert unhold.saga_step_name == "payments.hold"


def test_cloudflare_shaped_rollback_registers_with_its_config(app: Celery,
                                                              sagas: SagaApp) -> None:
    """``rollback=fn, rollback_config={...}`` registers ``fn`` as the step's rollback task with
    that retries and timeout."""
    def refund(ctx: RollbackContext) -> None:
        return None

    @sagas.step(name="payments.charge", rollback=refund,
                rollback_config={"retries": {"limit": 3, "delay": "15 seconds",
                                             "backoff": "linear"},
                                 "timeout": "2 minutes"})
    def charge(amount: int) -> None:
        return None

    handler = type(charge).saga_rollback
    assert handler is not None
    assert handler.name == "payments.charge.rollback"
    assert app.tasks[handler.name] is handler
    assert handler.saga_config.retries.limit == 3
    assert handler.saga_config.retries.backoff == "linear"
    assert handler.saga_config.retries.delay.total_seconds() == 15
    assert handler.soft_time_limit == 120
    assert handler.max_retries == 3
    assert route(app, handler.name) == "saga.rollbacks"
    spec = sagas.saga("s", [charge.s(5)]).plan.stages[0][0]
    assert spec.rollback_task == handler.name
    assert spec.rollback_policy is not None and spec.rollback_policy.limit == 3


def test_cloudflare_shaped_rollback_config_takes_a_name(sagas: SagaApp) -> None:
    """``rollback_config={"name": ...}`` names the rollback task."""
    def refund(ctx: RollbackContext) -> None:
        return None

    @sagas.step(name="payments.charge", rollback=refund,
                rollback_config={"name": "payments.refund"})
    def charge() -> None:
        return None

    handler = type(charge).saga_rollback
    assert handler is not None and handler.name == "payments.refund"


# --- outside a saga ---------------------------------------------------------------------------


def test_step_called_outside_a_saga_runs_the_plain_function(sagas: SagaApp) -> None:
    """Calling a step, or applying it without a saga, runs the function and records no saga."""
    @sagas.step
    def add(x: int, y: int) -> int:
        return x + y

    @add.rollback
    def undo(ctx: RollbackContext) -> str:
        return f"undo {ctx.step}"

    assert add(1, 2) == 3
    assert add.apply(args=(2, 3)).get() == 5
    assert sagas._store.list_ids() == []


def test_plain_apply_async_keeps_celerys_argument_check(sagas: SagaApp,
                                                        published: list[Published]) -> None:
    """Outside a saga, ``apply_async`` with wrong arguments fails as a Celery task's would."""
    @sagas.step(name="api.add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError):
        add.apply_async(args=(1,))
    add.apply_async(args=(1, 2))
    assert [p.task for p in published] == ["api.add"]


def test_current_step_outside_a_step_raises_saga_error() -> None:
    """``current_step()`` outside a running saga step raises SagaError."""
    with pytest.raises(SagaError, match="outside a running saga step"):
        current_step()


def test_current_step_inside_a_step_describes_it(sagas: SagaApp) -> None:
    """Inside a step ``current_step()`` gives saga id, step, count, attempt, params, config and
    an idempotency key unique per step occurrence."""
    contexts: list[StepContext] = []

    @sagas.step(name="api.work", retries={"limit": 1, "delay": 100}, timeout="7 seconds")
    def work() -> int:
        contexts.append(current_step())
        return len(contexts)

    run = sagas.saga("s", [group(work.si(), work.si())]).apply_async(
        saga_id="c-1", params={"customer": "c-7"})
    run_due(sagas, "c-1")
    assert sorted((c.saga_id, c.step, c.count, c.attempt) for c in contexts) == [
        ("c-1", "api.work", 1, 1), ("c-1", "api.work", 2, 1)]
    assert all(c.params == {"customer": "c-7"} for c in contexts)
    assert all(c.config.timeout.total_seconds() == 7 for c in contexts)
    assert len({c.idempotency_key for c in contexts}) == 2
    outputs = [0, 0]
    for order, ctx in enumerate(contexts, start=1):
        outputs[ctx.count - 1] = order
    assert run.status().output == outputs  # a group's output: declaration order
    with pytest.raises(SagaError):
        current_step()


# --- starting a saga --------------------------------------------------------------------------


def test_apply_async_without_saga_id_uses_a_fresh_uuid4_hex(sagas: SagaApp) -> None:
    """Without ``saga_id`` each run gets a new uuid4 hex id."""
    @sagas.step
    def a() -> None:
        return None

    saga = sagas.saga("s", [a.s()])
    first, second = saga.apply_async(), saga.apply_async()
    for handle in (first, second):
        assert isinstance(handle, SagaHandle)
        parsed = uuid.UUID(handle.id)
        assert (parsed.hex, parsed.version) == (handle.id, 4)
    assert first.id != second.id


def test_apply_async_stores_the_run_with_its_params(sagas: SagaApp) -> None:
    """The run is stored queued, under its saga name, with its params; ``sagas.run(id)`` finds
    it."""
    @sagas.step(name="api.a")
    def a() -> None:
        return None

    handle = sagas.saga("place-order", [a.s()]).apply_async(
        saga_id="order-42", params={"customer": "c-7", "items": [1, 2]})
    assert handle.id == "order-42"
    state = sagas.run("order-42").status()
    assert (state.id, state.name, state.status) == ("order-42", "place-order", "queued")
    assert state.params == {"customer": "c-7", "items": [1, 2]}
    assert [(s.name, s.status) for s in state.steps] == [("api.a", "pending")]
    assert [e["type"] for e in handle.events()] == ["saga_queued"]


def test_apply_async_without_params_stores_an_empty_dict(sagas: SagaApp) -> None:
    """Params default to ``{}``."""
    @sagas.step
    def a() -> None:
        return None

    assert sagas.saga("s", [a.s()]).apply_async().status().params == {}


def test_first_stage_messages_carry_ids_not_payloads(sagas: SagaApp,
                                                     published: list[Published]) -> None:
    """Only the first stage is sent; each message's ``kwargsrepr`` starts with the saga id and
    names step, count and attempt, so Flower's ``kwargs:saga_id=<id>`` finds it; no payload."""
    @sagas.step(name="api.reserve")
    def reserve(sku: str, card: str = "") -> None:
        return None

    @sagas.step(name="api.charge")
    def charge(previous: Any) -> None:
        return None

    saga = sagas.saga("s", [group(reserve.s("sku-secret", card="4111-secret"),
                                  reserve.s("sku-secret")), charge.s()])
    run = saga.apply_async(saga_id="order-42")

    assert [p.task for p in published] == ["api.reserve", "api.reserve"]
    for message in published:
        kwargs_repr = message.headers["kwargsrepr"]
        args_repr = message.headers["argsrepr"]
        assert kwargs_repr.startswith("{'saga_id': 'order-42'")
        assert "'step': 'api.reserve'" in kwargs_repr
        assert "'attempt': 1" in kwargs_repr
        assert flower_kwargs_match("saga_id", run.id, kwargs_repr)
        assert not flower_kwargs_match("saga_id", "order-4", kwargs_repr)
        assert "secret" not in kwargs_repr + args_repr
    counts = sorted(p.headers["kwargsrepr"].split("'count': ")[1][0] for p in published)
    assert counts == ["1", "2"]
    assert len({p.headers["id"] for p in published}) == 2


def test_the_plan_passes_the_previous_output_to_s_but_not_to_si(sagas: SagaApp) -> None:
    """A ``.s()`` step gets the previous stage's output as its first argument; ``.si()`` does
    not; a group's output is the list of its outputs in declaration order."""
    @sagas.step(name="api.reserve")
    def reserve(sku: str) -> None:
        return None

    @sagas.step(name="api.charge")
    def charge(reservation: Any, amount: int) -> None:
        return None

    @sagas.step(name="api.notify")
    def notify(channel: str) -> None:
        return None

    @sagas.step(name="api.close")
    def close(previous: Any) -> None:
        return None

    saga = sagas.saga("s", [reserve.s("sku-1"),
                            group(charge.s(amount=100), notify.si("email")),
                            close.s()])
    saga.apply_async(saga_id="p-1")
    first = finish_step(sagas, "p-1", "api.reserve#1", {"reservation_id": "r-1"})
    messages = {m.task: m for m in (build_message(first.run, d, first.run.created_at)
                                    for d in first.dispatches)}
    assert messages["api.charge"].args == [{"reservation_id": "r-1"}]
    assert messages["api.charge"].kwargs["amount"] == 100
    assert messages["api.notify"].args == ["email"]
    assert set(messages["api.notify"].kwargs) == {"__saga__"}

    finish_step(sagas, "p-1", "api.notify#1", "notified")
    second = finish_step(sagas, "p-1", "api.charge#1", {"charge_id": "c-1"})
    (last,) = [build_message(second.run, d, second.run.created_at) for d in second.dispatches]
    assert (last.task, last.args) == ("api.close", [[{"charge_id": "c-1"}, "notified"]])


def test_first_stage_gets_only_its_own_arguments(sagas: SagaApp,
                                                 published: list[Published]) -> None:
    """The first stage of a saga has no previous output: a ``.s()`` there gets only its
    arguments."""
    @sagas.step(name="api.reserve")
    def reserve(sku: str, qty: int) -> None:
        return None

    sagas.saga("s", [reserve.s("sku-1", qty=2)]).apply_async()
    (message,) = published
    args, kwargs, _ = message.body
    assert args == ["sku-1"]
    assert kwargs["qty"] == 2


# --- handles ----------------------------------------------------------------------------------


def test_wait_on_a_running_saga_raises_builtin_timeout_error(sagas: SagaApp) -> None:
    """``wait(timeout=0.2)`` on a saga that is not terminal raises ``TimeoutError`` after about
    0.2 s."""
    @sagas.step
    def a() -> None:
        return None

    run = sagas.saga("s", [a.s()]).apply_async(saga_id="w-1")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="'w-1' is still queued"):
        run.wait(timeout=0.2)
    assert 0.19 <= time.monotonic() - started < 2


def test_wait_returns_the_state_once_terminal(sagas: SagaApp) -> None:
    """``wait()`` on a terminal saga returns its final state at once."""
    @sagas.step(name="api.a")
    def a() -> None:
        return None

    run = sagas.saga("s", [a.s()]).apply_async(saga_id="w-2")
    finish_step(sagas, "w-2", "api.a#1", {"done": True})
    state = run.wait(timeout=5)
    assert (state.status, state.output) == ("complete", {"done": True})


def test_wait_loads_the_state_only_when_the_saga_may_have_ended(sagas: SagaApp) -> None:
    """``wait()`` on a running saga reads its events, and loads its whole state again only
    when one of them ends the saga: a step's events alone do not cost a load."""
    @sagas.step(name="api.a")
    def a() -> None:
        return None

    @sagas.step(name="api.b")
    def b() -> None:
        return None

    run = sagas.saga("s", [a.s(), b.s()]).apply_async(saga_id="w-3")
    loads = 0
    load = sagas._store.load

    def counted(saga_id: str, *, lease: str | None = None) -> Any:
        nonlocal loads
        loads += threading.current_thread() is threading.main_thread()  # the waiter's
        return load(saga_id, lease=lease)

    def steps() -> None:
        time.sleep(0.2)
        finish_step(sagas, "w-3", "api.a#1", 1)
        time.sleep(0.2)
        finish_step(sagas, "w-3", "api.b#1", 2)

    worker = threading.Thread(target=steps)
    worker.start()
    with mock.patch.object(sagas._store, "load", counted):
        state = run.wait(timeout=5)
    worker.join()
    assert (state.status, state.output) == ("complete", 2)
    assert loads == 2  # the first look, then once after saga_completed


def test_status_is_a_saga_state_that_round_trips_through_json(sagas: SagaApp) -> None:
    """``status()`` returns a ``SagaState`` whose JSON reads back as an equal state."""
    @sagas.step(name="api.a")
    def a() -> None:
        return None

    @a.rollback
    def undo(ctx: RollbackContext) -> None:
        return None

    @sagas.step(name="api.b")
    def b(previous: Any) -> None:
        return None

    run = sagas.saga("s", [a.s(), b.s()]).apply_async(saga_id="j-1", params={"k": [1, "x"]})
    finish_step(sagas, "j-1", "api.a#1", {"nested": {"ok": True}})
    run.terminate(rollback=True)
    state = run.status()
    assert isinstance(state, SagaState)
    assert state.status == "rolling_back"
    encoded = state.model_dump_json()
    assert SagaState.model_validate_json(encoded) == state
    data = json.loads(encoded)
    assert data["status"] == "rolling_back"
    assert data["error"]["type"] == "Terminated"
    assert data["steps"][0]["output"] == {"nested": {"ok": True}}
    assert data["steps"][1]["status"] == "cancelled"


def test_run_gives_a_handle_on_an_existing_saga(sagas: SagaApp) -> None:
    """``sagas.run(id)`` returns a handle with that id, reading the same saga."""
    @sagas.step
    def a() -> None:
        return None

    started = sagas.saga("s", [a.s()]).apply_async(saga_id="h-1")
    handle = sagas.run("h-1")
    assert isinstance(handle, SagaHandle)
    assert handle.id == "h-1"
    assert handle.status() == started.status()
    assert "h-1" in repr(handle)


def test_current_step_is_built_on_first_use_and_kept_for_the_attempt(
        app: Celery, sagas: SagaApp) -> None:
    """The step context is built only when the body asks for it, once per attempt; outside a
    running step (after it, too) ``current_step()`` is an error."""
    seen: list[StepContext] = []

    @sagas.step(name="ctx.lazy", retries={"limit": 0})
    def lazy(x: int) -> int:
        seen.append(current_step())
        seen.append(current_step())
        return x

    @sagas.step(name="ctx.silent", retries={"limit": 0})
    def silent(x: int) -> int:
        return x + 1

    sagas.saga("s", [lazy.s(1), silent.s(), lazy.s()]).apply_async(
        saga_id="ctx-1", params={"p": 1})
    for _ in range(3):  # one stage at a time
        run_due(sagas, "ctx-1")
    assert len(seen) == 4 and seen[0] is seen[1] and seen[2] is seen[3]
    assert [(c.step, c.count, c.attempt, c.params) for c in seen[::2]] == [
        ("ctx.lazy", 1, 1, {"p": 1}), ("ctx.lazy", 2, 1, {"p": 1})]
    assert seen[0].idempotency_key == "ctx-1:ctx.lazy:1"
    with pytest.raises(SagaError, match="outside a running saga step"):
        current_step()
