"""``saga-celery``: inspect and operate sagas from a shell.

Which sagas: ``--app MODULE:ATTR`` (``$SAGA_APP``, e.g. ``workers.app:sagas``) imports your
``SagaApp``, so messages that ``terminate``, ``retry-rollback`` and ``recover`` send follow
your task routes.  Without it, a bare ``SagaApp`` is built on ``--redis-url``
(``$SAGA_REDIS_URL``) with ``--prefix`` (``$SAGA_PREFIX``) and the broker ``--broker-url``
(``$SAGA_BROKER_URL``, default the Redis URL); its messages go to the saga queues by kind.

Exit status: 0 done, 1 the saga is unknown, the operation was refused or Redis cannot be
reached (one line on stderr, never a traceback), 2 a usage error.  Log lines go to stderr,
warnings only, so that standard output stays the command's own.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import update_wrapper
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import click
import structlog
from celery import Celery
from kombu.exceptions import OperationalError
from prometheus_client import CollectorRegistry

from saga_celery._celery.app import SagaApp
from saga_celery._core.config import parse_duration
from saga_celery._core.model import TERMINAL_STATUSES, SagaRun, SagaStatus
from saga_celery._core.state import SagaState
from saga_celery._engine import utcnow
from saga_celery._errors import SagaError
from saga_celery._store.base import SagaStore
from saga_celery._table import render, status_lines
from saga_celery.metrics import MetricsExporter, MetricsServer, SagaMetrics

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
LIST_SCAN_FACTOR = 10
"""``list`` with filters looks at up to this many times ``--limit`` of the newest sagas."""
FOLLOW_BLOCK_MS = 1000
"""Longest single wait for new events with ``events --follow``: the status is re-read after."""
DEFAULT_METRICS_PORT = 9808

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Target:
    """The command line's choice of ``SagaApp``, loaded on first use."""

    app_path: str | None = None
    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str | None = None
    prefix: str = "saga:"
    steps_queue: str = "saga.steps"
    rollbacks_queue: str = "saga.rollbacks"
    loaded: SagaApp | None = field(default=None, repr=False)

    def sagas(self) -> SagaApp:
        if self.loaded is None:
            self.loaded = load_app(self.app_path) if self.app_path else self._bare()
            quiet_logs()  # after the import: a user's app may configure structlog itself
        return self.loaded

    def _bare(self) -> SagaApp:
        celery = Celery("saga-celery", broker=self.broker_url or self.redis_url,
                        set_as_current=False)
        return SagaApp(celery, redis_url=self.redis_url, prefix=self.prefix,
                       steps_queue=self.steps_queue, rollbacks_queue=self.rollbacks_queue)


def load_app(path: str) -> SagaApp:
    """The ``SagaApp`` at ``module:attr`` (``attr`` defaults to ``sagas``)."""
    module_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path:  # as `celery -A` does: the app lives in the project
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}",
                                 param_hint="'--app'") from exc
    found = getattr(module, attr or "sagas", None)
    if not isinstance(found, SagaApp):
        raise click.BadParameter(f"{module_name}:{attr or 'sagas'} is not a SagaApp "
                                 f"(got {type(found).__name__})", param_hint="'--app'")
    return found


def quiet_logs() -> None:
    """Send structlog's lines (lifecycle events this process commits) to stderr, warnings up."""
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", key="logged_at"),
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


