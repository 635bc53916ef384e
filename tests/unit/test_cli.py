"""``saga-celery``: every command through click's runner, on an in-memory ``SagaApp``.

The app under test is reached the way a user reaches theirs, ``--app MODULE:ATTR``: each test
puts a fresh ``SagaApp`` (in-memory broker and store) at ``tests.unit.test_cli:SAGAS``.
Sagas are driven as a worker would drive them, by ``Task.apply`` of their due messages.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from click.testing import Result
from kombu.exceptions import OperationalError

from saga_celery import NonRetryableError, RollbackContext, SagaApp, SagaState, current_step
from saga_celery._celery.dispatch import build_message
from saga_celery._store.memory import MemoryStore
from saga_celery.cli import Target, main, redact
from saga_celery.cli.serving import _sigterm_interrupts
from saga_celery.demo import runner
from saga_celery.metrics import MetricsServer
from tests.unit.clirunner import cli_runner

pytestmark = pytest.mark.usefixtures("keep_structlog_config")

SAGAS: SagaApp | None = None
"""The app ``--app tests.unit.test_cli:SAGAS`` loads (set per test)."""
APP = ["--app", "tests.unit.test_cli:SAGAS"]
ONE_ATTEMPT = {"limit": 0}
UNREACHABLE = "redis://user:s3cret@127.0.0.1:1/0"


@pytest.fixture
def sagas(monkeypatch: pytest.MonkeyPatch) -> Iterator[SagaApp]:
    """A shop of two steps with rollbacks, in memory, at ``tests.unit.test_cli:SAGAS``."""
    celery = Celery("cli", broker="memory://", set_as_current=False)
    app = SagaApp(celery, store=MemoryStore())
    _declare_shop(app)
    monkeypatch.setattr(sys.modules[__name__], "SAGAS", app)
    yield app
    celery.close()


def _fail_if_asked(name: str) -> None:
    params = current_step().params
    if isinstance(params, dict) and params.get("fail") == name:
        raise NonRetryableError(f"{name} failed on purpose")


def _declare_shop(app: SagaApp) -> None:
    @app.step(name="cli.reserve", retries=ONE_ATTEMPT)
    def reserve(sku: str) -> dict[str, str]:
        _fail_if_asked("cli.reserve")
        return {"reservation": sku}

    @reserve.rollback(retries=ONE_ATTEMPT)
    def release(ctx: RollbackContext) -> None:
        if isinstance(ctx.params, dict) and ctx.params.get("rollback_fail") == "cli.reserve":
            raise NonRetryableError("release failed on purpose")

    @app.step(name="cli.charge", retries=ONE_ATTEMPT)
    def charge(reservation: dict[str, str]) -> str:
        _fail_if_asked("cli.charge")
        return "charged"

    @charge.rollback(retries=ONE_ATTEMPT)
    def refund(ctx: RollbackContext) -> None:
        return None


def start(sagas: SagaApp, saga_id: str, name: str = "order", **params: Any) -> None:
    """Start an ``order`` (reserve, charge) or a ``refill`` (reserve) saga."""
    steps = {"order": ["cli.reserve", "cli.charge"], "refill": ["cli.reserve"]}[name]
    definition = sagas.saga(name, [_signature(sagas, n, i) for i, n in enumerate(steps)])
    definition.apply_async(saga_id=saga_id, params=params)


def _signature(sagas: SagaApp, name: str, index: int) -> Any:
    task = sagas.app.tasks[name]
    return task.s("sku-1") if index == 0 else task.s()


def drive(sagas: SagaApp, saga_id: str) -> SagaState:
    """Run every due message, as a worker would, until none is left; the final state."""
    for _ in range(20):
        snapshot = sagas._store.load(saga_id)
        assert snapshot is not None
        if not snapshot.run.outbox:
            break
        for dispatch in list(snapshot.run.outbox.values()):
            message = build_message(snapshot.run, dispatch, sagas._dispatcher.clock())
            sagas.app.tasks[message.task].apply(args=message.args, kwargs=message.kwargs,
                                                task_id=message.task_id,
                                                retries=message.retries)
    return sagas.run(saga_id).status()


def cli(*args: str) -> Result:
    return cli_runner().invoke(main, [*APP, *args])


def lines(result: Result) -> list[str]:
    return result.stdout.splitlines()


# --- status -----------------------------------------------------------------------------


def test_status_prints_the_step_table_with_start_order_outcomes_and_attempts(
        sagas: SagaApp) -> None:
    """``status ID`` shows the header, one row per step (start, forward, rollback, attempts)
    and the rollback order of a saga that rolled back."""
    start(sagas, "o-1", fail="cli.charge")
    drive(sagas, "o-1")

    result = cli("status", "o-1")

    assert result.exit_code == 0, result.output
    out = lines(result)
    assert out[0].startswith("saga o-1 (order): status=errored  error=NonRetryableError in "
                             "cli.charge: cli.charge failed on purpose  rollback=complete "
                             "(2/2 steps compensated)")
    assert out[1].startswith("  created 20") and "ended 20" in out[1]
    assert out[2].split() == ["step", "start", "forward", "attempts", "rollback", "rollback",
                              "attempts"]
    assert out[3].split() == ["cli.reserve", "1", "complete", "1", "(ok)", "complete", "1",
                              "(ok)"]
    assert out[4].split() == ["cli.charge", "2", "errored", "1", "(failed)", "complete", "1",
                              "(ok)"]
    assert "  rolled back in reverse start order: cli.charge -> cli.reserve" in out
    assert "    cli.charge step attempt 1: NonRetryableError: cli.charge failed on purpose" in out


def test_status_json_prints_the_saga_state(sagas: SagaApp) -> None:
    """``status ID --json`` prints the ``SagaState`` as JSON that reads back equal."""
    start(sagas, "o-2")
    state = drive(sagas, "o-2")

    result = cli("status", "o-2", "--json")

    assert result.exit_code == 0, result.output
    assert SagaState.model_validate_json(result.stdout) == state
    assert json.loads(result.stdout)["output"] == "charged"


def test_status_of_an_unknown_saga_exits_1_naming_it(sagas: SagaApp) -> None:
    """An unknown id: exit status 1 and one line naming the id, no traceback."""
    result = cli("status", "nope")

    assert result.exit_code == 1
    assert result.stderr.strip() == ("Error: no saga with id 'nope' (never started, or its "
                                     "retention expired)")
    assert result.stdout == ""


# --- list -------------------------------------------------------------------------------


def _ids(result: Result) -> list[str]:
    return [line.split()[0] for line in lines(result)[1:]]


def _three_sagas(sagas: SagaApp) -> None:
    start(sagas, "l-1")
    drive(sagas, "l-1")
    time.sleep(0.002)  # distinct creation times: the index orders by them
    start(sagas, "l-2", fail="cli.reserve")
    drive(sagas, "l-2")
    time.sleep(0.002)
    start(sagas, "l-3", name="refill")


def test_list_shows_the_newest_sagas_first(sagas: SagaApp) -> None:
    """``list`` prints id, name, status, rollback outcome and creation time, newest first."""
    _three_sagas(sagas)

    result = cli("list")

    assert result.exit_code == 0, result.output
    assert lines(result)[0].split() == ["id", "name", "status", "rollback", "created_at"]
    rows = [line.split() for line in lines(result)[1:]]
    assert [row[:4] for row in rows] == [["l-3", "refill", "queued", "-"],
                                        ["l-2", "order", "errored", "complete"],
                                        ["l-1", "order", "complete", "-"]]
    assert all(row[4].startswith("20") for row in rows)


def test_list_filters_by_status_and_name_and_limits(sagas: SagaApp) -> None:
    """``--status``, ``--name`` and ``--limit`` narrow the list."""
    _three_sagas(sagas)

    assert _ids(cli("list", "--status", "errored")) == ["l-2"]
    assert _ids(cli("list", "--name", "order")) == ["l-2", "l-1"]
    assert _ids(cli("list", "--name", "order", "--status", "complete")) == ["l-1"]
    assert _ids(cli("list", "--limit", "1")) == ["l-3"]


def test_list_reads_its_page_of_sagas_in_one_store_read(
        sagas: SagaApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """``list`` reads the sagas of a page together (one round trip to Redis, one archive
    query), never one at a time; with a filter, a page's worth at a time."""
    _three_sagas(sagas)
    store = sagas.reader._store  # type: ignore[attr-defined]
    reads: list[list[str]] = []
    load_runs = store.load_runs
    monkeypatch.setattr(store, "load_runs", lambda ids: reads.append(list(ids)) or
                        load_runs(ids))

    assert _ids(cli("list")) == ["l-3", "l-2", "l-1"]
    assert reads == [["l-3", "l-2", "l-1"]]
    reads.clear()
    assert _ids(cli("list", "--name", "order", "--limit", "2")) == ["l-2", "l-1"]
    assert reads == [["l-3", "l-2"], ["l-1"]]


