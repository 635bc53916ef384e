"""``saga-celery dashboard``: serve the saga dashboard until interrupted.

It needs the ``saga-celery[dashboard]`` extra (Tornado), imported when the command runs, so
the other commands work without it.
"""

from __future__ import annotations

import asyncio

import click

from saga_celery._celery.app import SagaApp
from saga_celery.cli.serving import _sigterm_interrupts
from saga_celery.cli.target import redact, with_sagas

__all__ = ["DEFAULT_DASHBOARD_PORT", "dashboard"]

DEFAULT_DASHBOARD_PORT = 8700
PER_PAGE = 25


@click.command()
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_DASHBOARD_PORT,
              show_default=True, help="HTTP port (0: any free one).")
@click.option("--addr", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--flower-url", metavar="URL", envvar="SAGA_FLOWER_URL",
              help="Flower's base URL: each step and rollback links to its task page there "
                   "[env SAGA_FLOWER_URL].")
@click.option("--basic-auth", "basic_auth", multiple=True, metavar="USER:PASSWORD",
              envvar="SAGA_DASHBOARD_BASIC_AUTH",
              help="Ask for one of these users (repeat it, or user1:pw1,user2:pw2 as "
                   "Flower's) [env SAGA_DASHBOARD_BASIC_AUTH].")
@click.option("--per-page", type=click.IntRange(min=1), default=PER_PAGE, show_default=True,
              help="Sagas on one page of the list.")
@with_sagas
def dashboard(sagas: SagaApp, port: int, addr: str, flower_url: str | None,
              basic_auth: tuple[str, ...], per_page: int) -> None:
    """Serve the saga dashboard: the list, a timeline per saga, and JSON under /api.

    Reads the sagas only (it changes nothing); pages of running sagas refresh by
    themselves.  With --basic-auth every page, file and API call asks for a user.
    """
    from saga_celery.dashboard.server import Settings, parse_users, serve

    try:
        users = parse_users(basic_auth) if basic_auth else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--basic-auth'") from exc
    sagas.reader.ping()
    settings = Settings(flower_url=flower_url or None, users=users, per_page=per_page)

    def listening(bound: int) -> None:
        auth = "basic auth" if users else "no auth"
        flower = f", tasks linked to {redact(flower_url)}" if flower_url else ""
        click.echo(f"serving the saga dashboard on http://{addr}:{bound}/ ({auth}{flower})")

    try:
        with _sigterm_interrupts():
            asyncio.run(serve(sagas, settings, port=port, address=addr,
                              on_listening=listening))
    except OSError as exc:
        raise click.ClickException(f"cannot serve the dashboard on {addr}:{port}: "
                                   f"{exc}") from exc
    except KeyboardInterrupt:
        pass
