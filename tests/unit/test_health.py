"""``saga-celery health``: the verdict on the last sweep's record (pure), and the command.

The command runs through click's runner on an in-memory ``SagaApp`` at
``tests.unit.test_health:SAGAS`` (``--app``), whose store holds the record a test writes or
a sweep leaves.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import pytest
from celery import Celery
from click.testing import Result

from saga_celery import SagaApp
from saga_celery._store.base import SweepRecord
from saga_celery._store.memory import MemoryStore
from saga_celery.cli import main
from saga_celery.cli.health import Limits, judge
from tests.unit.clirunner import cli_runner

pytestmark = pytest.mark.usefixtures("keep_structlog_config")

SAGAS: SagaApp | None = None
"""The app ``--app tests.unit.test_health:SAGAS`` loads (set per test)."""
NOW_MS = 1_800_000_000_000
LIMITS = Limits(max_overdue=timedelta(minutes=5), intervals=3, interval=timedelta(seconds=30))
S = 1000
M = 60 * S


def swept(ago_ms: int, *, oldest_ago_ms: int | None = None, overdue: int = 0,
          interval_ms: int | None = 30 * S, now_ms: int = NOW_MS) -> SweepRecord:
    """A record of a sweep that ended ``ago_ms`` before ``now_ms``, over 12 sagas."""
    oldest = None if oldest_ago_ms is None else now_ms - oldest_ago_ms
    return SweepRecord(swept_at_ms=now_ms - ago_ms, sagas=12, overdue=overdue,
                       oldest_overdue_ms=oldest,
                       oldest_overdue_saga=None if oldest is None else "order-42",
                       oldest_overdue_message=None if oldest is None else "step:charge#2:1",
                       interval_ms=interval_ms)


# --- the verdict ----------------------------------------------------------------------------


def test_a_recent_sweep_with_nothing_overdue_is_healthy() -> None:
    """A sweep 12 s ago of a 30 s interval, nothing overdue: healthy, saying so."""
    verdict = judge(swept(12 * S), NOW_MS, LIMITS)

    assert verdict.healthy
    assert verdict.line == ("the recovery sweep ran 12s ago (every 30s) over 12 unfinished "
                            "sagas; none overdue")


def test_no_sweep_ever_is_unhealthy_and_names_the_task_beat_must_send() -> None:
    """No record at all: the sweep never ran on this store; beat must send it."""
    verdict = judge(None, NOW_MS, LIMITS)

    assert not verdict.healthy
    assert verdict.line.startswith("the recovery sweep has never run on this store: beat "
                                   "must send saga_celery.recover (every 30s)")


def test_a_sweep_older_than_three_intervals_is_unhealthy_saying_when() -> None:
    """Three intervals may pass (90 s at 30 s); past them the line says how long and when."""
    assert judge(swept(90 * S), NOW_MS, LIMITS).healthy
    verdict = judge(swept(91 * S), NOW_MS, LIMITS)

    assert not verdict.healthy
    assert verdict.line == ("the recovery sweep last ran 1m 31s ago (2027-01-15T07:58:29+00:00)"
                            ", more than 3 intervals of 30s: beat must send "
                            "saga_celery.recover and the rollback pool run it")


def test_the_interval_beat_recorded_wins_over_the_apps() -> None:
    """A record of beat's 5 min interval is judged by it, not by the app's 30 s; without
    one, by the app's; ``intervals`` sets how many may pass."""
    assert judge(swept(14 * M, interval_ms=5 * M), NOW_MS, LIMITS).healthy
    assert not judge(swept(2 * M, interval_ms=None), NOW_MS, LIMITS).healthy
    one = Limits(max_overdue=timedelta(minutes=5), intervals=1, interval=timedelta(seconds=30))
    assert not judge(swept(31 * S), NOW_MS, one).healthy


def test_an_overdue_message_older_than_the_limit_is_unhealthy_naming_it() -> None:
    """The oldest overdue message waiting over ``max_overdue``: the line says how many, how
    long, which message of which saga."""
    verdict = judge(swept(10 * S, oldest_ago_ms=7 * M + 12 * S, overdue=3), NOW_MS, LIMITS)

    assert not verdict.healthy
    assert verdict.line == ("3 overdue messages, the oldest waiting 7m 12s (over 5m): "
                            "step:charge#2:1 of saga order-42; are the worker pools running "
                            "and keeping up?")