def test_list_with_no_match_says_so(sagas: SagaApp) -> None:
    """No saga matches: a message and exit status 0."""
    result = cli("list", "--status", "terminated")

    assert (result.exit_code, result.stdout) == (0, "no sagas found\n")


def test_list_corrupt_shows_the_sagas_the_sweep_moved_aside(sagas: SagaApp) -> None:
    """``list --corrupt`` prints each saga the recovery sweep could not read, the most
    recently moved first, with when and why; filters do not apply to it."""
    sagas._store.mark_corrupt("bad-1", "WRONGTYPE: not a hash", at_ms=1_780_315_200_000)
    sagas._store.mark_corrupt("bad-2", "not a saga record", at_ms=1_780_315_201_000)

    result = cli("list", "--corrupt")

    assert result.exit_code == 0, result.output
    assert lines(result) == [
        "id     moved_at                   why",
        "bad-2  2026-06-01T12:00:01+00:00  not a saga record",
        "bad-1  2026-06-01T12:00:00+00:00  WRONGTYPE: not a hash",
    ]
    assert lines(cli("list", "--corrupt", "--limit", "1"))[1:] == [
        "bad-2  2026-06-01T12:00:01+00:00  not a saga record"]
    assert cli("list", "--corrupt", "--status", "errored").exit_code == 2


