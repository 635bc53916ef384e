"""The reading commands: ``status``, ``list`` and ``events``.  They change nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from saga_celery._celery.app import SagaApp
from saga_celery._celery.coordinator import LIST_SCAN_FACTOR, SagaReader
from saga_celery._core.model import TERMINAL_STATUSES, SagaRun, SagaStatus
from saga_celery._core.state import SagaState
from saga_celery._table import render, status_lines
from saga_celery.cli.target import with_sagas

__all__ = ["events", "list_", "status"]

FOLLOW_BLOCK_MS = 1000
"""Longest single wait for new events with ``events --follow``: the status is re-read after."""


@click.command()
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


@click.command("list")
@click.option("--status", "status_", type=click.Choice([s.value for s in SagaStatus]),
              help="Only sagas with this status.")
@click.option("--name", help="Only sagas with this name.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help=f"At most this many; filters look at the {LIST_SCAN_FACTOR}x newest.")
@click.option("--corrupt", is_flag=True,
              help="Instead: the sagas the recovery sweep could not read and moved aside.")
@click.option("--archive", "archived", is_flag=True,
              help="Instead: the finished sagas in the archive, newest ended first, a page "
                   "at a time.")
@click.option("--ended-before", type=click.DateTime(), default=None,
              help="With --archive: only sagas that ended before this time (UTC).")
@click.option("--ended-after", type=click.DateTime(), default=None,
              help="With --archive: only sagas that ended at or after this time (UTC).")
@click.option("--page", "cursor", default=None, metavar="CURSOR",
              help="With --archive: the page after the one that printed this cursor.")
@with_sagas
def list_(sagas: SagaApp, status_: str | None, name: str | None, limit: int,
          corrupt: bool, archived: bool, ended_before: datetime | None,
          ended_after: datetime | None, cursor: str | None) -> None:
    """List the newest sagas, optionally filtered.

    Columns: id, name, status, rollback outcome and creation time, newest first.  With
    --corrupt: id, when the sweep moved it aside and why, the most recently moved first.
    With --archive: id, name, status, creation and end time, newest ended first, then the
    cursor of the next page (give it to --page).
    """
    if corrupt:
        _list_corrupt(sagas.reader, limit, filtered=status_ is not None or name is not None)
        return
    if archived or cursor is not None or ended_before is not None or ended_after is not None:
        _list_archive(sagas.reader, status=status_, name=name, limit=limit, cursor=cursor,
                      ended_before=_utc(ended_before), ended_after=_utc(ended_after))
        return
    runs = list(sagas.reader.recent(status=status_, name=name, limit=limit))
    if not runs:
        click.echo("no sagas found")
        return
    rows = [["id", "name", "status", "rollback", "created_at"], *map(_list_row, runs)]
    click.echo("\n".join(render(rows)))


def _list_archive(reader: SagaReader, *, status: str | None, name: str | None, limit: int,
                  cursor: str | None, ended_before: datetime | None,
                  ended_after: datetime | None) -> None:
    page = reader.archived(status=status, name=name, limit=limit, after=cursor,
                           ended_before=ended_before, ended_after=ended_after)
    if not page.sagas:
        click.echo("no archived sagas found")
        return
    rows = [[s.id, s.name, s.status, s.created_at.isoformat(timespec="seconds"),
             "-" if s.ended_at is None else s.ended_at.isoformat(timespec="seconds")]
            for s in page.sagas]
    click.echo("\n".join(render([["id", "name", "status", "created_at", "ended_at"], *rows])))
    if page.next is not None:
        click.echo(f"next page: --page '{page.next}'")


def _utc(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


def _list_corrupt(reader: SagaReader, limit: int, *, filtered: bool) -> None:
    if filtered:
        raise click.UsageError("--corrupt lists unreadable records: --status and --name "
                               "need a readable saga")
    records = reader.corrupt(limit)
    if not records:
        click.echo("no corrupt sagas")
        return
    rows = [[r.saga_id, _epoch_ms(r.at_ms), r.why] for r in records]
    click.echo("\n".join(render([["id", "moved_at", "why"], *rows])))


def _epoch_ms(at_ms: int) -> str:
    return datetime.fromtimestamp(at_ms / 1000, UTC).isoformat(timespec="seconds")


def _list_row(run: SagaRun) -> list[str]:
    rollback = "-" if run.rollback is None else str(run.rollback.outcome or "running")
    created = run.created_at.isoformat(timespec="seconds")
    return [run.id, run.name, str(run.status), rollback, created]


@click.command()
@click.argument("saga_id")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing new events until the saga ends (or Ctrl-C).")
@with_sagas
def events(sagas: SagaApp, saga_id: str, follow: bool) -> None:
    """Print a saga's events as JSON lines.

    Oldest first, one JSON object a line; with --follow, until the saga ends.
    """
    sagas.reader.run(saga_id)  # SagaNotFoundError, as one line, for an unknown id
    last = _echo_events(sagas.reader, saga_id, "0")
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
        ended = sagas.reader.run(saga_id).status in TERMINAL_STATUSES
        last = _echo_events(sagas.reader, saga_id, last,
                            block_ms=None if ended else FOLLOW_BLOCK_MS)
        if ended:
            return


def _echo_events(reader: SagaReader, saga_id: str, after: str, *,
                 block_ms: int | None = None) -> str:
    """Print the events after stream id ``after``; the last id printed."""
    for stream_id, event in reader.events(saga_id, after=after, block_ms=block_ms):
        click.echo(json.dumps(event))
        after = stream_id
    return after
