"""Bad input (SPEC section 7): each mistake gets a clear error naming it, and no state is lost.

Every test builds its own Celery app on the in-memory broker (no worker) and a ``SagaApp`` on
the in-memory store, so task registrations never collide between tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery, Task, group
from pydantic import ValidationError

from saga_celery import (
    OutputNotSerializableError,
    OutputTooLargeError,
    RollbackContext,
    SagaApp,
    SagaConfigError,
    SagaConflictError,
    SagaDefinitionError,
    SagaError,
    SagaNotFoundError,
    SagaStateError,
    SagaStoreUnavailableError,
    StepOutputError,
)
from saga_celery._celery.dispatch import build_message
from saga_celery._core.events import AttemptFailed, AttemptStarted, AttemptSucceeded
from saga_celery._core.model import ErrorInfo, Kind
from saga_celery._store.memory import MemoryStore

UNREACHABLE = "redis://127.0.0.1:1/0"
"""Nothing listens on port 1: connecting is refused at once."""


def redis_broker_app(visibility_timeout: float) -> Celery:
    """An app whose broker is Redis (nothing connects at decoration time)."""
    app = Celery("t", broker="redis://127.0.0.1:6379/0", set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": visibility_timeout}
    return app


def noop(ctx: RollbackContext) -> None:
    return None


def nested(depth: int) -> list[Any]:
    """A list inside a list, ``depth`` times: deeper than JSON encoding can recurse."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def one_step_saga(sagas: SagaApp, name: str = "one", **options: Any) -> Any:
    @sagas.step(name=f"bad.{name}.step", retries={"limit": 0}, timeout="5 seconds", **options)
    def step(x: int = 0) -> int:
        return x

    return sagas.saga(name, [step.s(1)])


def run_first_attempt(sagas: SagaApp, saga_id: str) -> Any:
    """Run the saga's first due message in this process, as a worker would (eagerly)."""
    run = sagas._store.load(saga_id).run  # type: ignore[union-attr]
    (dispatch,) = run.outbox.values()
    message = build_message(run, dispatch, sagas._dispatcher.clock())
    task = sagas.app.tasks[message.task]
    return task.apply(args=message.args, kwargs=message.kwargs, task_id=message.task_id,
                      retries=message.retries)


def complete_first_step(sagas: SagaApp, saga_id: str) -> None:
    """Drive a one-step saga to ``complete`` through the engine (what its worker would record)."""
    key = sagas._store.load(saga_id).run.plan.stages[0][0].key  # type: ignore[union-attr]
    sagas._engine.handle(saga_id, AttemptStarted(kind=Kind.STEP, key=key, attempt=1))
    sagas._engine.handle(saga_id, AttemptSucceeded(kind=Kind.STEP, key=key, attempt=1, output=1))


# --- unknown saga id --------------------------------------------------------------------------


def test_unknown_saga_id_raises_not_found_naming_the_id(sagas: SagaApp) -> None:
    """``sagas.run(id)`` for an id never started raises SagaNotFoundError naming that id."""
    with pytest.raises(SagaNotFoundError, match="'nope'") as info:
        sagas.run("nope")
    assert isinstance(info.value, SagaError)
    assert isinstance(info.value, LookupError)
    assert info.value.saga_id == "nope"


# --- invalid configuration, at decoration time -----------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"retries": {"limit": -1}}, "retries.limit"),
        ({"retries": {"limit": 1, "delay": "soon"}}, "retries.delay"),
        ({"retries": {"backoff": "fibonacci"}}, "retries.backoff"),
        ({"retries": {"limit": 1, "tries": 3}}, "retries.tries"),
        ({"timeout": "soon"}, "timeout"),
        ({"timeout": -5}, "timeout"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_invalid_step_config_is_refused_at_decoration_naming_step_and_field(
        app: Celery, sagas: SagaApp, options: dict[str, Any], field: str) -> None:
    """A bad retries/timeout raises SagaConfigError naming the step and the field; nothing is
    registered."""
    with pytest.raises(SagaConfigError) as info:
        @sagas.step(name="bad.bad", **options)
        def bad() -> None:
            return None

    message = str(info.value)
    assert "bad.bad" in message
    assert field in message
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value.__cause__, ValidationError)
    assert info.value.step == "bad.bad"
    assert "bad.bad" not in app.tasks


def test_invalid_rollback_config_is_refused_naming_the_rollback_and_field(sagas: SagaApp) -> None:
    """``@step.rollback(retries={"limit": -1})`` raises SagaConfigError naming the step's rollback
    and the field."""
    @sagas.step(name="bad.reserve")
    def reserve() -> None:
        return None

    with pytest.raises(SagaConfigError) as info:
        @reserve.rollback(retries={"limit": -1})
        def release(ctx: RollbackContext) -> None:
            return None

    assert "rollback of bad.reserve" in str(info.value)
    assert "retries.limit" in str(info.value)
    assert type(reserve).saga_rollback is None