def test_list_corrupt_with_none_says_so(sagas: SagaApp) -> None:
    """No saga was moved aside: a message and exit status 0."""
    result = cli("list", "--corrupt")

    assert (result.exit_code, result.stdout) == (0, "no corrupt sagas\n")


@pytest.mark.parametrize("args", [["list", "--status", "done"], ["list", "--limit", "0"],
                                  ["status"], ["nosuchcommand"], ["recover", "--grace", "soon"]])
def test_usage_errors_exit_2(sagas: SagaApp, args: list[str]) -> None:
    """Bad options, a missing argument or an unknown command: click's exit status 2."""
    result = cli(*args)

    assert result.exit_code == 2, result.output
    assert "Usage:" in result.stderr


# --- events -----------------------------------------------------------------------------


def test_events_prints_each_event_as_a_json_line(sagas: SagaApp) -> None:
    """``events ID`` prints the saga's events, oldest first, one JSON object a line."""
    start(sagas, "e-1")
    drive(sagas, "e-1")

    result = cli("events", "e-1")

    assert result.exit_code == 0, result.output
    printed = [json.loads(line) for line in lines(result)]
    assert printed == sagas.run("e-1").events()
    assert printed[0]["type"] == "saga_queued" and printed[-1]["type"] == "saga_completed"


