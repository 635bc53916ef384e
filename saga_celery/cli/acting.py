"""The acting commands: ``terminate``, ``retry-rollback`` and ``recover``.

What they send goes through the loaded app's dispatcher, so it follows the app's routes.
"""

from __future__ import annotations

from datetime import timedelta

import click

from saga_celery._celery.app import SagaApp
from saga_celery._core.durations import parse_duration
from saga_celery.cli.target import with_sagas

__all__ = ["parse_grace", "recover", "retry_rollback", "terminate"]


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


@click.command()
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


@click.command("retry-rollback")
@click.argument("saga_id")
@with_sagas
def retry_rollback(sagas: SagaApp, saga_id: str) -> None:
    """Resume a rollback whose outcome is failed.

    Every handler not yet complete runs again, in the same order, with a fresh retry budget.
    """
    state = sagas.run(saga_id).retry_rollback()
    click.echo(f"saga {saga_id}: rollback resumed; status now {state.status}")


@click.command()
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