@pytest.mark.parametrize("how", ["decorator", "rollback_config"])
def test_zero_rollback_timeout_is_refused_naming_the_rollback(sagas: SagaApp, how: str) -> None:
    """A rollback handler's timeout must be greater than zero too, given either way."""
    with pytest.raises(SagaConfigError, match=r"rollback of bad\.zero.*timeout"):
        if how == "decorator":
            sagas.step(name="bad.zero")(noop).rollback(timeout=0)(noop)
        else:
            sagas.step(name="bad.zero", rollback=noop, rollback_config={"timeout": 0})(noop)


def test_invalid_cloudflare_rollback_config_is_refused_naming_the_field(sagas: SagaApp) -> None:
    """``rollback_config={"timeout": "soon"}`` raises SagaConfigError naming the rollback and
    timeout."""
    with pytest.raises(SagaConfigError, match=r"rollback of bad\.charge") as info:
        @sagas.step(name="bad.charge", rollback=noop, rollback_config={"timeout": "soon"})
        def charge() -> None:
            return None

    assert "timeout" in str(info.value)


def test_rollback_config_without_rollback_is_refused(sagas: SagaApp) -> None:
    """``rollback_config`` with no ``rollback=`` is a mistake, not silently ignored."""
    with pytest.raises(SagaConfigError, match=r"bad\.charge.*rollback_config given without "):
        @sagas.step(name="bad.charge", rollback_config={"timeout": "1 minute"})
        def charge() -> None:
            return None


def test_unknown_rollback_config_key_is_refused_naming_it(sagas: SagaApp) -> None:
    """An unknown ``rollback_config`` key raises SagaConfigError naming the key and the step."""
    with pytest.raises(SagaConfigError, match=r"bad\.charge.*'retry'"):
        @sagas.step(name="bad.charge", rollback=noop, rollback_config={"retry": {"limit": 1}})
        def charge() -> None:
            return None


def test_step_refused_for_its_rollback_config_is_not_registered(app: Celery,
                                                                sagas: SagaApp) -> None:
    """A step refused for a bad rollback_config is not left registered, like any refused step."""
    with pytest.raises(SagaConfigError):
        @sagas.step(name="bad.charge", rollback=noop, rollback_config={"timeout": "soon"})
        def charge() -> None:
            return None

    assert "bad.charge" not in app.tasks


# --- Celery's own retry options ---------------------------------------------------------------

CELERY_RETRY_OPTIONS = [("autoretry_for", (ValueError,)), ("retry_backoff", True),
                        ("retry_backoff_max", 60), ("retry_jitter", False),
                        ("retry_kwargs", {"max_retries": 2}), ("max_retries", 2),
                        ("default_retry_delay", 5)]
"""Each of Celery's retry options, with a value a user might set."""


def assert_refused_for(info: pytest.ExceptionInfo[SagaConfigError], owner: str,
                       option: str) -> None:
    """The error names the step (or rollback), the option, and the way to retry instead."""
    message = str(info.value)
    assert owner in message and repr(option) in message and "retries=" in message


@pytest.mark.parametrize(("option", "value"), CELERY_RETRY_OPTIONS)
def test_celery_retry_option_on_a_step_is_refused(app: Celery, sagas: SagaApp, option: str,
                                                  value: object) -> None:
    """``@sagas.step(autoretry_for=..., max_retries=..., ...)`` raises SagaConfigError naming the
    step and the option (saga steps retry through ``retries=`` alone); nothing is registered."""
    with pytest.raises(SagaConfigError) as info:
        sagas.step(name="bad.celery", **{option: value})(noop)
    assert_refused_for(info, "bad.celery", option)
    assert info.value.step == "bad.celery"
    assert "bad.celery" not in app.tasks


@pytest.mark.parametrize(("option", "value"), CELERY_RETRY_OPTIONS)
def test_celery_retry_option_on_a_rollback_is_refused(sagas: SagaApp, option: str,
                                                      value: object) -> None:
    """``@step.rollback(max_retries=...)`` and ``rollback_config={"max_retries": ...}`` are
    refused naming the rollback and the option."""
    step = sagas.step(name="bad.celery")(noop)
    with pytest.raises(SagaConfigError) as info:
        step.rollback(**{option: value})(noop)
    assert_refused_for(info, "rollback of bad.celery", option)
    assert type(step).saga_rollback is None
    with pytest.raises(SagaConfigError) as info:
        sagas.step(name="bad.cloudflare", rollback=noop, rollback_config={option: value})(noop)
    assert_refused_for(info, "rollback of bad.cloudflare", option)


