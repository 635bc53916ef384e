"""``saga_celery.otel`` without a worker: derived ids, the ``saga_link`` header, the root span
emitted once at the terminal commit, and the missing extra named.

The real-worker behaviour (one trace across processes) is ``tests/integration/test_otel.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from datetime import datetime
from typing import Any

import pytest
from celery.exceptions import Reject, Retry
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from saga_celery._celery.control import CONTROL_KEY, Control
from saga_celery._celery.definition import sleep_stage, wait_stage
from saga_celery._core.events import EventSent, RedriveRequested, TerminateRequested, WakeUp
from saga_celery._core.model import Kind, OnFailure
from saga_celery._extras import MissingExtraError
from saga_celery.otel import LINK_HEADER, _carry_link, _decode, _SagaTracer, root_span_id, trace_id
from tests.unit.sim import plan
from tests.unit.test_engine import T0, Clock, new_engine, submit, with_waits


@pytest.fixture
def exporter() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield memory, provider
    provider.shutdown()


def test_a_sagas_trace_and_root_span_ids_are_derived_from_its_id() -> None:
    """The same saga id gives the same valid ids in every process; another id, others."""
    assert trace_id("order-42") == trace_id("order-42")
    assert root_span_id("order-42") == root_span_id("order-42")
    assert trace_id("order-42") != trace_id("order-43")
    context = trace.SpanContext(trace_id("order-42"), root_span_id("order-42"), is_remote=True)
    assert context.is_valid


@pytest.mark.parametrize("value", [None, 42, "", "00-zz-11-01", "00-" + "0" * 32 + "-"
                                   + "1" * 16 + "-01", "00-" + "a" * 32 + "-" + "b" * 15 + "-01"])
def test_a_malformed_saga_link_header_is_ignored(value: object) -> None:
    """A header is input: anything but a valid ``traceparent`` value links nothing."""
    assert _decode(value) is None


def control_kwargs(saga_id: str) -> dict[str, Any]:
    control = Control(saga_id=saga_id, kind=Kind.STEP, key="a#1", step="a", count=1, attempt=1)
    return {CONTROL_KEY: control.as_kwarg()}


def test_a_saga_message_published_under_a_span_carries_it(
        exporter: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    """``before_task_publish`` outside a task: the current span goes into ``saga_link``; a
    message that is not a saga's, or sent with no span current, gets nothing."""
    _, provider = exporter
    headers: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    with provider.get_tracer("t").start_as_current_span("checkout") as span:
        _carry_link(body=((), control_kwargs("s-1"), {}), headers=headers)
        _carry_link(body=((), {"x": 1}, {}), headers=plain)
    _carry_link(body=((), control_kwargs("s-1"), {}), headers=(outside := {}))
    _carry_link(body="not a protocol 2 body", headers=(odd := {}))

    assert _decode(headers[LINK_HEADER]) == trace.SpanContext(
        span.get_span_context().trace_id, span.get_span_context().span_id, is_remote=True,
        trace_flags=span.get_span_context().trace_flags)
    assert plain == {} and outside == {} and odd == {}


