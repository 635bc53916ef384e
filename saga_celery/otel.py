"""One OpenTelemetry trace per saga (SPEC section 10), from the ``saga-celery[otel]`` extra.

    from saga_celery.otel import instrument
    instrument(sagas)        # where the SagaApp is built: the worker and the caller import it

Each saga is one trace:

- **the root span** ``saga <name>`` runs from the saga's creation (``apply_async``) to its
  terminal status, with ``saga.id``, ``saga.name`` and ``saga.outcome`` (the status:
  ``complete``, ``errored``, ``terminated``), and a ``Link`` to the span that was current
  where ``apply_async`` was called (the caller's span);
- **a child span per attempt** ``saga.<kind> <step>`` (``saga.step charge``,
  ``saga.rollback charge``; any other kind of attempt the runtime runs gets one the same
  way), around the step's body in the worker, with ``saga.id``, ``saga.name``,
  ``saga.step``, ``saga.count``, ``saga.attempt``, ``saga.kind`` and ``saga.outcome``
  (``succeeded``; ``failed``, whether or not a retry follows: the retry is the next attempt's
  span; ``handed_back``: the store or broker could not be reached, the message comes again),
  and the error's type, recorded exception and ERROR status when it failed.  It is the
  current span while the body runs, so the spans a step's own code makes (an HTTP call, a
  query) are its children;
- **a child span per sleep and wait** ``saga.sleep <name>``, ``saga.wait <name>`` (SPEC
  section 8), from the times the state records, with the same attributes and ``saga.outcome``
  ``completed``, ``timed_out`` or ``cancelled`` (an ``event_received`` span event where the
  event ended the wait), and **a** ``saga.hold`` **span per held period** (``redriven``,
  ``rolled_back``, ``terminated``), read from the saga's events.  A waiting stage runs no
  task, so these are emitted with the root.

How, when the root span's start and end happen in different processes:

- The trace id and the root span id are **derived from the saga id** (SHA-256), so every
  process knows them without reading or storing anything: a worker makes each attempt span
  a child of the root by id alone, a message the recovery sweep re-sends lands in the same
  trace, and ``trace_id(saga_id)`` tells a user which trace to open.  Nothing is added to
  stored saga state.
- The root span is emitted once, by the process that commits the terminal status (the
  engine's ``on_ended`` hook), with an explicit start time (``created_at``) and end time,
  after the attempt span that ended the saga (so the root encloses it).  To give the root
  its derived span id, this module's own SDK tracer gets an id generator that hands out the
  derived ids while, and only while, the root is being started; every other id comes from
  the provider's own generator.
- The caller's span travels in a message header of its own, ``saga_link`` (a W3C
  ``traceparent`` value), set by a ``before_task_publish`` handler and copied from message to
  message by the saga's own tasks; ``traceparent`` is left to Celery's instrumentation
  (``opentelemetry-instrumentation-celery``), which goes on working beside this: its
  ``run/<task>`` span is linked from the attempt span it encloses.

Cost when not instrumented: none on the step path (the runtime checks one attribute per
delivery; no signal handler is connected).  Limits: a message the recovery sweep re-sends
carries no ``saga_link``, so a saga that ends after such a re-send has no link on its root;
after a timer (sleep, wait or hold timeout) the link is gone too, and after ``send_event`` or
``redrive()`` it is the span current there;
an attempt whose pool process is killed (hard time limit, OOM) has no span, its failure is
still on the root; head sampling is by the derived trace id for the root only (attempt
spans are always sampled): use ``ParentBased(ALWAYS_ON)`` or tail sampling.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import structlog
from celery import current_task, signals
from celery.exceptions import Reject, Retry

from saga_celery._celery.app import RECOVER_TASK, SagaApp
from saga_celery._celery.control import Control
from saga_celery._celery.runtime import control_of
from saga_celery._core.model import SagaRun, SagaStatus, StepRun, StepStatus, WaitKind, WaitSpec
from saga_celery._extras import MissingExtraError
from saga_celery.dashboard.fields import held_periods

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.sdk.trace import Tracer as SdkTracer
    from opentelemetry.sdk.trace.id_generator import IdGenerator
except ImportError as exc:
    raise MissingExtraError("otel", "opentelemetry-sdk", needed_by="saga_celery.otel") from exc

__all__ = ["LINK_HEADER", "instrument", "root_span_id", "trace_id", "uninstrument"]

LINK_HEADER = "saga_link"
"""The message header that carries the span that started the saga (``traceparent`` form)."""

log = structlog.get_logger("saga_celery")
_forced_ids: ContextVar[tuple[int, int] | None] = ContextVar("saga_celery_otel_ids", default=None)
_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)


def _digest(saga_id: str) -> bytes:
    return hashlib.sha256(f"saga_celery/{saga_id}".encode()).digest()


def trace_id(saga_id: str) -> int:
    """The trace id of a saga's trace (``format(trace_id(id), "032x")`` is its hex form)."""
    return int.from_bytes(_digest(saga_id)[:16], "big") or 1