@pytest.mark.parametrize(("option", "value"), CELERY_RETRY_OPTIONS)
def test_celery_retry_option_on_a_wrapped_task_is_refused(app: Celery, sagas: SagaApp,
                                                          option: str, value: object) -> None:
    """``@sagas.step`` above ``@app.task(autoretry_for=...)`` raises SagaConfigError naming the
    step and the option, and leaves the Celery task registered as it was."""
    task = app.task(name="plain.retrying", lazy=False, **{option: value})(noop)
    with pytest.raises(SagaConfigError) as info:
        sagas.step(task)
    assert_refused_for(info, "plain.retrying", option)
    assert app.tasks["plain.retrying"] is task


def test_a_wrapped_task_refused_for_its_config_stays_registered(app: Celery,
                                                                sagas: SagaApp) -> None:
    """A Celery task whose saga config is refused is left registered as the plain task it was."""
    task = app.task(name="plain.task", lazy=False)(noop)
    with pytest.raises(SagaConfigError, match="timeout"):
        sagas.step(timeout="soon")(task)
    assert app.tasks["plain.task"] is task


def test_celery_retry_option_inherited_by_a_wrapped_task_is_refused(app: Celery,
                                                                    sagas: SagaApp) -> None:
    """A retry option the wrapped task gets from its own base class is refused too."""
    class Backoff(Task):  # type: ignore[misc]
        retry_backoff = True

    task = app.task(name="plain.based", base=Backoff)(noop)
    with pytest.raises(SagaConfigError) as info:
        sagas.step(retries={"limit": 1})(task)
    assert_refused_for(info, "plain.based", "retry_backoff")


def test_celery_retry_option_on_a_wrapped_rollback_task_is_refused(app: Celery,
                                                                   sagas: SagaApp) -> None:
    """A Celery task with ``max_retries`` registered as a rollback handler is refused."""
    step = sagas.step(name="bad.celery")(noop)
    handler = app.task(name="plain.undo", lazy=False, max_retries=7)(noop)
    with pytest.raises(SagaConfigError) as info:
        step.rollback(handler)
    assert_refused_for(info, "rollback of bad.celery", "max_retries")
    assert app.tasks["plain.undo"] is handler


def test_a_wrapped_task_without_retry_options_gets_its_limit_from_retries(
        app: Celery, sagas: SagaApp) -> None:
    """Celery's defaults on a wrapped task are not the user's: it is accepted, and its
    ``max_retries`` is the saga's ``retries.limit``."""
    step = sagas.step(retries={"limit": 4, "delay": 100})(app.task(name="plain.fine")(noop))
    undo = step.rollback(retries={"limit": 0})(app.task(name="plain.fine-undo")(noop))
    assert (step.max_retries, undo.max_retries) == (4, 0)


# --- the Redis visibility timeout ------------------------------------------------------------


def test_step_waiting_longer_than_the_visibility_timeout_is_refused() -> None:
    """On a Redis broker, a step whose longest delay plus timeout reaches visibility_timeout is
    refused."""
    sagas = SagaApp(redis_broker_app(10), store=MemoryStore())
    with pytest.raises(SagaConfigError, match="visibility_timeout") as info:
        @sagas.step(name="bad.slow", retries={"limit": 0}, timeout="20 seconds")
        def slow() -> None:
            return None

    assert "bad.slow" in str(info.value)
    assert "bad.slow" not in sagas.app.tasks


def test_long_retry_delays_fit_any_visibility_timeout() -> None:
    """Retry delays do not count (SPEC section 8): one longer than max_countdown waits as a
    timer in the store, so a day's delay is accepted under a 10 s visibility timeout."""
    sagas = SagaApp(redis_broker_app(10), store=MemoryStore())

    @sagas.step(name="fine.retrying", timeout="1 second",
                retries={"limit": 3, "delay": "1 day", "backoff": "exponential"})
    def retrying() -> None:
        return None

    assert "fine.retrying" in sagas.app.tasks


def test_defaults_are_refused_under_a_short_visibility_timeout() -> None:
    """The default config (10 min timeout) does not fit a 10 s visibility timeout."""
    sagas = SagaApp(redis_broker_app(10), store=MemoryStore())
    with pytest.raises(SagaConfigError, match="visibility_timeout"):
        @sagas.step
        def plain() -> None:
            return None


def test_rollback_waiting_longer_than_the_visibility_timeout_is_refused() -> None:
    """``@step.rollback`` checks its own config against the visibility timeout too."""
    sagas = SagaApp(redis_broker_app(10), store=MemoryStore())

    @sagas.step(name="bad.quick", retries={"limit": 0, "delay": 1000}, timeout="5 seconds")
    def quick() -> None:
        return None

    with pytest.raises(SagaConfigError, match=r"rollback of bad\.quick.*visibility_timeout"):
        quick.rollback(retries={"limit": 0}, timeout="1 minute")(noop)
    assert type(quick).saga_rollback is None