def test_the_root_span_is_emitted_once_when_the_saga_ends(
        exporter: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    """The engine's ``on_ended`` fires at the commit of the terminal status, not again for a
    later event; the root span has the derived ids, no parent, and the saga's outcome."""
    memory, provider = exporter
    engine, _ = new_engine()
    engine.on_ended = _SagaTracer(provider).ended
    driver = submit(engine, "s-1", plan("a", "b"))
    driver.run("a", 1)
    assert memory.get_finished_spans() == ()
    driver.run("b", 2)
    driver.ok("b", 2)  # a duplicate end: changes nothing, emits nothing

    [root] = memory.get_finished_spans()
    assert (root.context.trace_id, root.context.span_id) == (trace_id("s-1"), root_span_id("s-1"))
    assert root.parent is None
    assert root.name == "saga saga"
    assert dict(root.attributes or {}) == {"saga.id": "s-1", "saga.name": "saga",
                                           "saga.outcome": "complete"}
    assert root.start_time is not None and root.end_time is not None
    assert root.start_time <= root.end_time


def test_spans_the_provider_makes_for_others_keep_random_ids(
        exporter: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    """Only the root is given derived ids: another span of saga_celery's tracer is not."""
    memory, provider = exporter
    tracer = _SagaTracer(provider)
    engine, _ = new_engine()
    engine.on_ended = tracer.ended
    submit(engine, "s-2", plan("a")).run("a", 1)
    tracer.tracer().start_span("other").end()

    root, other = memory.get_finished_spans()
    assert other.context.trace_id != root.context.trace_id
    assert other.context.span_id != root.context.span_id


def step_control(saga_id: str, attempt: int = 1) -> Control:
    return Control(saga_id=saga_id, kind=Kind.STEP, key="a#1", step="a", count=1,
                   attempt=attempt)


@pytest.mark.parametrize(("raised", "outcome", "error"), [
    (None, "succeeded", None),
    (ValueError("no stock"), "failed", "ValueError"),
    (Retry("retry", exc=KeyError("sku")), "failed", "KeyError"),
    (Reject("store down", requeue=True), "handed_back", "Reject"),
])
def test_an_attempt_span_is_a_child_of_the_root_with_its_outcome(
        exporter: tuple[InMemorySpanExporter, TracerProvider], raised: Exception | None,
        outcome: str, error: str | None) -> None:
    """The span around an attempt has the root's derived ids as parent, the attempt's
    attributes, and its outcome from how the attempt ended (Celery's ``Retry``: the failure
    it carries; ``Reject``: handed back); the exception goes on through."""
    memory, provider = exporter
    engine, _ = new_engine()
    submit(engine, "s-4", plan("a"))
    run = engine.load("s-4").run

    expected = pytest.raises(type(raised)) if raised else nullcontext()
    with expected, _SagaTracer(provider).attempt(step_control("s-4"), run):
        assert trace.get_current_span().get_span_context().trace_id == trace_id("s-4")
        if raised is not None:
            raise raised

    [span] = memory.get_finished_spans()
    assert span.name == "saga.step a"
    assert span.parent is not None
    assert (span.parent.trace_id, span.parent.span_id) == (trace_id("s-4"), root_span_id("s-4"))
    attributes = dict(span.attributes or {})
    assert attributes.pop("saga.error.type", None) == error
    assert attributes == {"saga.id": "s-4", "saga.name": "saga", "saga.step": "a",
                          "saga.count": 1, "saga.attempt": 1, "saga.kind": "step",
                          "saga.outcome": outcome}
    assert (span.status.status_code == trace.StatusCode.ERROR) == (error is not None)


def test_the_root_span_waits_for_the_attempt_that_ended_the_saga(
        exporter: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    """A saga that ends inside an attempt's span gets its root once that span has ended, so
    the root encloses every attempt."""
    memory, provider = exporter
    tracer = _SagaTracer(provider)
    engine, _ = new_engine()
    engine.on_ended = tracer.ended
    driver = submit(engine, "s-5", plan("a"))
    run = engine.load("s-5").run

    with tracer.attempt(step_control("s-5"), run):
        driver.start("a")
        driver.ok("a", 1)
        assert memory.get_finished_spans() == ()

    attempt, root = memory.get_finished_spans()
    assert root.name == "saga saga" and attempt.name == "saga.step a"
    assert root.end_time is not None and attempt.end_time is not None
    assert root.end_time >= attempt.end_time


def test_a_provider_other_than_the_sdks_gets_no_span_and_no_error() -> None:
    """With a provider that is not the SDK's (here the API's no-op one) attempts and ends run
    as without tracing: nothing can be given the derived ids, nothing fails."""
    tracer = _SagaTracer(trace.NoOpTracerProvider())
    engine, _ = new_engine()
    engine.on_ended = tracer.ended
    driver = submit(engine, "s-6", plan("a"))

    with tracer.attempt(step_control("s-6"), engine.load("s-6").run):
        driver.start("a")
        transition = driver.ok("a", 1)

    assert transition.run.status == "complete"
    assert not tracer.tracer().start_span("x").get_span_context().is_valid


def test_an_observer_that_raises_does_not_undo_the_commit() -> None:
    """The terminal commit stands and returns its transition even if the hook fails."""
    engine, _ = new_engine()

    def broken(_: object) -> None:
        raise RuntimeError("exporter down")

    engine.on_ended = broken
    driver = submit(engine, "s-3", plan("a"))
    driver.start("a")
    transition = driver.ok("a", 1)

    assert transition.run.status == "complete"
    assert engine.load("s-3").run.status == "complete"


def test_saga_celery_otel_without_the_sdk_names_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``import saga_celery.otel`` without OpenTelemetry raises ``MissingExtraError`` saying
    to install ``saga-celery[otel]``."""
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "saga_celery.otel", raising=False)

    with pytest.raises(MissingExtraError) as raised:
        import saga_celery.otel  # noqa: F401

    assert raised.value.extra == "otel"
    assert str(raised.value) == ("saga_celery.otel needs opentelemetry-sdk, which is not "
                                 "installed: pip install 'saga-celery[otel]'")


def test_importing_the_library_does_not_turn_tracing_on() -> None:
    """Tracing costs nothing unless asked for: ``import saga_celery`` (and its command) does
    not load ``saga_celery.otel``, and a ``SagaApp`` observes no attempt and no end.  (redis-py
    itself may import OpenTelemetry when it is installed: its own, separate, observability.)"""
    probe = ("import json, sys, saga_celery, saga_celery.cli; from celery import Celery; "
             "s = saga_celery.SagaApp(Celery(broker='redis://127.0.0.1:1/0')); "
             "print(json.dumps(['saga_celery.otel' in sys.modules, "
             "s._runtime.observe_attempt is None, s._engine.on_ended is None]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=False)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [False, True, True]


def ns(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000_000)


def children(memory: InMemorySpanExporter, saga_id: str) -> tuple[Any, list[Any]]:
    """The saga's root span and its other spans, in the order they start."""
    spans = [s for s in memory.get_finished_spans()
             if (s.attributes or {}).get("saga.id") == saga_id]
    [root] = [s for s in spans if s.parent is None]
    rest = sorted((s for s in spans if s.parent is not None), key=lambda s: s.start_time)
    assert all(s.parent.span_id == root_span_id(saga_id) for s in rest)
    assert all(s.context.trace_id == trace_id(saga_id) for s in rest)
    return root, rest


def test_a_sleep_and_a_wait_are_child_spans_with_their_recorded_times(
        exporter: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    """At the saga's end, each sleep and wait entry becomes a child span of the root from its
    recorded start to its recorded end, with the stage's attributes and outcome, and the wait
    an ``event_received`` event where the event ended it."""
    memory, provider = exporter
    clock = Clock()
    engine, _ = new_engine(clock)
    engine.on_ended = _SagaTracer(provider).ended
    driver = submit(engine, "s-7", with_waits(plan("a"), sleep_stage("60 seconds", "nap"),
                                              wait_stage("ok", "1 hour", None)))
    driver.run("a", "A")
    clock.advance(60)
    driver.feed(WakeUp(key="nap#1"))
    clock.advance(5)
    driver.feed(EventSent(event_type="ok", payload={"by": "ann"}))

    root, (nap, wait) = children(memory, "s-7")
    state = engine.load("s-7").run
    for span, key in ((nap, "nap#1"), (wait, "wait:ok#1")):
        [record] = state.steps[key].attempts
        assert (span.start_time, span.end_time) == (ns(record.started_at),
                                                    ns(record.ended_at or T0))
    assert nap.end_time - nap.start_time == 60 * 10**9
    assert wait.end_time - wait.start_time == 5 * 10**9
    assert nap.name == "saga.sleep nap" and wait.name == "saga.wait wait:ok"
    assert dict(nap.attributes or {}) == {
        "saga.id": "s-7", "saga.name": "saga", "saga.step": "nap", "saga.count": 1,
        "saga.attempt": 1, "saga.kind": "sleep", "saga.outcome": "completed"}
    assert dict(wait.attributes or {}) == {
        "saga.id": "s-7", "saga.name": "saga", "saga.step": "wait:ok", "saga.count": 1,
        "saga.attempt": 1, "saga.kind": "wait", "saga.outcome": "completed",
        "saga.event_type": "ok"}
    [received] = wait.events
    assert (received.name, received.timestamp) == ("event_received", wait.end_time)
    assert root.start_time <= nap.start_time and root.end_time >= wait.end_time


def test_a_wait_that_timed_out_is_a_failed_span_and_a_cancelled_sleep_says_so(
        exporter: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    """A wait whose timeout passed first: outcome ``timed_out``, the ``EventTimeoutError``,
    ERROR status; a sleep cut short by ``terminate``: outcome ``cancelled``."""
    memory, provider = exporter
    clock = Clock()
    engine, _ = new_engine(clock)
    engine.on_ended = _SagaTracer(provider).ended
    late = submit(engine, "s-8", with_waits(plan("a"), wait_stage("ok", "2 seconds", None)))
    late.run("a", "A")
    clock.advance(2)
    late.feed(WakeUp(key="wait:ok#1"))
    late.start("a", 1, Kind.ROLLBACK)
    late.ok("a", None, 1, Kind.ROLLBACK)
    stopped = submit(engine, "s-9", with_waits(plan("a"), sleep_stage("60 seconds", "nap")))
    stopped.run("a", "A")
    stopped.feed(TerminateRequested(rollback=False, reason="customer left"))

    root, [wait] = children(memory, "s-8")
    assert root.attributes is not None and root.attributes["saga.outcome"] == "errored"
    assert wait.attributes is not None
    assert (wait.attributes["saga.outcome"], wait.attributes["saga.error.type"]) == (
        "timed_out", "EventTimeoutError")
    assert wait.status.status_code == trace.StatusCode.ERROR and wait.events == ()
    assert wait.end_time - wait.start_time == 2 * 10**9
    _, [nap] = children(memory, "s-9")
    assert nap.attributes is not None and nap.attributes["saga.outcome"] == "cancelled"


def test_each_time_a_saga_stood_held_is_a_span_until_what_released_it(
        exporter: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    """A held saga redriven to completion: a ``saga.hold`` child span from ``saga_held`` to
    ``saga_redriven`` (read from the saga's events), with the failure that held it."""
    memory, provider = exporter
    clock = Clock()
    engine, store = new_engine(clock)
    engine.on_ended = _SagaTracer(provider, events=lambda saga_id: [
        event for _, event in store.read_events(saga_id)]).ended
    driver = submit(engine, "s-10", plan("a").model_copy(update={"on_failure": OnFailure.HOLD}))
    driver.start("a")
    clock.advance(1)
    assert driver.fail("a", retryable=False).run.status == "held"
    clock.advance(30)
    driver.feed(RedriveRequested())
    driver.start("a", 2)
    driver.ok("a", "A", 2)

    root, spans = children(memory, "s-10")
    [hold] = [s for s in spans if s.name == "saga.hold"]
    assert hold.start_time == ns(T0) + 1 * 10**9
    assert hold.end_time == ns(T0) + 31 * 10**9
    assert dict(hold.attributes or {}) == {
        "saga.id": "s-10", "saga.name": "saga", "saga.kind": "hold",
        "saga.outcome": "redriven", "saga.error": "RuntimeError: boom"}
    assert root.attributes is not None and root.attributes["saga.outcome"] == "complete"