def root_span_id(saga_id: str) -> int:
    """The span id of a saga's root span."""
    return int.from_bytes(_digest(saga_id)[16:24], "big") or 1


def _root_context(saga_id: str) -> trace.SpanContext:
    return trace.SpanContext(trace_id(saga_id), root_span_id(saga_id), is_remote=True,
                             trace_flags=_SAMPLED)


# --- the caller's span, from message to message ----------------------------------------

def _encode(span: trace.SpanContext) -> str:
    return f"00-{span.trace_id:032x}-{span.span_id:016x}-{int(span.trace_flags):02x}"


def _decode(value: object) -> trace.SpanContext | None:
    """A ``saga_link`` header's span; None for anything else (a header is input)."""
    parts = value.split("-") if isinstance(value, str) else []
    if len(parts) != 4 or (len(parts[1]), len(parts[2]), len(parts[3])) != (32, 16, 2):
        return None
    try:
        ids = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    span = trace.SpanContext(ids[0], ids[1], is_remote=True, trace_flags=trace.TraceFlags(ids[2]))
    return span if span.is_valid else None


def _running_request() -> Any:
    """The request of the task this thread runs, or None outside a task."""
    return current_task.request if current_task else None


def _link_for(saga_id: str) -> str | None:
    """What a message of saga ``saga_id`` carries as ``saga_link``: the running saga task's
    own (a message of its saga), else the current span (a saga started here)."""
    request = _running_request()
    if request is not None:
        running = control_of(getattr(request, "kwargs", None))
        if running is not None and running.saga_id == saga_id:
            value = getattr(request, LINK_HEADER, None)
            return value if _decode(value) is not None else None
        if getattr(request, "task", None) == RECOVER_TASK:
            return None
    span = trace.get_current_span().get_span_context()
    return _encode(span) if span.is_valid else None


def _carry_link(sender: object = None, body: object = None,
                headers: dict[str, Any] | None = None, **_: Any) -> None:
    """``before_task_publish``: put ``saga_link`` on a saga message (protocol 2 body)."""
    if headers is None or not isinstance(body, tuple | list) or len(body) < 2:
        return
    control = control_of(body[1] if isinstance(body[1], dict) else None)
    if control is None:
        return
    link = _link_for(control.saga_id)
    if link is not None:
        headers[LINK_HEADER] = link


# --- spans ----------------------------------------------------------------------------

class _DerivedIds(IdGenerator):
    """The provider's id generator, except while a root span is started (``_forced_ids``)."""

    def __init__(self, inner: IdGenerator) -> None:
        self.inner = inner

    def generate_span_id(self) -> int:
        forced = _forced_ids.get()
        return forced[1] if forced else self.inner.generate_span_id()

    def generate_trace_id(self) -> int:
        forced = _forced_ids.get()
        return forced[0] if forced else self.inner.generate_trace_id()

    def is_trace_id_random(self) -> bool:  # asked by SDK releases that have it
        return _forced_ids.get() is None and bool(getattr(self.inner, "is_trace_id_random",
                                                          lambda: True)())