def test_step_within_the_visibility_timeout_is_accepted() -> None:
    """A step whose longest wait stays under the visibility timeout is registered."""
    sagas = SagaApp(redis_broker_app(10), store=MemoryStore())

    @sagas.step(name="bad.quick", retries={"limit": 2, "delay": 1000, "backoff": "linear"},
                timeout="5 seconds")
    def quick() -> None:
        return None

    @quick.rollback(retries={"limit": 0, "delay": 500}, timeout="7 seconds")
    def undo(ctx: RollbackContext) -> None:
        return None

    assert sagas.app.tasks["bad.quick"] is quick
    assert type(quick).saga_rollback is undo


def test_step_without_retries_is_checked_on_its_timeout_alone() -> None:
    """With ``retries={"limit": 0}`` there is no retry delay: a 5 s timeout fits a 10 s
    visibility timeout whatever the (unused) default delay."""
    sagas = SagaApp(redis_broker_app(10), store=MemoryStore())

    @sagas.step(name="bad.once", retries={"limit": 0}, timeout="5 seconds")
    def once() -> None:
        return None

    assert "bad.once" in sagas.app.tasks


def test_celery_default_visibility_timeout_fits_the_default_config() -> None:
    """With Celery's default visibility timeout (3600 s) the default step config is accepted."""
    app = Celery("t", broker="redis://127.0.0.1:6379/0", set_as_current=False)
    sagas = SagaApp(app, store=MemoryStore())

    @sagas.step
    def plain() -> None:
        return None

    assert plain.name in app.tasks


def test_non_redis_broker_has_no_visibility_timeout_check(app: Celery) -> None:
    """A broker without a visibility timeout (``memory://``) is not checked."""
    app.conf.broker_transport_options = {"visibility_timeout": 10}
    sagas = SagaApp(app, store=MemoryStore())

    @sagas.step(name="bad.long", retries={"limit": 0}, timeout="1 hour")
    def long() -> None:
        return None

    assert "bad.long" in app.tasks


# --- a rollback registered twice --------------------------------------------------------------


def test_second_rollback_decorator_is_refused(sagas: SagaApp) -> None:
    """``@step.rollback`` twice on one step raises SagaDefinitionError naming the step."""
    @sagas.step(name="bad.reserve")
    def reserve() -> None:
        return None

    @reserve.rollback
    def release(ctx: RollbackContext) -> None:
        return None

    with pytest.raises(SagaDefinitionError, match=r"bad\.reserve.*already has a rollback"):
        @reserve.rollback(name="bad.release-again")
        def release_again(ctx: RollbackContext) -> None:
            return None

    assert type(reserve).saga_rollback is release
    assert "bad.release-again" not in sagas.app.tasks


def test_rollback_argument_plus_rollback_decorator_is_refused(sagas: SagaApp) -> None:
    """``rollback=`` on the step and then ``@step.rollback`` raises SagaDefinitionError."""
    @sagas.step(name="bad.charge", rollback=noop)
    def charge() -> None:
        return None

    with pytest.raises(SagaDefinitionError, match=r"bad\.charge"):
        charge.rollback(noop)


# --- sagas that cannot run --------------------------------------------------------------------


def test_saga_with_no_steps_is_refused_naming_it(sagas: SagaApp) -> None:
    """``sagas.saga("x", [])`` raises SagaDefinitionError naming the saga."""
    with pytest.raises(SagaDefinitionError, match="'empty-saga' has no steps"):
        sagas.saga("empty-saga", [])


def test_empty_group_is_refused_naming_the_stage(sagas: SagaApp) -> None:
    """A stage that is an empty ``group`` raises SagaDefinitionError naming the stage."""
    @sagas.step(name="bad.a")
    def a() -> None:
        return None

    with pytest.raises(SagaDefinitionError, match="stage 1 is an empty group"):
        sagas.saga("x", [a.s(), group([])])


def test_plain_celery_task_in_a_saga_is_refused(app: Celery, sagas: SagaApp) -> None:
    """A task not decorated with ``@sagas.step`` cannot be a stage; the error names it."""
    @app.task(name="plain.task")
    def plain() -> None:
        return None

    with pytest.raises(SagaDefinitionError, match=r"'plain\.task' is not a saga step"):
        sagas.saga("x", [plain.s()])


def test_rollback_task_is_not_a_step(sagas: SagaApp) -> None:
    """A rollback handler's task cannot be used as a step."""
    @sagas.step(name="bad.a")
    def a() -> None:
        return None

    @a.rollback
    def undo(ctx: RollbackContext) -> None:
        return None

    with pytest.raises(SagaDefinitionError, match="is not a saga step"):
        sagas.saga("x", [undo.s()])


