"""The commands of sagas that wait (SPEC section 8): ``send-event``, ``redrive`` and
``rollback``.

What they send goes through the loaded app's dispatcher, so it follows the app's routes.
"""

from __future__ import annotations

import json
from typing import Any

import click

from saga_celery._celery.app import SagaApp
from saga_celery.cli.target import with_sagas

__all__ = ["redrive", "rollback", "send_event"]


def _payload(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", ctx=ctx, param=param) from exc


@click.command("send-event")
@click.argument("saga_id")
@click.argument("event_type")
@click.option("--payload", callback=_payload, metavar="JSON",
              help="The event's payload, JSON (the wait's output); default null.")
@click.option("--event-id", default=None, metavar="ID",
              help="Sent twice with one id, the event counts once.")
@with_sagas
def send_event(sagas: SagaApp, saga_id: str, event_type: str, payload: Any,
               event_id: str | None) -> None:
    """Send an event to a saga's wait_for_event stage.

    Sent before the wait began, it is kept for it; exit 1 if the saga is unknown or has
    ended.
    """
    state = sagas.run(saga_id).send_event(event_type, payload, event_id=event_id)
    click.echo(f"saga {saga_id}: event {event_type!r} sent; status now {state.status}")


@click.command()
@click.argument("saga_id")
@with_sagas
def redrive(sagas: SagaApp, saga_id: str) -> None:
    """Run a held saga's failed steps again, with a fresh retry budget.

    The steps run as their tasks are registered now (deploy the fix first); completed steps
    never run again.  Exit 1 unless the saga is held.
    """
    state = sagas.run(saga_id).redrive()
    click.echo(f"saga {saga_id}: redriven; status now {state.status}")


@click.command()
@click.argument("saga_id")
@with_sagas
def rollback(sagas: SagaApp, saga_id: str) -> None:
    """Roll a held saga back, as for a failure.  Exit 1 unless the saga is held."""
    state = sagas.run(saga_id).rollback()
    click.echo(f"saga {saga_id}: rollback started; status now {state.status}")
