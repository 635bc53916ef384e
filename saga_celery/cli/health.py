"""``saga-celery health``: a probe and an alert for a saga fleet, from one read of the store.

It reads the record the last recovery sweep left (``SweepRecord``) and exits 0 with one line
``ok: ...`` on standard output, or 1 with one line ``unhealthy: ...`` on standard error when

- the saga store cannot be reached (or holds no readable record there);
- the sweep has never run, or last ran more than ``--intervals`` of its intervals ago (the
  interval beat's sweeps record, else the app's ``recovery_interval``): beat is not sending
  ``saga_celery.recover`` or the rollback pool is not running it;
- the oldest overdue message (or, once they exist, timer) the last sweep saw has waited
  longer than ``--max-overdue``: messages are lost faster than re-sent, or the pools do not
  keep up.

The verdict (``judge``) is pure: the record, the time and the limits in, one line out.  What
the sweep saw is as old as the sweep: a message picked up since then still counts until the
next sweep, at most an interval later.  Times are epoch ms from the clocks of the workers
that swept and of this process, so they are as good as those clocks agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, NoReturn

import click

from saga_celery._celery.app import RECOVER_TASK, SagaApp
from saga_celery._engine import utcnow
from saga_celery._errors import SagaStoreError
from saga_celery._store.base import SweepRecord
from saga_celery.cli.target import parse_duration_option, with_sagas

__all__ = ["DEFAULT_INTERVALS", "DEFAULT_MAX_OVERDUE", "Limits", "Verdict", "health", "judge"]

DEFAULT_MAX_OVERDUE = "5 minutes"
DEFAULT_INTERVALS = 3


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What ``health`` tolerates."""

    max_overdue: timedelta
    """The longest the oldest overdue message may have waited."""
    intervals: int = DEFAULT_INTERVALS
    """How many sweep intervals may pass without a sweep."""
    interval: timedelta
    """The sweep's interval when no sweep beat started has recorded one (the app's)."""


class Verdict(NamedTuple):
    """Healthy or not, and the line that says so."""

    healthy: bool
    line: str


def judge(record: SweepRecord | None, now_ms: int, limits: Limits) -> Verdict:
    """Whether the fleet is healthy by the last sweep's ``record``, at ``now_ms`` (pure)."""
    if record is None:
        return Verdict(False, "the recovery sweep has never run on this store: beat must send "
                              f"{RECOVER_TASK} (every {_span(limits.interval)}) and the "
                              "rollback pool run it; `saga-celery recover` runs one now")
    interval = timedelta(milliseconds=record.interval_ms or _ms(limits.interval))
    ago = timedelta(milliseconds=max(now_ms - record.swept_at_ms, 0))
    if ago > limits.intervals * interval:
        return Verdict(False, f"the recovery sweep last ran {_span(ago)} ago "
                              f"({_iso(record.swept_at_ms)}), more than {limits.intervals} "
                              f"intervals of {_span(interval)}: beat must send {RECOVER_TASK} "
                              "and the rollback pool run it")
    waited = _oldest_wait(record, now_ms)
    if waited is not None and waited > limits.max_overdue:
        return Verdict(False, f"{_overdue(record, waited)} (over {_span(limits.max_overdue)}): "
                              f"{record.oldest_overdue_message} of saga "
                              f"{record.oldest_overdue_saga}; are the worker pools running "
                              "and keeping up?")
    seen = _overdue(record, waited) if waited is not None else "none overdue"
    return Verdict(True, f"the recovery sweep ran {_span(ago)} ago (every {_span(interval)}) "
                         f"over {_plural(record.sagas, 'unfinished saga')}; {seen}")


def _oldest_wait(record: SweepRecord, now_ms: int) -> timedelta | None:
    if record.oldest_overdue_ms is None:
        return None
    return timedelta(milliseconds=max(now_ms - record.oldest_overdue_ms, 0))


def _overdue(record: SweepRecord, waited: timedelta) -> str:
    return f"{_plural(record.overdue, 'overdue message')}, the oldest waiting {_span(waited)}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _span(duration: timedelta) -> str:
    """``45s``, ``3m 12s``, ``2h 5m`` or ``3d 4h``: a duration to the two largest units."""
    seconds = int(duration.total_seconds())
    units = [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)]
    parts: list[str] = []
    for name, size in units:
        if seconds >= size or (name == "s" and not parts):
            parts.append(f"{seconds // size}{name}")
            seconds %= size
    return " ".join(parts[:2])


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="seconds")


def _ms(duration: timedelta) -> int:
    return int(duration.total_seconds() * 1000)


@click.command()
@click.option("--max-overdue", callback=parse_duration_option, default=DEFAULT_MAX_OVERDUE,
              show_default=True, metavar="DURATION",
              help="Unhealthy when the oldest overdue message has waited longer.")
@click.option("--intervals", type=click.IntRange(min=1), default=DEFAULT_INTERVALS,
              show_default=True, help="Unhealthy when the sweep has not run for this many "
                                      "of its intervals.")
@with_sagas
def health(sagas: SagaApp, max_overdue: timedelta, intervals: int) -> None:
    """Exit 0 if the sagas are looked after, else 1 with one line saying why.

    Unhealthy: the store cannot be reached, the recovery sweep has not run for --intervals
    of its intervals, or the oldest overdue message it saw has waited over --max-overdue.
    One read of the store: cheap enough for a probe every few seconds.
    """
    try:
        record = sagas.reader.last_sweep()
    except SagaStoreError as exc:
        _unhealthy(str(exc))
    limits = Limits(max_overdue=max_overdue, intervals=intervals,
                    interval=sagas.recovery_interval)
    verdict = judge(record, int(utcnow().timestamp() * 1000), limits)
    if not verdict.healthy:
        _unhealthy(verdict.line)
    click.echo(f"ok: {verdict.line}")


def _unhealthy(line: str) -> NoReturn:
    click.echo(f"unhealthy: {' '.join(line.split())}", err=True)
    click.get_current_context().exit(1)