def redact(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class SagaGroup(click.Group):
    """Turns saga_celery's errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SagaError as exc:
            raise click.ClickException(str(exc)) from exc
        except OperationalError as exc:
            broker = redact(_broker(ctx))
            raise click.ClickException(
                f"the Celery broker at {broker} cannot be reached ({exc}); the saga state is "
                "recorded, and `saga-celery recover` re-sends its messages once the broker "
                "is back") from exc


def _broker(ctx: click.Context) -> str:
    target = ctx.find_object(Target)
    if target is None or target.loaded is None:
        return "?"
    return str(target.loaded.app.conf.broker_url)


def with_sagas(fn: F) -> F:
    """Pass the command the loaded ``SagaApp`` as its first argument."""

    @click.pass_context
    def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> Any:
        return ctx.invoke(fn, ctx.ensure_object(Target).sagas(), *args, **kwargs)

    return update_wrapper(wrapper, fn)  # type: ignore[return-value]


def parse_grace(ctx: click.Context, param: click.Parameter, value: str | None
                ) -> timedelta | None:
    """``"30 seconds"``, ``"2 minutes"`` or a number of milliseconds (an option callback)."""
    if value is None:
        return None
    text = value.strip()
    try:
        return parse_duration(float(text) if _is_number(text) else text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- the group ------------------------------------------------------------------------


@click.group(cls=SagaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--app", "app_path", envvar="SAGA_APP", metavar="MODULE:ATTR",
              help="Your SagaApp, e.g. workers.app:sagas [env SAGA_APP].")
@click.option("--redis-url", envvar="SAGA_REDIS_URL", default=DEFAULT_REDIS_URL,
              show_default=True, help="Saga state, without --app [env SAGA_REDIS_URL].")
@click.option("--broker-url", envvar="SAGA_BROKER_URL", default=None,
              help="Celery broker, without --app; default the Redis URL [env SAGA_BROKER_URL].")
@click.option("--prefix", envvar="SAGA_PREFIX", default="saga:", show_default=True,
              help="Saga key prefix, without --app [env SAGA_PREFIX].")
@click.option("--steps-queue", envvar="SAGA_STEPS_QUEUE", default="saga.steps",
              show_default=True, help="Queue of steps, without --app.")
@click.option("--rollbacks-queue", envvar="SAGA_ROLLBACKS_QUEUE", default="saga.rollbacks",
              show_default=True, help="Queue of rollbacks, without --app.")
@click.pass_context
def main(ctx: click.Context, app_path: str | None, redis_url: str, broker_url: str | None,
         prefix: str, steps_queue: str, rollbacks_queue: str) -> None:
    """Inspect and operate saga_celery sagas.

    Exit status: 0 done, 1 unknown saga, refused operation or unreachable Redis, 2 usage.
    """
    ctx.obj = Target(app_path=app_path, redis_url=redis_url, broker_url=broker_url,
                     prefix=prefix, steps_queue=steps_queue, rollbacks_queue=rollbacks_queue)


# --- reading --------------------------------------------------------------------------


@main.command()
@click.argument("saga_id")
@click.option("--json", "as_json", is_flag=True, help="Print the SagaState as JSON.")
@with_sagas
def status(sagas: SagaApp, saga_id: str, as_json: bool) -> None:
    """Show a saga's status and its step table.

    One row per step: its start order, forward outcome and attempts, rollback outcome and
    attempts; then the rollback order and every failed attempt.
    """
    run = sagas.run(saga_id)
    state = run.status()
    if as_json:
        click.echo(state.model_dump_json(indent=2))
        return
    lines = status_lines(state, run.events())
    lines.insert(1, f"  {_times(state)}")
    click.echo("\n".join(lines))


def _times(state: SagaState) -> str:
    def at(value: datetime | None) -> str:
        return "-" if value is None else value.isoformat(timespec="milliseconds")

    return (f"created {at(state.created_at)}  started {at(state.started_at)}  "
            f"ended {at(state.ended_at)}")


@main.command("list")
@click.option("--status", "status_", type=click.Choice([s.value for s in SagaStatus]),
              help="Only sagas with this status.")
@click.option("--name", help="Only sagas with this name.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help=f"At most this many; filters look at the {LIST_SCAN_FACTOR}x newest.")
@click.option("--corrupt", is_flag=True,
              help="Instead: the sagas the recovery sweep could not read and moved aside.")
@with_sagas
def list_(sagas: SagaApp, status_: str | None, name: str | None, limit: int,
          corrupt: bool) -> None:
    """List the newest sagas, optionally filtered.

    Columns: id, name, status, rollback outcome and creation time, newest first.  With
    --corrupt: id, when the sweep moved it aside and why, the most recently moved first.
    """
    if corrupt:
        _list_corrupt(sagas.store, limit, filtered=status_ is not None or name is not None)
        return
    runs = list(matching(sagas.store, status=status_, name=name, limit=limit))
    if not runs:
        click.echo("no sagas found")
        return
    rows = [["id", "name", "status", "rollback", "created_at"], *map(_list_row, runs)]
    click.echo("\n".join(render(rows)))


def _list_corrupt(store: SagaStore, limit: int, *, filtered: bool) -> None:
    if filtered:
        raise click.UsageError("--corrupt lists unreadable records: --status and --name "
                               "need a readable saga")
    records = store.corrupt_records(limit)
    if not records:
        click.echo("no corrupt sagas")
        return
    rows = [[r.saga_id, _epoch_ms(r.at_ms), r.why] for r in records]
    click.echo("\n".join(render([["id", "moved_at", "why"], *rows])))


def _epoch_ms(at_ms: int) -> str:
    return datetime.fromtimestamp(at_ms / 1000, UTC).isoformat(timespec="seconds")


def matching(store: SagaStore, *, status: str | None, name: str | None,
             limit: int) -> Iterator[SagaRun]:
    """Up to ``limit`` sagas, newest first, among the ``LIST_SCAN_FACTOR`` x ``limit`` newest."""
    found = 0
    for saga_id in store.list_ids(limit * LIST_SCAN_FACTOR):
        snapshot = store.load(saga_id)
        if snapshot is None:  # retention expired; the index keeps the id a while longer
            continue
        run = snapshot.run
        if (status is None or run.status == status) and (name is None or run.name == name):
            yield run
            found += 1
            if found == limit:
                return


def _list_row(run: SagaRun) -> list[str]:
    rollback = "-" if run.rollback is None else str(run.rollback.outcome or "running")
    created = run.created_at.isoformat(timespec="seconds")
    return [run.id, run.name, str(run.status), rollback, created]


@main.command()
@click.argument("saga_id")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing new events until the saga ends (or Ctrl-C).")
@with_sagas
def events(sagas: SagaApp, saga_id: str, follow: bool) -> None:
    """Print a saga's events as JSON lines.

    Oldest first, one JSON object a line; with --follow, until the saga ends.
    """
    sagas.engine.load(saga_id)
    last = _echo_events(sagas.store, saga_id, "0")
    if not follow:
        return
    try:
        _follow(sagas, saga_id, last)
    except KeyboardInterrupt:
        click.get_current_context().exit(130)


def _follow(sagas: SagaApp, saga_id: str, last: str) -> None:
    while True:
        # The state and the events of one transition are written atomically: once the state
        # reads terminal, one more read has every event up to the terminal one.
        ended = sagas.engine.load(saga_id).run.status in TERMINAL_STATUSES
        last = _echo_events(sagas.store, saga_id, last,
                            block_ms=None if ended else FOLLOW_BLOCK_MS)
        if ended:
            return


def _echo_events(store: SagaStore, saga_id: str, after: str, *,
                 block_ms: int | None = None) -> str:
    """Print the events after stream id ``after``; the last id printed."""
    for stream_id, event in store.read_events(saga_id, after=after, block_ms=block_ms):
        click.echo(json.dumps(event))
        after = stream_id
    return after


# --- operating ------------------------------------------------------------------------


@main.command()
@click.argument("saga_id")
@click.option("--rollback", is_flag=True, help="Roll back the steps that started.")
@click.option("--reason", default="terminated by request", show_default=True,
              help="Recorded in the Terminated error.")
@with_sagas
def terminate(sagas: SagaApp, saga_id: str, rollback: bool, reason: str) -> None:
    """Stop a saga (and roll it back with --rollback).

    No new step starts, running attempts finish, pending retries are cancelled; with
    --rollback the steps that started are then compensated.
    """
    state = sagas.run(saga_id).terminate(rollback=rollback, reason=reason)
    how = "with rollback" if rollback else "without rollback"
    click.echo(f"saga {saga_id}: terminate requested ({how}); status now {state.status}")


@main.command("retry-rollback")
@click.argument("saga_id")
@with_sagas
def retry_rollback(sagas: SagaApp, saga_id: str) -> None:
    """Resume a rollback whose outcome is failed.

    Every handler not yet complete runs again, in the same order, with a fresh retry budget.
    """
    state = sagas.run(saga_id).retry_rollback()
    click.echo(f"saga {saga_id}: rollback resumed; status now {state.status}")


@main.command()
@click.option("--grace", callback=parse_grace, metavar="DURATION",
              help="How late a message must be to be re-sent (default: the app's).")
@with_sagas
def recover(sagas: SagaApp, grace: timedelta | None) -> None:
    """Re-send what unfinished sagas lost; print how many.

    One recovery sweep: messages recorded as due that never started, and attempts whose
    worker died, are sent again (receivers drop duplicates).
    """
    sent = sagas.recover(grace=grace)
    click.echo(f"re-sent {sent} message{'' if sent == 1 else 's'}")


@main.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Run the demo saga on a real worker.

    The repository's python -m workers.demo: run it from the repository root.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module("workers.demo")
    except ImportError as exc:
        raise click.ClickException(f"the demo is the repository's workers/demo.py: run "
                                   f"saga-celery demo from the repository root ({exc})") from exc
    ctx.exit(int(module.main()))


@main.command()
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
    sagas.store.ping()
    registry = CollectorRegistry()
    exporter = MetricsExporter(sagas.store, SagaMetrics(registry, since=utcnow()))
    server = MetricsServer(exporter, registry,
                           on_error=lambda m: click.echo(f"saga-celery metrics: {m}", err=True))
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


if __name__ == "__main__":
    main()