@pytest.mark.parametrize("shape", ["chain", "chain-in-group", "chord"])
def test_canvas_other_than_signature_or_group_is_refused(sagas: SagaApp, shape: str) -> None:
    """A chain (alone or inside a group) or a chord is not a stage: SagaDefinitionError."""
    @sagas.step(name="bad.a")
    def a(x: Any = None) -> None:
        return None

    @sagas.step(name="bad.b")
    def b(x: Any = None) -> None:
        return None

    stage = {"chain": a.s() | b.s(), "chain-in-group": group(a.s() | b.s(), b.s()),
             "chord": group(a.s(), b.s()) | b.s()}[shape]
    with pytest.raises(SagaDefinitionError, match="is not a step signature"):
        sagas.saga("x", [a.s(), stage])


def test_not_a_list_of_stages_is_refused(sagas: SagaApp) -> None:
    """A single signature instead of a list of stages is refused."""
    @sagas.step(name="bad.a")
    def a() -> None:
        return None

    with pytest.raises(SagaDefinitionError, match="has no steps"):
        sagas.saga("x", a.s())


@pytest.mark.parametrize("bad", [object(), {1, 2}, float("nan")])
def test_non_json_signature_arguments_are_refused_naming_the_step(sagas: SagaApp,
                                                                  bad: object) -> None:
    """Arguments a JSON message cannot carry raise SagaDefinitionError naming the step."""
    @sagas.step(name="bad.a")
    def a(x: Any, y: Any = None) -> None:
        return None

    with pytest.raises(SagaDefinitionError, match=r"step 'bad\.a'.*JSON"):
        sagas.saga("x", [a.s(bad)])
    with pytest.raises(SagaDefinitionError, match=r"step 'bad\.a'.*JSON"):
        sagas.saga("x", [a.s(1, y=bad)])


@pytest.mark.parametrize(("option", "value"), [("rollback_mode", "backwards"),
                                               ("on_rollback_error", "ignore")])
def test_unknown_rollback_options_are_refused_naming_them(sagas: SagaApp, option: str,
                                                          value: str) -> None:
    """A bad ``rollback_mode`` or ``on_rollback_error`` raises SagaDefinitionError naming it."""
    @sagas.step(name="bad.a")
    def a() -> None:
        return None

    with pytest.raises(SagaDefinitionError, match=f"{option}='{value}'"):
        sagas.saga("x", [a.s()], **{option: value})


def test_non_step_object_is_refused_at_decoration(sagas: SagaApp) -> None:
    """``@sagas.step`` on something that is neither a function nor a task is refused."""
    with pytest.raises(SagaDefinitionError, match="must be a function or a Celery task"):
        sagas.step(42)


def test_a_step_cannot_be_decorated_twice(sagas: SagaApp) -> None:
    """Decorating a saga step again with ``@sagas.step`` is refused."""
    @sagas.step(name="bad.a")
    def a() -> None:
        return None

    with pytest.raises(SagaDefinitionError, match=r"'bad\.a' is already a saga step"):
        sagas.step(a)


# --- saga ids and params ----------------------------------------------------------------------


def test_reused_saga_id_with_other_params_conflicts_and_changes_nothing(sagas: SagaApp) -> None:
    """A saga id reused with different params raises SagaConflictError naming it; the stored saga
    is untouched."""
    saga = one_step_saga(sagas)
    saga.apply_async(saga_id="order-42", params={"customer": "c-7"})
    before = sagas._store.load("order-42")
    events_before = sagas.run("order-42").events()

    with pytest.raises(SagaConflictError, match="'order-42'") as info:
        saga.apply_async(saga_id="order-42", params={"customer": "c-8"})

    assert isinstance(info.value, SagaError)
    assert info.value.saga_id == "order-42"
    assert sagas._store.load("order-42") == before
    assert sagas.run("order-42").events() == events_before
    assert sagas.run("order-42").status().params == {"customer": "c-7"}


def test_reused_saga_id_for_another_saga_conflicts(sagas: SagaApp) -> None:
    """The same id under a different saga name conflicts too, even with the same params."""
    first = one_step_saga(sagas, "first")
    second = one_step_saga(sagas, "second")
    first.apply_async(saga_id="order-42")
    with pytest.raises(SagaConflictError, match="'order-42'"):
        second.apply_async(saga_id="order-42")
    assert sagas.run("order-42").status().name == "first"