def test_an_overdue_message_within_the_limit_is_healthy_but_reported() -> None:
    """Overdue messages younger than ``max_overdue`` are reported in the ok line."""
    verdict = judge(swept(10 * S, oldest_ago_ms=5 * M, overdue=1), NOW_MS, LIMITS)

    assert verdict.healthy
    assert verdict.line.endswith("over 12 unfinished sagas; 1 overdue message, the oldest "
                                 "waiting 5m")


def test_a_stale_sweep_is_reported_before_what_it_saw() -> None:
    """When the sweep is late and saw an old overdue message, the line is about the sweep:
    what it saw is stale too."""
    verdict = judge(swept(3 * M, oldest_ago_ms=2 * 60 * M, overdue=1), NOW_MS, LIMITS)

    assert verdict.line.startswith("the recovery sweep last ran 3m ago")


# --- the command ----------------------------------------------------------------------------


@pytest.fixture
def sagas(app: Celery, monkeypatch: pytest.MonkeyPatch) -> SagaApp:
    """An in-memory ``SagaApp`` with a one-step saga, at ``tests.unit.test_health:SAGAS``."""
    saga_app = SagaApp(app, store=MemoryStore())

    @saga_app.step(name="health.reserve", retries={"limit": 0})
    def reserve() -> str:
        return "reserved"

    monkeypatch.setattr(sys.modules[__name__], "SAGAS", saga_app)
    return saga_app


def health(*args: str) -> Result:
    return cli_runner().invoke(main, ["--app", "tests.unit.test_health:SAGAS", "health", *args])


def now_ms() -> int:
    return int(time.time() * 1000)


def test_health_exits_1_before_any_sweep_and_0_after_one(sagas: SagaApp) -> None:
    """Before any sweep: exit 1, one ``unhealthy:`` line on stderr; after ``recover``: exit
    0, one ``ok:`` line on stdout."""
    before = health()
    sagas.recover()
    after = health()

    assert before.exit_code == 1
    assert before.stdout == ""
    assert before.stderr.startswith("unhealthy: the recovery sweep has never run")
    assert len(before.stderr.splitlines()) == 1
    assert after.exit_code == 0, after.output
    assert after.stdout.startswith("ok: the recovery sweep ran 0s ago (every 30s) over 0 "
                                   "unfinished sagas; none overdue")
    assert len(after.stdout.splitlines()) == 1


def test_health_exits_1_when_the_sweep_is_late(sagas: SagaApp) -> None:
    """A record from beat's 10 s sweep 31 s ago: exit 1 with ``--intervals 3``, 0 with 4."""
    sagas._store.record_sweep(swept(31 * S, interval_ms=10 * S, now_ms=now_ms()))

    late = health()
    lenient = health("--intervals", "4")

    assert late.exit_code == 1
    assert late.stderr.startswith("unhealthy: the recovery sweep last ran 31s ago")
    assert lenient.exit_code == 0, lenient.output


def test_health_exits_1_when_a_saga_waits_too_long_for_its_first_message(
        sagas: SagaApp) -> None:
    """A saga whose first message never started, swept with no grace: ``--max-overdue 0``
    names it and exits 1; the default five minutes lets it pass, reporting it."""
    sagas.saga("refill", [sagas.app.tasks["health.reserve"].s()]).apply_async(saga_id="r-1")
    sagas.recover(grace=timedelta(0))
    time.sleep(0.002)

    strict = health("--max-overdue", "0")
    default = health()

    assert strict.exit_code == 1
    assert strict.stderr.startswith("unhealthy: 1 overdue message, the oldest waiting 0s "
                                    "(over 0s): step:health.reserve#1:1 of saga r-1;")
    assert default.exit_code == 0
    assert "1 overdue message" in default.stdout


def test_health_exits_1_with_one_line_when_redis_cannot_be_reached() -> None:
    """A store nobody listens on: exit 1, one ``unhealthy:`` line naming where, no password."""
    result = cli_runner().invoke(main, ["--redis-url", "redis://:s3cret@127.0.0.1:1/0",
                                       "health"])

    assert result.exit_code == 1
    assert result.stderr.startswith("unhealthy: Redis at 127.0.0.1:1/0 cannot be reached")
    assert len(result.stderr.splitlines()) == 1
    assert "s3cret" not in result.output


@pytest.mark.parametrize("args", [["--max-overdue", "soon"], ["--intervals", "0"]])
def test_health_with_a_bad_limit_is_a_usage_error(sagas: SagaApp, args: list[str]) -> None:
    """A limit that is not a duration or a positive count: exit status 2."""
    assert health(*args).exit_code == 2