def test_events_follow_returns_at_once_for_a_finished_saga(sagas: SagaApp) -> None:
    """``events --follow`` on a saga that already ended prints everything and exits 0."""
    start(sagas, "e-2")
    drive(sagas, "e-2")

    result = cli("events", "e-2", "--follow")

    assert result.exit_code == 0, result.output
    assert len(lines(result)) == len(sagas.run("e-2").events())


def test_events_follow_prints_new_events_until_the_saga_ends(sagas: SagaApp) -> None:
    """``events --follow`` keeps printing as the saga runs and exits 0 once it has ended."""
    start(sagas, "e-3")
    driver = threading.Timer(0.3, drive, args=(sagas, "e-3"))
    driver.start()
    try:
        result = cli("events", "e-3", "--follow")
    finally:
        driver.join()

    assert result.exit_code == 0, result.output
    types = [json.loads(line)["type"] for line in lines(result)]
    assert types[0] == "saga_queued"
    assert types[-1] == "saga_completed"
    assert types == [e["type"] for e in sagas.run("e-3").events()]


def test_events_of_an_unknown_saga_exits_1(sagas: SagaApp) -> None:
    """``events`` of an unknown id: exit status 1."""
    result = cli("events", "nope", "--follow")

    assert result.exit_code == 1
    assert "no saga with id 'nope'" in result.stderr


# --- terminate, retry-rollback, recover ---------------------------------------------------


def test_terminate_with_rollback_stops_and_compensates(sagas: SagaApp) -> None:
    """``terminate ID --rollback`` stops a running saga; its started steps are rolled back."""
    start(sagas, "t-1")

    result = cli("terminate", "t-1", "--rollback", "--reason", "customer cancelled")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("saga t-1: terminate requested (with rollback); status now")
    state = drive(sagas, "t-1")
    assert state.status == "terminated"
    assert state.error is not None
    assert (state.error.type, state.error.message) == ("Terminated", "customer cancelled")


def test_terminate_a_finished_saga_exits_1(sagas: SagaApp) -> None:
    """Terminating a saga that already ended is refused: exit status 1 with the reason."""
    start(sagas, "t-2")
    drive(sagas, "t-2")

    result = cli("terminate", "t-2")

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.output


def test_retry_rollback_resumes_a_failed_rollback(sagas: SagaApp) -> None:
    """``retry-rollback ID`` puts a saga whose rollback failed back to rolling_back."""
    start(sagas, "r-1", fail="cli.charge", rollback_fail="cli.reserve")
    state = drive(sagas, "r-1")
    assert state.rollback is not None and state.rollback.outcome == "failed"

    result = cli("retry-rollback", "r-1")

    assert result.exit_code == 0, result.output
    assert result.stdout == "saga r-1: rollback resumed; status now rolling_back\n"


def test_retry_rollback_of_a_complete_saga_exits_1(sagas: SagaApp) -> None:
    """``retry-rollback`` when no rollback failed is refused: exit status 1."""
    start(sagas, "r-2")
    drive(sagas, "r-2")

    result = cli("retry-rollback", "r-2")

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")


def test_recover_prints_how_many_messages_it_re_sent(sagas: SagaApp) -> None:
    """``recover --grace 0`` re-sends the first step of a saga whose message never started."""
    start(sagas, "v-1")

    result = cli("recover", "--grace", "0")
    nothing = cli("recover", "--grace", "1 hour")

    assert (result.exit_code, result.stdout) == (0, "re-sent 1 message\n")
    assert (nothing.exit_code, nothing.stdout) == (0, "re-sent 0 messages\n")


