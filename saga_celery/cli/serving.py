"""The serving commands: ``metrics`` (a Prometheus endpoint) and ``demo``.

Both run until they are done or stopped; SIGTERM stops ``metrics`` as Ctrl-C does.  Each
imports what it needs when it runs: ``metrics`` needs the ``saga-celery[metrics]`` extra, the
demo's embedded Redis the ``saga-celery[demo]`` extra.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from saga_celery._celery.app import SagaApp
from saga_celery._engine import utcnow
from saga_celery._store.base import SagaStore
from saga_celery.cli.target import with_sagas

if TYPE_CHECKING:  # imported when the command runs: prometheus-client is an extra
    from saga_celery.metrics import MetricsServer

__all__ = ["DEFAULT_METRICS_PORT", "demo", "metrics"]

DEFAULT_METRICS_PORT = 9808


@click.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Run the demo saga on a real worker.

    Starts celery -A saga_celery.demo.app worker and places two orders, one rolled back: on
    $SAGA_REDIS_URL when set, else on an embedded Redis-protocol server.
    """
    from saga_celery.demo.runner import main as run_demo

    ctx.exit(run_demo())


@click.command()
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_METRICS_PORT,
              show_default=True, help="HTTP port of /metrics (0: any free one).")
@click.option("--addr", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--interval", type=click.FloatRange(min=0.01), default=5.0, show_default=True,
              help="Seconds between reads of the saga store.")
@with_sagas
def metrics(sagas: SagaApp, port: int, addr: str, interval: float) -> None:
    """Serve saga metrics in Prometheus format.

    Serves /metrics until interrupted, reading new events from the store every interval.
    """
    server = _metrics_server(sagas.reader.exporter_source())
    sagas.reader.ping()
    try:
        bound = server.start(port, addr)
    except OSError as exc:
        raise click.ClickException(f"cannot serve metrics on {addr}:{port}: {exc}") from exc
    click.echo(f"serving saga metrics on http://{addr}:{bound}/metrics "
               f"(reading the store every {interval:g} s)")
    try:
        with _sigterm_interrupts():
            server.run(interval, threading.Event())
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def _metrics_server(store: SagaStore) -> MetricsServer:
    """A server of the store's metrics; ``MissingExtraError`` without prometheus-client."""
    from saga_celery.metrics import MetricsServer

    return MetricsServer.for_store(
        store, since=utcnow(),
        on_error=lambda m: click.echo(f"saga-celery metrics: {m}", err=True))


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a container stopping) ends the command as Ctrl-C does: cleanly, status 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt

