"""``saga-celery``: inspect and operate sagas from a shell.

Which sagas: ``--app MODULE:ATTR`` (``$SAGA_APP``, e.g. ``workers.app:sagas``) imports your
``SagaApp``, so messages that ``terminate``, ``retry-rollback`` and ``recover`` send follow
your task routes.  Without it, a bare ``SagaApp`` is built on ``--redis-url``
(``$SAGA_REDIS_URL``) with ``--prefix`` (``$SAGA_PREFIX``) and the broker ``--broker-url``
(``$SAGA_BROKER_URL``, default the Redis URL); its messages go to the saga queues by kind.

Exit status: 0 done (``health``: healthy), 1 the saga is unknown, the operation was refused,
the sagas are unhealthy (``health``), Redis cannot be reached or an extra the command needs
is not installed (one line on stderr, never a traceback), 2 a usage error.  Log lines go to
stderr, warnings only, so that standard output stays the command's own.

The commands live by what they do: ``reading`` (status, list, events), ``history``
(delete), ``acting`` (terminate, retry-rollback, recover), ``serving`` (metrics, demo) and
``health`` (a probe: exit 1 with one line saying why the sagas are not looked after);
``target`` loads the app they work on.
"""

from __future__ import annotations

from typing import Any

import click
from kombu.exceptions import OperationalError

from saga_celery._errors import SagaError
from saga_celery._extras import MissingExtraError
from saga_celery.cli import acting, health, history, reading, serving
from saga_celery.cli.target import DEFAULT_REDIS_URL, Target, redact

__all__ = ["Target", "main", "redact"]


class SagaGroup(click.Group):
    """Turns saga_celery's errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (SagaError, MissingExtraError) as exc:
            raise click.ClickException(str(exc)) from exc
        except OperationalError as exc:
            broker = redact(_broker(ctx))
            raise click.ClickException(
                f"the Celery broker at {broker} cannot be reached ({exc}); the saga state is "
                "recorded, and `saga-celery recover` re-sends its messages once the broker "
                "is back") from exc
        finally:
            _close_archive(ctx)


def _close_archive(ctx: click.Context) -> None:
    """Close the archive connection the command opened, if any (``SagaApp(archive=)``)."""
    target = ctx.find_object(Target)
    if target is not None and target.loaded is not None:
        archive = target.loaded.reader.archive
        if archive is not None:
            archive.close()


def _broker(ctx: click.Context) -> str:
    target = ctx.find_object(Target)
    if target is None or target.loaded is None:
        return "?"
    return str(target.loaded.app.conf.broker_url)


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
@click.option("--archive-url", envvar="SAGA_ARCHIVE_URL", default=None,
              help="PostgreSQL archive of finished sagas, without --app "
                   "[env SAGA_ARCHIVE_URL].")
@click.pass_context
def main(ctx: click.Context, app_path: str | None, redis_url: str, broker_url: str | None,
         prefix: str, steps_queue: str, rollbacks_queue: str, archive_url: str | None
         ) -> None:
    """Inspect and operate saga_celery sagas.

    Exit status: 0 done, 1 unknown saga, refused operation, unhealthy or unreachable Redis,
    2 usage.
    """
    ctx.obj = Target(app_path=app_path, redis_url=redis_url, broker_url=broker_url,
                     prefix=prefix, steps_queue=steps_queue, rollbacks_queue=rollbacks_queue,
                     archive_url=archive_url)


for _command in (reading.status, reading.list_, reading.events, history.delete,
                 acting.terminate, acting.retry_rollback, acting.recover, serving.metrics,
                 serving.demo, health.health):
    main.add_command(_command)
