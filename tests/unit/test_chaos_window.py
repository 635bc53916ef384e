"""The chaos run's broker-window verdict (``tests.chaos.window``) on a hand-written AOF."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from saga_celery._core.model import Kind
from tests.chaos.broker import replay
from tests.chaos.check import ChaosEvent
from tests.chaos.report import _resent
from tests.chaos.window import ConsumerEnd, awaited_items, classify, consumer_ends
from tests.unit.sim import Sim, plan
from tests.unit.test_chaos_broker import SAGA, _aof, _delivered, _message, _resp

T = 1_700_000_000
ITEM = "step:chaos.reserve#1:1"
AWAITED = [(f"outbox {ITEM} (never started)", ITEM)]


def _killed(t: float, worker: str = "chaos0g1-abc") -> ConsumerEnd:
    return ConsumerEnd(t, worker, "SIGKILLed by the chaos run (main process and pool)")


def _taken_never_recorded(tmp_path: Path) -> Path:
    return _aof(tmp_path, f"#TS:{T}\r\n".encode(), _resp("LPUSH", "saga.steps", _message("t1")),
                _resp("RPOP", "saga.steps"), f"#TS:{T + 1}\r\n".encode(),
                _resp("SET", "other", "x"))


def test_a_take_never_recorded_as_its_worker_was_killed_is_in_the_window(
        tmp_path: Path) -> None:
    """The awaited message's latest take, never recorded, with its worker SIGKILLed in that
    second: the saga stalled in the broker window, and the evidence names the taker."""
    verdict = classify(SAGA, AWAITED, replay(_taken_never_recorded(tmp_path)),
                       [_killed(T + 0.5)], [])
    assert verdict.in_window
    [evidence] = verdict.evidence
    assert evidence["waits_for"] == AWAITED[0][0]
    assert evidence["taker"] == "chaos0g1-abc"
    assert "AOF command 2" in evidence["taken"]
    assert evidence["life"].startswith("sent to saga.steps")
    assert "SIGKILLed" in evidence["taker_ended"][0]


def test_a_take_with_no_consumer_ending_near_it_is_not_in_the_window(tmp_path: Path) -> None:
    """Taken and never recorded, but no consumer ended then: nothing explains it."""
    verdict = classify(SAGA, AWAITED, replay(_taken_never_recorded(tmp_path)),
                       [_killed(T + 10)], [])
    assert not verdict.in_window
    assert "no consumer ended near then" in verdict.reason


def test_a_message_delivered_after_the_lost_one_keeps_the_saga_stalled(tmp_path: Path) -> None:
    """A later message of the same attempt delivered and acked: the loss is not why the saga
    waits, so it stays stalled."""
    second = _message("t2")
    directory = _aof(tmp_path, f"#TS:{T}\r\n".encode(),
                     _resp("LPUSH", "saga.steps", _message("t1")), _resp("RPOP", "saga.steps"),
                     _resp("LPUSH", "saga.steps", second), *_delivered("t2", second),
                     _resp("HDEL", "unacked", "t2"))
    verdict = classify(SAGA, AWAITED, replay(directory), [_killed(T)], [])
    assert not verdict.in_window
    assert "latest message was acked" in verdict.reason


def test_an_attempt_with_no_message_or_one_still_queued_stays_stalled(tmp_path: Path) -> None:
    """No message carrying the attempt ever sent, or one still in its queue: not the window."""
    directory = _aof(tmp_path, _resp("LPUSH", "saga.steps", _message("t1", attempt=2)))
    broker = replay(directory)
    assert "no message carrying it" in classify(SAGA, AWAITED, broker, [], []).reason
    other = [("open step:chaos.reserve#1:2", "step:chaos.reserve#1:2")]
    assert "still queued" in classify(SAGA, other, broker, [], []).reason


def test_every_awaited_message_must_be_lost_in_the_window(tmp_path: Path) -> None:
    """One awaited message lost in the window and another never sent: stalled, not window."""
    awaited = [*AWAITED, ("outbox step:chaos.reserve#1:2", "step:chaos.reserve#1:2")]
    verdict = classify(SAGA, awaited, replay(_taken_never_recorded(tmp_path)),
                       [_killed(T)], [])
    assert not verdict.in_window
    assert verdict.reason.startswith("outbox step:chaos.reserve#1:2")
    assert not classify(SAGA, [], replay(tmp_path), [], []).in_window


def test_a_take_just_before_redis_shut_down_names_every_worker_that_lost_its_connection(
        tmp_path: Path) -> None:
    """Redis shut down with the reply in flight: each worker that logged a lost connection
    can have taken it, and the evidence counts the commands between take and shutdown."""
    directory = _aof(tmp_path, f"#TS:{T}\r\n".encode(),
                     _resp("LPUSH", "saga.steps", _message("t1")), _resp("RPOP", "saga.steps"),
                     _resp("SET", "k", "v"), f"#TS:{T + 6}\r\n".encode(), _resp("SET", "k", "w"))
    stamp = datetime.fromtimestamp(T + 0.2)
    redis_log = tmp_path / "redis.log"
    redis_log.write_text(f"1:M {stamp:%d %b %Y %H:%M:%S}.100 # User requested shutdown...\n")
    line = (f"[{stamp:%Y-%m-%d %H:%M:%S},150: WARNING/MainProcess] consumer: Connection to "
            "broker lost. Trying to re-establish the connection...")
    ends = consumer_ends([], [("chaos0g1-abc", line), ("chaos1g1-def", line),
                              ("chaos1g1-def", "[x] Task received")], redis_log)
    assert [e.worker for e in ends] == ["chaos0g1-abc", "chaos1g1-def"]
    assert "Redis shut down at" in ends[0].what
    verdict = classify(SAGA, AWAITED, replay(directory), ends, [T + 0.1])
    [evidence] = verdict.evidence
    assert evidence["taker"] == "one of chaos0g1-abc, chaos1g1-def"
    assert "(1 commands before Redis shut down at" in evidence["taken"]


def test_consumer_ends_are_whole_worker_kills_and_logged_crashes(tmp_path: Path) -> None:
    """A pool-process kill ends no consumer; a whole-worker kill and a crash do."""
    crash = "[2026-01-01 00:00:05,000: CRITICAL/MainProcess] Unrecoverable error: UnpicklingError()"
    ends = consumer_ends([ChaosEvent(t=T, kind="kill", detail="one pool process"),
                          ChaosEvent(t=T, kind="kill", detail="whole", worker="chaos2g1-x")],
                         [("chaos0g1-abc", crash)], tmp_path / "no-redis.log")
    assert [(e.worker, e.what) for e in ends] == [
        ("chaos2g1-x", "SIGKILLed by the chaos run (main process and pool)"),
        ("chaos0g1-abc", "main process crashed (Unrecoverable error: UnpicklingError)")]


def test_a_saga_awaits_its_outbox_entries_and_its_open_attempts() -> None:
    """Outbox entries never started and attempts started and never ended, by dispatch id."""
    sim = Sim.start(plan("a", ["b", "c"]))
    assert [item for _, item in awaited_items(sim.run)] == ["step:a#1:1"]
    sim.run_step("a")
    sim.start_step("b")
    assert sorted(item for _, item in awaited_items(sim.run)) == ["step:b#1:1", "step:c#1:1"]
    sim.ok("b")
    sim.start_step("c")
    sim.fail("c", retryable=False)
    assert [label for label, _ in awaited_items(sim.run)] == [
        "outbox rollback:c#1:1 (never started)"]
    sim.start_step("c", kind=Kind.ROLLBACK)
    assert [label for label, _ in awaited_items(sim.run)] == [
        "open rollback:c#1:1 (started, never ended)"]


def test_a_lost_message_counts_as_resent_when_the_sweep_logged_its_attempt(
        tmp_path: Path) -> None:
    """With beat the sweep's ``saga.recovered`` line names the attempt a lost message carried."""
    lost = replay(_taken_never_recorded(tmp_path)).lost()
    line = (f"[warning  ] saga.recovered                 messages=['rollback:x#1:1', '{ITEM}'] "
            f"saga_id={SAGA}\n")
    assert _resent(lost, ["nothing\n", line]) == lost
    assert _resent(lost, [line.replace(SAGA, "chaos-1-00002")]) == []
