"""One OpenTelemetry trace per saga (SPEC section 10) on a real prefork worker and real Redis.

The worker runs ``otel_app`` (the shop with ``saga_celery.otel`` on), which writes every span
it ends to a JSON-lines file; the test is the caller, with the SDK's ``InMemorySpanExporter``
and a span of its own (``checkout``) current around ``apply_async``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from saga_celery.otel import instrument, root_span_id, trace_id, uninstrument
from tests.integration.harness import WorkerFactory, WorkerProcess
from tests.integration.shop_fixtures import import_shop_copy, wait_for

pytestmark = pytest.mark.integration

OTEL_APP = "tests.integration.otel_app"
RESERVE, CHARGE, TICKET = "shop.reserve", "shop.charge", "shop.ticket"
Span = dict[str, Any]


class Caller:
    """The test's side: the shop's client with its own provider and in-memory exporter."""

    def __init__(self, shop: ModuleType) -> None:
        self.shop = shop
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("checkout-service")

    def spans(self) -> list[Any]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture
def spans_file(tmp_path: Path) -> Path:
    return tmp_path / "spans.jsonl"


@pytest.fixture
def otel_env(shop_env: dict[str, str], spans_file: Path) -> dict[str, str]:
    return {**shop_env, "SAGA_TEST_OTEL_FILE": str(spans_file)}


@pytest.fixture
def caller(otel_env: dict[str, str]) -> Iterator[Caller]:
    """A copy of the shop module in this process, instrumented with an in-memory exporter."""
    shop = import_shop_copy(otel_env, f"otel_{uuid.uuid4().hex[:6]}")
    caller = Caller(shop)
    instrument(shop.sagas, tracer_provider=caller.provider)
    yield caller
    uninstrument(shop.sagas)
    caller.provider.shutdown()


def worker_spans(path: Path) -> list[Span]:
    """The spans the worker has written so far (a line still being written is left out)."""
    if not path.exists():
        return []
    *complete, _partial = path.read_text().split("\n")
    return [json.loads(line) for line in complete if line]


def saga_spans(path: Path, saga_id: str) -> tuple[Span, list[Span]]:
    """The saga's root span (waited for: it is ended after the last attempt's) and its
    attempt spans in start order."""
    def root() -> list[Span]:
        return [s for s in worker_spans(path)
                if s["attributes"].get("saga.id") == saga_id and s["parent_id"] is None]

    wait_for(lambda: bool(root()), timeout=20)
    [found] = root()
    attempts = [s for s in worker_spans(path)
                if s["attributes"].get("saga.id") == saga_id and s["parent_id"] is not None]
    return found, sorted(attempts, key=lambda s: s["start"])


def hex_ids(saga_id: str) -> tuple[str, str]:
    return f"{trace_id(saga_id):032x}", f"{root_span_id(saga_id):016x}"


def attempts_in(state: Any) -> list[tuple[str, str, int]]:
    """Every (kind, step, attempt) the saga's state records, steps then rollbacks."""
    runs = [("step", s.name, a.attempt) for s in state.steps for a in s.attempts]
    undos = [("rollback", s.name, a.attempt) for s in state.steps if s.rollback
             for a in s.rollback.attempts]
    return runs + undos


def start_under_checkout(caller: Caller, saga: Any, saga_id: str, **options: Any
                         ) -> tuple[Any, Any]:
    with caller.tracer.start_as_current_span("checkout") as checkout:
        run = saga.apply_async(saga_id=saga_id, **options)
    return run.wait(timeout=60), checkout.get_span_context()


def assert_one_saga_trace(root: Span, attempts: list[Span], saga_id: str, name: str,
                          checkout: Any) -> None:
    """The root and every attempt span share the saga's trace; the root is the attempts'
    parent, encloses them, and links the caller's span (``checkout``; None: no link)."""
    trace_hex, root_hex = hex_ids(saga_id)
    assert {s["trace_id"] for s in [root, *attempts]} == {trace_hex}
    assert (root["name"], root["span_id"]) == (f"saga {name}", root_hex)
    assert root["attributes"]["saga.name"] == name
    assert root["links"] == ([] if checkout is None else [
        {"trace_id": f"{checkout.trace_id:032x}", "span_id": f"{checkout.span_id:016x}"}])
    assert all(s["parent_id"] == root_hex for s in attempts)
    assert root["start"] <= attempts[0]["start"]
    assert root["end"] >= max(s["end"] for s in attempts)
    for s in attempts:
        attrs = s["attributes"]
        assert attrs["saga.id"] == saga_id and attrs["saga.name"] == name
        assert attrs["saga.count"] == 1
        assert s["name"] == f"saga.{attrs['saga.kind']} {attrs['saga.step']}"