def test_reused_saga_id_with_same_params_returns_the_run_and_changes_nothing(
        sagas: SagaApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same id and params return a handle on the existing run and change nothing stored;
    while no step has started, its first stage's message goes out again (the first call may
    have failed before sending it; a duplicate is dropped where it arrives)."""
    sent: list[list[Any]] = []
    real_send = sagas._dispatcher.send

    def recording_send(run: Any, dispatches: Any) -> None:
        dispatches = list(dispatches)
        sent.append(dispatches)
        real_send(run, dispatches)

    monkeypatch.setattr(sagas._dispatcher, "send", recording_send)
    saga = one_step_saga(sagas)
    first = saga.apply_async(saga_id="order-42", params={"customer": "c-7"})
    before = sagas._store.load("order-42")

    again = saga.apply_async(saga_id="order-42", params={"customer": "c-7"})

    assert again.id == first.id == "order-42"
    assert [[d.id for d in batch] for batch in sent] == [["step:bad.one.step#1:1"]] * 2
    assert sagas._store.load("order-42") == before


@pytest.mark.parametrize("saga_id", ["", "a b", "order-{42}", "{tag}", " lead", "-dash-first",
                                     "x" * 201, "naïve"])
def test_invalid_saga_id_is_refused_naming_it(sagas: SagaApp, saga_id: str) -> None:
    """A saga id with spaces, braces (Redis hash tags), a bad first character or over 200
    characters is refused, and nothing is stored."""
    saga = one_step_saga(sagas)
    with pytest.raises(SagaError, match="invalid saga_id") as info:
        saga.apply_async(saga_id=saga_id)
    assert repr(saga_id)[:40] in str(info.value)
    assert sagas._store.list_ids() == []


def test_non_string_saga_id_is_refused(sagas: SagaApp) -> None:
    """A saga id must be a string."""
    saga = one_step_saga(sagas)
    with pytest.raises(SagaError, match="invalid saga_id 42"):
        saga.apply_async(saga_id=42)  # type: ignore[arg-type]


@pytest.mark.parametrize("params", [{"when": object()}, {"x": float("inf")}, {1, 2},
                                    {"x": float("nan")}, {"a": {"b": [{1, 2}]}},
                                    {(1, 2): "tuple key"}, {"deep": nested(100_000)}])
def test_non_json_params_are_refused_and_nothing_is_stored(sagas: SagaApp, params: Any) -> None:
    """Params JSON cannot carry raise SagaDefinitionError naming the saga id; no saga is created."""
    saga = one_step_saga(sagas)
    with pytest.raises(SagaDefinitionError, match="params of saga 'order-42'"):
        saga.apply_async(saga_id="order-42", params=params)
    with pytest.raises(SagaNotFoundError):
        sagas.run("order-42")


def test_params_are_stored_as_their_json_round_trip(sagas: SagaApp) -> None:
    """Params JSON holds differently (tuples, int keys, at any depth) start the saga and are
    stored as Celery's JSON would deliver them: lists and string keys."""
    saga = one_step_saga(sagas)
    run = saga.apply_async(saga_id="order-42", params={"a": {2: (3,)}, 1: ("x", {4: 5})})
    assert run.status().params == {"a": {"2": [3]}, "1": ["x", {"4": 5}]}
    again = saga.apply_async(saga_id="order-42", params={"a": {2: (3,)}, 1: ("x", {4: 5})})
    assert again.id == "order-42"


@pytest.mark.parametrize(("args", "kwargs", "stored_args", "stored_kwargs"), [
    (((1, 2),), {}, [[1, 2]], {}),
    (({1: "a"},), {}, [{"1": "a"}], {}),
    ((), {"y": {"n": (1, {2: (3,)})}}, [], {"y": {"n": [1, {"2": [3]}]}}),
])
def test_step_arguments_are_stored_as_their_json_round_trip(
        sagas: SagaApp, args: tuple[Any, ...], kwargs: dict[str, Any], stored_args: list[Any],
        stored_kwargs: dict[str, Any]) -> None:
    """A tuple or an int-keyed dict in a step's arguments is accepted and stored (and passed to
    the step) as its JSON round trip, not refused with a raw pydantic error."""
    seen: list[tuple[Any, ...]] = []

    @sagas.step(name="bad.args", retries={"limit": 0})
    def step(x: Any = None, y: Any = None) -> None:
        seen.append((x, y))

    saga = sagas.saga("args", [step.s(*args, **kwargs)])
    (spec,) = saga.plan.stages[0]
    assert (spec.args, spec.kwargs) == (stored_args, stored_kwargs)
    saga.apply_async(saga_id="args-1")
    run_first_attempt(sagas, "args-1")
    assert seen == [(stored_args[0] if stored_args else None, stored_kwargs.get("y"))]


# --- a Redis that cannot be reached -----------------------------------------------------------


@pytest.fixture
def unreachable() -> Iterator[SagaApp]:
    app = Celery("t", broker="memory://", set_as_current=False)
    yield SagaApp(app, redis_url=UNREACHABLE)
    app.close()