def test_a_broker_that_cannot_be_reached_exits_1(sagas: SagaApp,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A send that fails on the broker: exit status 1 and a line saying so, no traceback."""
    def refuse(*_: Any) -> None:
        raise OperationalError("Connection refused")

    start(sagas, "b-1")
    monkeypatch.setattr(sagas._dispatcher, "send", refuse)

    result = cli("terminate", "b-1", "--rollback")

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: the Celery broker at memory:")
    assert "Connection refused" in result.stderr


# --- demo and metrics -----------------------------------------------------------------------


@pytest.mark.parametrize("status", [0, 1])
def test_demo_runs_the_librarys_demo_and_exits_with_its_status(
        monkeypatch: pytest.MonkeyPatch, status: int) -> None:
    """``demo`` runs ``saga_celery.demo.runner.main()`` and exits with what it returns."""
    monkeypatch.setattr(runner, "main", lambda: status)

    result = cli_runner().invoke(main, ["demo"])

    assert result.exit_code == status


def test_metrics_serves_prometheus_text_from_the_store(sagas: SagaApp,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``metrics --port 0`` serves /metrics over HTTP with the counters of sagas that ran."""
    scraped: list[str] = []

    def one_round(server: MetricsServer, interval: float, stop: threading.Event) -> None:
        start(sagas, "m-1")
        drive(sagas, "m-1")
        server.poll()
        port = server._server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            scraped.append(reply.read().decode())

    monkeypatch.setattr(MetricsServer, "run", one_round)

    result = cli("metrics", "--port", "0", "--addr", "127.0.0.1", "--interval", "0.5")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("serving saga metrics on http://127.0.0.1:")
    assert 'saga_completed_total{saga="order"} 1.0' in scraped[0]
    assert 'saga_step_attempt_duration_seconds_count{outcome="success",step="cli.charge"} 1.0' \
        in scraped[0]
    assert "saga_exporter_up 1.0" in scraped[0]


# --- which app, and unreachable Redis -----------------------------------------------------


def test_unreachable_redis_exits_1_with_one_line_naming_it_without_password() -> None:
    """Redis that cannot be reached: one line on stderr naming host, port and db; exit 1."""
    for args in (["status", "x"], ["list"], ["events", "x"], ["recover"], ["metrics"]):
        result = cli_runner().invoke(main, ["--redis-url", UNREACHABLE, *args])

        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("Error: Redis at 127.0.0.1:1/0 cannot be reached")
        assert len(result.stderr.strip().splitlines()) == 1
        assert "s3cret" not in result.output
        assert "Traceback" not in result.output


def test_without_app_a_bare_saga_app_is_built_from_the_options() -> None:
    """No ``--app``: a ``SagaApp`` on ``--redis-url``, ``--prefix`` and the queue options."""
    target = Target(redis_url="redis://127.0.0.1:6379/5", prefix="orders:",
                    steps_queue="o.steps", rollbacks_queue="o.rollbacks")

    built = target.sagas()

    assert built._store.prefix == "orders:"  # type: ignore[attr-defined]
    assert built.app.conf.broker_url == "redis://127.0.0.1:6379/5"
    assert (built.router.steps_queue, built.router.rollbacks_queue) == ("o.steps",
                                                                         "o.rollbacks")
    other = Target(broker_url="redis://broker:6379/1").sagas()
    assert other.app.conf.broker_url == "redis://broker:6379/1"


def test_the_environment_chooses_the_app(sagas: SagaApp) -> None:
    """``SAGA_APP`` names the app as ``--app`` does."""
    start(sagas, "env-1")

    result = cli_runner().invoke(main, ["status", "env-1", "--json"],
                                env={"SAGA_APP": "tests.unit.test_cli:SAGAS"})

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == "env-1"


@pytest.mark.parametrize("path", ["tests.unit.no_such_module:sagas",
                                  "tests.unit.test_cli:APP", "tests.unit.test_cli"])
def test_an_app_that_is_not_a_saga_app_is_a_usage_error(path: str) -> None:
    """``--app`` that cannot be imported, or names something else: exit status 2."""
    result = cli_runner().invoke(main, ["--app", path, "list"])

    assert result.exit_code == 2, result.output
    assert "--app" in result.stderr


def test_redact_hides_the_password_only() -> None:
    """URLs in messages keep user, host, port and db, never the password."""
    assert redact("redis://u:pw@h:1/2") == "redis://u:***@h:1/2"
    assert redact("redis://h:1/2") == "redis://h:1/2"


def test_no_command_prints_usage_and_the_commands() -> None:
    """``saga-celery`` alone prints its usage and lists the commands."""
    result = cli_runner().invoke(main, [])

    assert result.exit_code in (0, 2)  # click >= 8.2 treats it as a usage error, 8.1 not
    for command in ("status", "list", "events", "terminate", "retry-rollback", "recover",
                    "demo", "metrics", "health", "send-event", "redrive", "rollback"):
        assert command in result.output


def test_sigterm_stops_the_metrics_command_like_ctrl_c() -> None:
    """While ``metrics`` serves, SIGTERM raises ``KeyboardInterrupt`` (a clean stop), and the
    previous SIGTERM handler is back afterwards."""
    before = signal.getsignal(signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt), _sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this

    assert signal.getsignal(signal.SIGTERM) == before


# --- send-event (SPEC section 8) --------------------------------------------------------


def _awaiting_approval(sagas: SagaApp, saga_id: str) -> None:
    reserve = sagas.app.tasks["cli.reserve"]
    sagas.saga("approved", [reserve.s("sku-1"), sagas.wait_for_event("approval")]
               ).apply_async(saga_id=saga_id)


def test_send_event_delivers_its_json_payload_once_per_event_id(sagas: SagaApp) -> None:
    """``send-event ID TYPE --payload JSON --event-id X`` ends the wait with the payload;
    sent again with the same id it changes nothing."""
    _awaiting_approval(sagas, "e-1")
    drive(sagas, "e-1")
    result = cli("send-event", "e-1", "approval", "--payload", '{"by": "ann"}',
                 "--event-id", "mail-7")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "saga e-1: event 'approval' sent; status now complete"
    assert sagas.run("e-1").status().output == {"by": "ann"}
    again = cli("send-event", "e-1", "approval", "--event-id", "mail-7")
    assert again.exit_code == 1
    assert "is already complete" in again.stderr


def test_send_event_refuses_a_payload_that_is_not_json_and_an_unknown_saga(
        sagas: SagaApp) -> None:
    """A payload that is not JSON is a usage error (2); an unknown saga exits 1."""
    _awaiting_approval(sagas, "e-2")
    bad = cli("send-event", "e-2", "approval", "--payload", "{nope")
    assert bad.exit_code == 2 and "not JSON" in bad.stderr
    unknown = cli("send-event", "nope", "approval")
    assert unknown.exit_code == 1 and "no saga with id 'nope'" in unknown.stderr


# --- redrive / rollback (SPEC section 8) ------------------------------------------------


def _held(sagas: SagaApp, saga_id: str) -> None:
    reserve, charge = sagas.app.tasks["cli.reserve"], sagas.app.tasks["cli.charge"]
    sagas.saga("held", [reserve.s("sku-1"), charge.s()], on_failure="hold").apply_async(
        saga_id=saga_id, params={"fail": "cli.charge"})
    assert drive(sagas, saga_id).status == "held"


def test_redrive_runs_a_held_saga_s_failed_step_again(sagas: SagaApp) -> None:
    """``redrive ID`` of a held saga: running again; of a running one: exit 1."""
    _held(sagas, "h-1")
    result = cli("redrive", "h-1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "saga h-1: redriven; status now running"
    again = cli("redrive", "h-1")
    assert again.exit_code == 1 and "only a held saga can be redriven" in again.stderr


def test_rollback_rolls_a_held_saga_back(sagas: SagaApp) -> None:
    """``rollback ID`` of a held saga starts the rollback."""
    _held(sagas, "h-2")
    result = cli("rollback", "h-2")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "saga h-2: rollback started; status now rolling_back"
    assert drive(sagas, "h-2").status == "errored"