def test_a_completed_saga_is_one_trace_with_a_span_per_attempt(
        worker_factory: WorkerFactory, otel_env: dict[str, str], caller: Caller,
        spans_file: Path) -> None:
    """Every task of a saga that ran reports into one trace: a root span from creation to
    completion linked from the caller's span, and one child span per step attempt."""
    saga_id = f"t-{uuid.uuid4().hex[:12]}"
    worker_factory(OTEL_APP, env=otel_env, concurrency=2)

    state, checkout = start_under_checkout(caller, caller.shop.order, saga_id)

    assert state.status == "complete"
    root, attempts = saga_spans(spans_file, saga_id)
    assert_one_saga_trace(root, attempts, saga_id, "order", checkout)
    assert root["attributes"]["saga.outcome"] == "complete"
    assert root["status"] == "UNSET"
    assert [(s["attributes"]["saga.step"], s["attributes"]["saga.attempt"],
             s["attributes"]["saga.outcome"]) for s in attempts] == [
        (RESERVE, 1, "succeeded"), (CHARGE, 1, "succeeded"), (TICKET, 1, "succeeded")]
    assert [("step", *key[1:]) for key in attempts_in(state)] == [
        (s["attributes"]["saga.kind"], s["attributes"]["saga.step"],
         s["attributes"]["saga.attempt"]) for s in attempts]
    assert [s.name for s in caller.spans()] == ["checkout"]  # the link's target was exported


def test_a_rolled_back_saga_has_its_failed_attempts_and_rollback_spans(
        worker_factory: WorkerFactory, otel_env: dict[str, str], caller: Caller,
        spans_file: Path) -> None:
    """A failing step's attempts are spans with their outcome and error, and each rollback
    attempt is a span, in the order the rollback ran; the root says the saga errored."""
    saga_id = f"t-{uuid.uuid4().hex[:12]}"
    worker_factory(OTEL_APP, env=otel_env, concurrency=2)

    state, checkout = start_under_checkout(caller, caller.shop.order, saga_id,
                                           params={"fail": {TICKET: "always"}})

    assert state.status == "errored"
    root, attempts = saga_spans(spans_file, saga_id)
    assert_one_saga_trace(root, attempts, saga_id, "order", checkout)
    assert root["attributes"]["saga.outcome"] == "errored"
    assert root["attributes"]["saga.error.type"] == "RuntimeError"
    assert root["attributes"]["saga.error.step"] == TICKET
    assert root["status"] == "ERROR"
    summary = [(s["attributes"]["saga.kind"], s["attributes"]["saga.step"],
                s["attributes"]["saga.attempt"], s["attributes"]["saga.outcome"])
               for s in attempts]
    assert summary == [
        ("step", RESERVE, 1, "succeeded"), ("step", CHARGE, 1, "succeeded"),
        ("step", TICKET, 1, "failed"), ("step", TICKET, 2, "failed"),
        ("step", TICKET, 3, "failed"),
        ("rollback", TICKET, 1, "succeeded"), ("rollback", CHARGE, 1, "succeeded"),
        ("rollback", RESERVE, 1, "succeeded")]
    assert sorted(attempts_in(state)) == sorted(s[:3] for s in summary)
    failed = [s for s in attempts if s["attributes"]["saga.outcome"] != "succeeded"]
    assert all(s["status"] == "ERROR" and s["attributes"]["saga.error.type"] == "RuntimeError"
               and s["events"] == ["exception"] for s in failed)


