"""The shop app (``shop.py``) with ``saga_celery.otel`` on, for a worker whose spans a test reads.

A worker started with ``-A tests.integration.otel_app`` exports every span it ends as one
JSON line to the file ``$SAGA_TEST_OTEL_FILE`` (``JsonLinesExporter``: each pool process
appends its own lines).  With ``SAGA_TEST_OTEL_CELERY=1`` the worker also runs Celery's own
instrumentation (``opentelemetry-instrumentation-celery``), instrumented in each pool process
as its documentation says.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from celery import signals
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from saga_celery.otel import instrument
from tests.integration import shop

app = shop.app
sagas = shop.sagas


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """A span as the tests read it: ids in hex, times in ns, attributes and links."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "start": span.start_time,
        "end": span.end_time,
        "attributes": dict(span.attributes or {}),
        "links": [{"trace_id": f"{link.context.trace_id:032x}",
                   "span_id": f"{link.context.span_id:016x}"} for link in span.links],
        "status": span.status.status_code.name,
        "events": [event.name for event in span.events],
        "pid": os.getpid(),
    }


class JsonLinesExporter(SpanExporter):
    """Appends each span to a file as one JSON line, in one ``write`` per batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(json.dumps(span_record(s)) + "\n" for s in spans).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


provider = TracerProvider(resource=Resource.create({"service.name": "otel-worker"}))
provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(
    os.environ["SAGA_TEST_OTEL_FILE"])))
instrument(sagas, tracer_provider=provider)

if os.environ.get("SAGA_TEST_OTEL_CELERY") == "1":
    @signals.worker_process_init.connect(weak=False)
    def _instrument_celery(**_: Any) -> None:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument(tracer_provider=provider)
