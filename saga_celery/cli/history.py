"""The history command: ``delete`` (SPEC section 11).  ``list --archive`` is in ``reading``."""

from __future__ import annotations

import click

from saga_celery._celery.app import SagaApp
from saga_celery.cli.target import with_sagas

__all__ = ["delete"]


@click.command()
@click.argument("saga_id")
@with_sagas
def delete(sagas: SagaApp, saga_id: str) -> None:
    """Delete a finished saga everywhere: Redis and the archive.

    Refused (exit 1) while the saga runs: terminate it first.
    """
    sagas.reader.delete(saga_id)
    click.echo(f"saga {saga_id}: deleted")