def test_unreachable_redis_on_run_raises_store_unavailable_naming_host(
        unreachable: SagaApp) -> None:
    """``sagas.run(id)`` with Redis down raises SagaStoreUnavailableError naming host:port, not a
    redis-py error."""
    with pytest.raises(SagaStoreUnavailableError, match=r"127\.0\.0\.1:1\b") as info:
        unreachable.run("order-42")
    assert isinstance(info.value, SagaError)
    assert "cannot be reached" in str(info.value)
    assert info.value.saga_id == "order-42"


def test_unreachable_redis_on_apply_async_raises_store_unavailable(unreachable: SagaApp) -> None:
    """Starting a saga with Redis down raises SagaStoreUnavailableError naming host:port."""
    saga = one_step_saga(unreachable)
    with pytest.raises(SagaStoreUnavailableError, match=r"127\.0\.0\.1:1\b"):
        saga.apply_async()
    with pytest.raises(SagaStoreUnavailableError, match=r"127\.0\.0\.1:1\b"):
        saga.apply_async(saga_id="order-42", params={"a": 1})


def test_saga_app_without_redis_for_state_is_refused() -> None:
    """A non-Redis broker and no ``redis_url`` is refused when the SagaApp is built, naming the
    fix."""
    with pytest.raises(SagaConfigError, match="redis_url"):
        SagaApp(Celery("t", broker="memory://", set_as_current=False))


@pytest.mark.parametrize(("option", "value"), [("lease_ttl", 0), ("retention", "soon")])
def test_bad_saga_app_durations_are_refused_naming_the_option(app: Celery, option: str,
                                                              value: object) -> None:
    """``SagaApp(lease_ttl=..., retention=...)`` must be positive durations."""
    with pytest.raises(SagaConfigError, match=option):
        SagaApp(app, store=MemoryStore(), **{option: value})


# --- step outputs that cannot be stored -------------------------------------------------------


def test_output_over_the_size_limit_fails_the_saga_naming_size_and_limit(app: Celery) -> None:
    """An output over ``max_output_bytes`` fails the attempt (no retry) with OutputTooLargeError
    naming the size and the limit, and the saga rolls back."""
    sagas = SagaApp(app, store=MemoryStore(), max_output_bytes=50)

    @sagas.step(name="bad.big", retries={"limit": 3, "delay": 100})
    def big(n: int) -> str:
        return "x" * n

    big.rollback(noop)
    run = sagas.saga("big", [big.s(100)]).apply_async(saga_id="big-1")

    result = run_first_attempt(sagas, "big-1")

    assert isinstance(result.result, OutputTooLargeError)
    assert isinstance(result.result, StepOutputError)
    state = run.status()
    (attempt,) = state.step("bad.big").attempts
    assert attempt.error is not None and attempt.error.type == "OutputTooLargeError"
    assert "102 bytes" in attempt.error.message
    assert "limit of 50" in attempt.error.message
    assert state.status == "rolling_back"
    assert state.error is not None and state.error.step == "bad.big"
    assert state.step("bad.big").output is None


def test_output_at_the_size_limit_is_stored(app: Celery) -> None:
    """An output of exactly ``max_output_bytes`` of JSON is within the limit."""
    sagas = SagaApp(app, store=MemoryStore(), max_output_bytes=50)

    @sagas.step(name="bad.fits", retries={"limit": 0})
    def fits(n: int) -> str:
        return "x" * n

    run = sagas.saga("fits", [fits.s(48)]).apply_async(saga_id="fits-1")
    run_first_attempt(sagas, "fits-1")
    state = run.status()
    assert state.status == "complete"
    assert state.output == "x" * 48


def test_unserializable_output_fails_the_saga_naming_the_type(sagas: SagaApp) -> None:
    """A step returning something JSON cannot hold fails with OutputNotSerializableError naming
    its type."""
    @sagas.step(name="bad.odd", retries={"limit": 3, "delay": 100})
    def odd() -> object:
        return {1, 2}

    odd.rollback(noop)
    run = sagas.saga("odd", [odd.s()]).apply_async(saga_id="odd-1")

    result = run_first_attempt(sagas, "odd-1")

    assert isinstance(result.result, OutputNotSerializableError)
    (attempt,) = run.status().step("bad.odd").attempts
    assert attempt.error is not None and attempt.error.type == "OutputNotSerializableError"
    assert "set" in attempt.error.message
    assert run.status().status == "rolling_back"


@pytest.mark.parametrize(("output", "error"), [("x" * 100, OutputTooLargeError),
                                               (float("nan"), OutputNotSerializableError),
                                               (object(), OutputNotSerializableError)])
def test_checked_output_refuses_what_the_store_cannot_hold(app: Celery, output: object,
                                                           error: type[Exception]) -> None:
    """The runtime's output check refuses oversize and non-JSON outputs and passes others."""
    sagas = SagaApp(app, store=MemoryStore(), max_output_bytes=50)
    with pytest.raises(error):
        sagas._runtime._checked_output(output)
    assert sagas._runtime._checked_output({"ok": [1, 2]}) == {"ok": [1, 2]}