class _SagaTracer:
    """Makes a saga's spans in one process: attempts (``attempt``), the root (``ended``)."""

    def __init__(self, provider: trace.TracerProvider | None,
                 events: Callable[[str], Iterable[Mapping[str, Any]]] | None = None) -> None:
        self._provider = provider
        self._events = events
        """A saga's events, oldest first (for its held periods); None: no hold spans."""
        self._tracer: trace.Tracer | None = None
        self._local = threading.local()

    def tracer(self) -> trace.Tracer:
        """This module's tracer, from the provider given, else the global one: looked up
        again until it is the SDK's (a worker may set it up after ``instrument``)."""
        if self._tracer is not None:
            return self._tracer
        provider = self._provider or trace.get_tracer_provider()
        tracer = provider.get_tracer("saga_celery")
        if isinstance(tracer, SdkTracer):
            tracer.id_generator = _DerivedIds(tracer.id_generator)
            self._tracer = tracer
        elif self._provider is not None:
            log.warning("saga.otel_no_sdk", provider=type(provider).__name__,
                        detail="saga root spans need the OpenTelemetry SDK's TracerProvider")
            self._tracer = tracer
        return tracer

    @contextmanager
    def attempt(self, control: Control, run: SagaRun) -> Iterator[None]:
        """The span of one attempt, current while it runs; its outcome from how it ends."""
        self._local.open = getattr(self._local, "open", 0) + 1
        try:
            span = self._start_attempt(control, run)
        except Exception as exc:  # a span is never worth an attempt
            log.warning("saga.otel_span_failed", saga_id=run.id, step=control.step,
                        attempt=control.attempt, error=repr(exc))
            span = trace.INVALID_SPAN
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield
        except Retry as exc:  # Celery's retry of a failed attempt: the failure is the cause
            _failed(span, "failed", exc.exc if isinstance(exc.exc, BaseException) else exc)
            raise
        except Reject as exc:
            _failed(span, "handed_back", exc)
            raise
        except BaseException as exc:
            _failed(span, "failed", exc)
            raise
        else:
            span.set_attribute("saga.outcome", "succeeded")
        finally:
            otel_context.detach(token)
            span.end()
            self._local.open -= 1
            if not self._local.open:
                self._flush()

    def _start_attempt(self, control: Control, run: SagaRun) -> trace.Span:
        enclosing = trace.get_current_span().get_span_context()  # Celery's run/<task>, if any
        parent = trace.set_span_in_context(trace.NonRecordingSpan(_root_context(run.id)))
        return self.tracer().start_span(
            f"saga.{control.kind.value} {control.step}", context=parent,
            links=[trace.Link(enclosing)] if enclosing.is_valid else [],
            attributes={"saga.id": run.id, "saga.name": run.name, "saga.step": control.step,
                        "saga.count": control.count, "saga.attempt": control.attempt,
                        "saga.kind": control.kind.value})

    def ended(self, run: SagaRun) -> None:
        """The engine's ``on_ended``: emit the root span now, or after the enclosing attempt
        span ends (the attempt whose end ended the saga)."""
        try:
            request = _running_request()
            running = control_of(getattr(request, "kwargs", None)) if request else None
            link = (_decode(getattr(request, LINK_HEADER, None))
                    if running is not None and running.saga_id == run.id else None)
            pending: list[tuple[SagaRun, trace.SpanContext | None]] = getattr(
                self._local, "pending", [])
            self._local.pending = [*pending, (run, link)]
            if not getattr(self._local, "open", 0):
                self._flush()
        except Exception as exc:  # a span is never worth a saga's bookkeeping
            log.warning("saga.otel_root_failed", saga_id=run.id, error=repr(exc))

    def _flush(self) -> None:
        pending: list[tuple[SagaRun, trace.SpanContext | None]] = getattr(
            self._local, "pending", [])
        self._local.pending = []
        for run, link in pending:
            try:
                self._emit_root(run, link)
            except Exception as exc:
                log.warning("saga.otel_root_failed", saga_id=run.id, error=repr(exc))

    def _emit_root(self, run: SagaRun, link: trace.SpanContext | None) -> None:
        attributes: dict[str, str] = {"saga.id": run.id, "saga.name": run.name,
                                      "saga.outcome": str(run.status)}
        if run.error is not None:
            attributes["saga.error.type"] = run.error.type
            if run.error.step is not None:
                attributes["saga.error.step"] = run.error.step
        reset = _forced_ids.set((trace_id(run.id), root_span_id(run.id)))
        try:
            span = self.tracer().start_span(
                f"saga {run.name}", context=otel_context.Context(),
                links=[trace.Link(link)] if link is not None else [], attributes=attributes,
                start_time=_ns(run.created_at.timestamp()))
        finally:
            _forced_ids.reset(reset)
        if run.status != SagaStatus.COMPLETE:
            message = run.error.message if run.error is not None else str(run.status)
            span.set_status(trace.Status(trace.StatusCode.ERROR, message))
        end = max(time.time_ns(), _ns(run.created_at.timestamp()))
        inside = trace.set_span_in_context(span, otel_context.Context())
        for step in run.steps.values():
            spec = run.plan.specs_by_key.get(step.key)
            if spec is not None and spec.wait is not None and step.attempts:
                self._emit_wait(run, step, spec.wait, inside, end)
        if run.held is not None:
            self._emit_holds(run, inside, end)
        span.end(end_time=end)

    def _emit_wait(self, run: SagaRun, step: StepRun, wait: WaitSpec,
                   inside: otel_context.Context, end: int) -> None:
        """A sleep's or a wait's span: from its start to its end, both as recorded."""
        record = step.attempts[-1]
        outcome = _WAIT_OUTCOMES.get(step.status, "cancelled")
        attributes: dict[str, str | int] = {
            "saga.id": run.id, "saga.name": run.name, "saga.step": step.name,
            "saga.count": step.count, "saga.attempt": record.attempt,
            "saga.kind": str(wait.kind), "saga.outcome": outcome}
        if wait.event_type is not None:
            attributes["saga.event_type"] = wait.event_type
        span = self.tracer().start_span(
            f"saga.{wait.kind} {step.name}", context=inside, attributes=attributes,
            start_time=_ns(record.started_at.timestamp()))
        ended = _ns(record.ended_at.timestamp()) if record.ended_at is not None else end
        if outcome == "completed" and wait.kind == WaitKind.WAIT:
            span.add_event("event_received", {"saga.event_type": wait.event_type or ""},
                           timestamp=ended)
        elif outcome == "timed_out" and record.error is not None:
            span.set_attribute("saga.error.type", record.error.type)
            span.set_status(trace.Status(trace.StatusCode.ERROR, record.error.message))
        span.end(end_time=ended)

    def _emit_holds(self, run: SagaRun, inside: otel_context.Context, end: int) -> None:
        """A span per time the saga stood held, read from its events (only a saga that was
        held pays for the read)."""
        if self._events is None:
            return
        for period in held_periods(self._events(run.id)):
            span = self.tracer().start_span(
                "saga.hold", context=inside, start_time=_ns(period.started_at.timestamp()),
                attributes={"saga.id": run.id, "saga.name": run.name, "saga.kind": "hold",
                            "saga.outcome": period.outcome, "saga.error": period.error})
            span.end(end_time=_ns(period.ended_at.timestamp()) if period.ended_at else end)