def test_the_saga_trace_lives_beside_celerys_own_instrumentation(
        worker_factory: WorkerFactory, otel_env: dict[str, str], caller: Caller,
        spans_file: Path) -> None:
    """With opentelemetry-instrumentation-celery in the caller and the worker, its spans and
    propagation go on (the first task's ``run`` span is a child of the caller's publish span)
    while the saga is still one trace, each attempt span linking the ``run`` span around it."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    saga_id = f"t-{uuid.uuid4().hex[:12]}"
    worker_factory(OTEL_APP, env={**otel_env, "SAGA_TEST_OTEL_CELERY": "1"}, concurrency=2)
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=caller.provider)
    try:
        state, checkout = start_under_checkout(caller, caller.shop.order, saga_id)
    finally:
        instrumentor.uninstrument()

    assert state.status == "complete"
    root, attempts = saga_spans(spans_file, saga_id)
    assert_one_saga_trace(root, attempts, saga_id, "order", checkout)
    assert len(attempts) == 3
    runs = {s["span_id"]: s for s in worker_spans(spans_file) if s["name"].startswith("run/")}
    for attempt in attempts:
        [link] = attempt["links"]
        assert runs[link["span_id"]]["name"] == f"run/{attempt['attributes']['saga.step']}"
    [publish] = [s for s in caller.spans() if s.name == f"apply_async/{RESERVE}"]
    assert publish.parent is not None and publish.parent.span_id == checkout.span_id
    [first_run] = [s for s in runs.values() if s["name"] == f"run/{RESERVE}"]
    assert first_run["trace_id"] == f"{checkout.trace_id:032x}"
    assert first_run["parent_id"] == f"{publish.context.span_id:016x}"
    # A later step's message is published inside the attempt span that ended the step
    # before it, so Celery's spans for it continue the saga's trace under that attempt.
    by_id = {s["span_id"]: s for s in worker_spans(spans_file)}
    for step, sender in ((CHARGE, attempts[0]), (TICKET, attempts[1])):
        [later] = [s for s in runs.values() if s["name"] == f"run/{step}"]
        published = by_id[later["parent_id"]]
        assert published["name"] == f"apply_async/{step}"
        assert published["parent_id"] == sender["span_id"]
        assert later["trace_id"] == hex_ids(saga_id)[0]


def test_a_worker_without_instrument_emits_no_saga_span(
        worker_factory: WorkerFactory, shop_env: dict[str, str], caller: Caller,
        shop_worker: WorkerProcess) -> None:
    """Tracing is on only where ``instrument`` was called: the plain shop worker runs the
    saga, and only the caller's own span exists."""
    saga_id = f"t-{uuid.uuid4().hex[:12]}"

    state, _ = start_under_checkout(caller, caller.shop.order, saga_id)

    assert state.status == "complete"
    assert [s.name for s in caller.spans()] == ["checkout"]


def waiting_sagas(shop: ModuleType) -> tuple[Any, Any]:
    """Two sagas of the shop that wait: a 2 s sleep then a wait for ``approval`` (sent by the
    test), and a wait for ``approval`` that nobody sends within its 2 s timeout."""
    sagas = shop.sagas
    approved = sagas.saga("otel-approved", [
        shop.reserve.s("sku-1", 1), sagas.sleep("2 seconds", name="cool-off"),
        sagas.wait_for_event("approval", timeout="60 seconds"), shop.ticket.s()])
    unanswered = sagas.saga("otel-unanswered", [
        shop.reserve.s("sku-1", 1), sagas.wait_for_event("approval", timeout="2 seconds")])
    return approved, unanswered


def ns(when: Any) -> int:
    return int(when.timestamp() * 1_000_000_000)


def test_a_sleep_and_a_wait_are_spans_of_the_sagas_trace(
        worker_factory: WorkerFactory, otel_env: dict[str, str], caller: Caller,
        spans_file: Path) -> None:
    """A saga that sleeps 2 s and then waits for an event the caller sends has a sleep span
    and a wait span in its one trace, children of the root, from the times its state records,
    in the order they ran between the steps around them; the wait says the event came.  The
    root links the span that sent the event, the saga's last resumption from outside."""
    saga_id = f"t-{uuid.uuid4().hex[:12]}"
    approved, _ = waiting_sagas(caller.shop)
    worker_factory(OTEL_APP, env=otel_env, concurrency=2)

    with caller.tracer.start_as_current_span("checkout") as checkout:
        run = approved.apply_async(saga_id=saga_id)
    wait_for(lambda: run.status().step("wait:approval").status == "running", timeout=30)
    with caller.tracer.start_as_current_span("approve") as approve:
        run.send_event("approval", payload={"by": "ann"})
    state = run.wait(timeout=60)

    assert state.status == "complete"
    root, children = saga_spans(spans_file, saga_id)
    assert_one_saga_trace(root, children, saga_id, "otel-approved", approve.get_span_context())
    assert checkout.get_span_context().is_valid
    assert [(s["attributes"]["saga.kind"], s["attributes"]["saga.step"],
             s["attributes"]["saga.outcome"]) for s in children] == [
        ("step", RESERVE, "succeeded"), ("sleep", "cool-off", "completed"),
        ("wait", "wait:approval", "completed"), ("step", TICKET, "succeeded")]
    _, sleep, wait, _ = children
    for span, entry in ((sleep, state.step("cool-off")), (wait, state.step("wait:approval"))):
        [record] = entry.attempts
        assert record.ended_at is not None
        assert abs(span["start"] - ns(record.started_at)) < 1000
        assert abs(span["end"] - ns(record.ended_at)) < 1000
        assert span["status"] == "UNSET"
    assert 2.0 <= (sleep["end"] - sleep["start"]) / 1e9 < 30  # fired within the timer's bound
    assert sleep["end"] <= wait["start"] and wait["end"] <= children[3]["start"]
    assert wait["attributes"]["saga.event_type"] == "approval"
    assert (sleep["events"], wait["events"]) == ([], ["event_received"])