# --- operations the saga's status forbids -----------------------------------------------------


def test_terminate_on_a_completed_saga_is_refused(sagas: SagaApp) -> None:
    """Terminating a saga that is already terminal raises SagaStateError; its state is kept."""
    run = one_step_saga(sagas).apply_async(saga_id="done-1")
    complete_first_step(sagas, "done-1")
    before = run.status()
    assert before.status == "complete"

    for rollback in (False, True):
        with pytest.raises(SagaStateError, match=r"'done-1' is already complete") as info:
            run.terminate(rollback=rollback)
        assert info.value.saga_id == "done-1"
    assert run.status() == before


def test_terminate_twice_is_refused(sagas: SagaApp) -> None:
    """A terminated saga cannot be terminated again."""
    run = one_step_saga(sagas).apply_async(saga_id="stop-1")
    assert run.terminate().status == "terminated"
    with pytest.raises(SagaStateError, match="already terminated"):
        run.terminate()


@pytest.mark.parametrize("situation", ["running", "complete", "rolled-back"])
def test_retry_rollback_without_a_failed_rollback_is_refused(sagas: SagaApp,
                                                             situation: str) -> None:
    """``retry_rollback()`` unless the rollback outcome is ``failed`` raises SagaStateError."""
    saga = one_step_saga(sagas, rollback=noop)
    run = saga.apply_async(saga_id="r-1")
    key = "bad.one.step#1"
    if situation == "complete":
        complete_first_step(sagas, "r-1")
    elif situation == "rolled-back":
        sagas._engine.handle("r-1", AttemptStarted(kind=Kind.STEP, key=key, attempt=1))
        sagas._engine.handle("r-1", AttemptFailed(kind=Kind.STEP, key=key, attempt=1,
                                                 error=ErrorInfo(type="E", message="m")))
        sagas._engine.handle("r-1", AttemptStarted(kind=Kind.ROLLBACK, key=key, attempt=1))
        sagas._engine.handle("r-1", AttemptSucceeded(kind=Kind.ROLLBACK, key=key, attempt=1))
        assert run.status().rollback is not None
        assert run.status().rollback.outcome == "complete"  # type: ignore[union-attr]
    before = run.status()

    with pytest.raises(SagaStateError, match="only a failed rollback can be retried"):
        run.retry_rollback()
    assert run.status() == before


def test_operations_on_an_unknown_id_raise_not_found(sagas: SagaApp) -> None:
    """A handle on an id that does not exist fails with SagaNotFoundError on its first call."""
    from saga_celery import SagaHandle

    handle = SagaHandle(sagas.reader, sagas._coordinator, "ghost")
    calls: list[Callable[[], object]] = [handle.status, handle.events, handle.terminate,
                                         handle.retry_rollback, lambda: handle.wait(0.01)]
    for call in calls:
        with pytest.raises(SagaNotFoundError, match="'ghost'"):
            call()


@pytest.mark.parametrize(("change", "named"), [
    ({"attempt": "2"}, "'attempt' must be a positive integer, got '2'"),
    ({"count": 0}, "'count' must be a positive integer, got 0"),
    ({"attempt": True}, "'attempt' must be a positive integer, got True"),
    ({"kind": "undo"}, "'kind' must be one of step, rollback, got 'undo'"),
    ({"saga_id": None}, "'saga_id' must be a string, got None"),
    ({"kind": ["step"]}, "'kind' must be a string, got \\['step'\\]"),
    ({"after": 0}, "'after' must be a positive integer or absent, got 0"),
    ({"after": "7"}, "'after' must be a positive integer or absent, got '7'"),
])
def test_a_malformed_saga_control_kwarg_is_named(change: dict[str, Any], named: str) -> None:
    """A hand-made or corrupted ``__saga__`` kwarg fails the task with what is wrong in it."""
    from saga_celery._celery.control import Control, split_control

    good = {"saga_id": "s", "kind": "step", "key": "k#1", "step": "k", "count": 1,
            "attempt": 2, "added_later": "ignored"}
    control, rest = split_control({"__saga__": good, "x": 1})
    assert control == Control(saga_id="s", kind=Kind.STEP, key="k#1", step="k", count=1,
                              attempt=2)
    assert rest == {"x": 1}
    with pytest.raises(SagaError, match=named.replace("(", r"\(")):
        split_control({"__saga__": {**good, **change}})
    with pytest.raises(SagaError, match="must be a dict, got list"):
        split_control({"__saga__": [1]})
    hinted, _ = split_control({"__saga__": {**good, "after": 7}})
    assert hinted.after == 7 and hinted.as_kwarg()["after"] == 7  # type: ignore[union-attr]
    assert "after" not in Control.parse(good).as_kwarg()