_WAIT_OUTCOMES = {StepStatus.COMPLETE: "completed", StepStatus.ERRORED: "timed_out",
                  StepStatus.CANCELLED: "cancelled"}
"""A sleep's or a wait's outcome by its entry's status (a wait errs only by timing out)."""


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def _failed(span: trace.Span, outcome: str, exc: BaseException) -> None:
    span.set_attribute("saga.outcome", outcome)
    span.set_attribute("saga.error.type", type(exc).__name__)
    span.record_exception(exc)
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


# --- switching it on ------------------------------------------------------------------

_instrumented: dict[int, SagaApp] = {}
_lock = threading.Lock()


def instrument(sagas: SagaApp, *, tracer_provider: trace.TracerProvider | None = None
               ) -> None:
    """Make each saga of ``sagas`` one trace, exported through ``tracer_provider`` (the
    global provider when None, looked up at the first span).

    Call it where the ``SagaApp`` is built, before the worker forks its pool: in the worker
    for the spans, and in the process calling ``apply_async`` for the link to the caller's
    span.  Calling it again replaces the provider."""
    observer = _SagaTracer(tracer_provider, events=lambda saga_id: [
        event for _, event in sagas._engine.store.read_events(saga_id)])
    sagas._runtime.observe_attempt = observer.attempt
    sagas._engine.on_ended = observer.ended
    with _lock:
        _instrumented[id(sagas)] = sagas
        signals.before_task_publish.connect(_carry_link, weak=False,
                                            dispatch_uid="saga_celery.otel.link")


def uninstrument(sagas: SagaApp) -> None:
    """Undo ``instrument(sagas)``: no spans, and no ``saga_link`` once no app is left."""
    sagas._runtime.observe_attempt = None
    sagas._engine.on_ended = None
    with _lock:
        _instrumented.pop(id(sagas), None)
        if not _instrumented:
            signals.before_task_publish.disconnect(_carry_link,
                                                   dispatch_uid="saga_celery.otel.link")