def test_a_wait_that_times_out_is_a_span_with_outcome_timed_out(
        worker_factory: WorkerFactory, otel_env: dict[str, str], caller: Caller,
        spans_file: Path) -> None:
    """A wait nobody answers within its timeout: its span says ``timed_out`` with the
    ``EventTimeoutError``, and the rollback that followed is in the same trace after it.  A
    timer resumed the saga, so its root links no caller's span."""
    saga_id = f"t-{uuid.uuid4().hex[:12]}"
    _, unanswered = waiting_sagas(caller.shop)
    worker_factory(OTEL_APP, env=otel_env, concurrency=2)

    state, _ = start_under_checkout(caller, unanswered, saga_id)

    assert state.status == "errored" and state.error is not None
    assert state.error.type == "EventTimeoutError"
    root, children = saga_spans(spans_file, saga_id)
    assert_one_saga_trace(root, children, saga_id, "otel-unanswered", None)
    assert [(s["attributes"]["saga.kind"], s["attributes"]["saga.step"],
             s["attributes"]["saga.outcome"]) for s in children] == [
        ("step", RESERVE, "succeeded"), ("wait", "wait:approval", "timed_out"),
        ("rollback", RESERVE, "succeeded")]
    wait = children[1]
    assert wait["attributes"]["saga.error.type"] == "EventTimeoutError"
    assert wait["status"] == "ERROR" and wait["events"] == []
    assert 2.0 <= (wait["end"] - wait["start"]) / 1e9 < 30


def test_a_held_period_is_a_span_until_the_rollback_that_ended_it(
        worker_factory: WorkerFactory, otel_env: dict[str, str], caller: Caller,
        spans_file: Path) -> None:
    """A saga held by a step that failed for good, then rolled back by ``run.rollback()``: a
    ``saga.hold`` child span of the root runs from the ``saga_held`` event to the
    ``rollback_started`` one, says ``rolled_back`` and what held it, and sits between the
    failed attempt and the rollback's attempts."""
    saga_id = f"t-{uuid.uuid4().hex[:12]}"
    held = caller.shop.sagas.saga("otel-held", [caller.shop.reserve.s("sku-1", 1),
                                                caller.shop.ticket.s()], on_failure="hold")
    worker_factory(OTEL_APP, env=otel_env, concurrency=2)

    run = held.apply_async(saga_id=saga_id, params={"fail": {TICKET: "nonretryable"}})
    wait_for(lambda: run.status().status == "held", timeout=30)
    time.sleep(1)  # a held period the span's times can tell apart from an instant
    run.rollback()
    state = run.wait(timeout=60)

    assert state.status == "errored"
    root, children = saga_spans(spans_file, saga_id)
    [hold] = [s for s in children if s["name"] == "saga.hold"]
    assert_one_saga_trace(root, [s for s in children if s is not hold], saga_id, "otel-held",
                          None)
    assert (hold["trace_id"], hold["parent_id"]) == hex_ids(saga_id)
    assert hold["attributes"]["saga.kind"] == "hold"
    events = {e["type"]: e["timestamp"] for e in run.events()}
    assert hold["attributes"]["saga.outcome"] == "rolled_back"
    assert hold["attributes"]["saga.error"].startswith("NonRetryableError")
    assert abs(hold["start"] - ns(datetime.fromisoformat(events["saga_held"]))) < 1000
    assert abs(hold["end"] - ns(datetime.fromisoformat(events["rollback_started"]))) < 1000
    assert hold["end"] - hold["start"] >= 1e9
    [failed] = [s for s in children if s["attributes"].get("saga.outcome") == "failed"]
    undos = [s for s in children if s["attributes"]["saga.kind"] == "rollback"]
    # the held status is committed inside the failed attempt's span, which ends just after
    assert undos and failed["start"] <= hold["start"] <= failed["end"]
    assert all(hold["end"] <= s["start"] for s in undos)
