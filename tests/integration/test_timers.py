"""Timers in the store on real prefork workers and real Redis (SPEC section 8).

The app's Redis transport redelivers a message held longer than 5 s; its retry delays are
20 s.  Each retry waits as a timer in the saga store and a worker's timer poller sends it
when due: exactly the configured attempts, each started within 2 s of its due time, also
when the worker that recorded the timer is SIGKILLed while it is pending.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from itertools import pairwise
from types import ModuleType

import pytest
import redis

from saga_celery import SagaState
from tests.integration.harness import WorkerFactory, wait_until
from tests.integration.waiting_fixtures import env, ledger, start, timers, waiting

pytestmark = pytest.mark.integration

__all__ = ["env", "waiting"]  # fixtures
ON_TIME = timedelta(seconds=2)
"""How late after its due time a timer's attempt may start (SPEC section 8)."""


def _assert_on_time(state: SagaState, step: str, delay: timedelta) -> None:
    """Each attempt after the first started within ``ON_TIME`` of its due time: ``delay``
    after the attempt before it ended."""
    attempts = state.step(step).attempts
    for before, after in pairwise(attempts):
        assert before.ended_at is not None
        due = before.ended_at + delay
        assert due <= after.started_at <= due + ON_TIME, (before, after)


def test_a_retry_delay_four_times_the_visibility_timeout_fires_each_attempt_on_time(
        waiting: ModuleType, worker_factory: WorkerFactory, env: dict[str, str], prefix: str,
        redis_client: redis.Redis) -> None:
    """A constant 20 s retry delay under a 5 s visibility timeout: exactly 3 attempts (limit
    2), each started within 2 s of its due time, then the rollback; no timer left over."""
    start(worker_factory, env, prefix)
    saga_id = f"t-{uuid.uuid4().hex[:10]}"
    state = waiting.retrying.apply_async(saga_id=saga_id).wait(timeout=90)
    assert state.status == "errored"
    assert [a.attempt for a in state.step("waiting.flaky").attempts] == [1, 2, 3]
    _assert_on_time(state, "waiting.flaky", timedelta(seconds=waiting.RETRY_DELAY_S))
    runs = [e for e in ledger(waiting, saga_id) if e["kind"] == "flaky"]
    assert [e["attempt"] for e in runs] == [1, 2, 3]  # each body ran once: no redelivery
    assert [e["kind"] for e in ledger(waiting, saga_id)][-1] == "unbook"
    assert timers(redis_client, prefix) == 0


def test_a_pending_timer_survives_the_worker_that_recorded_it(
        waiting: ModuleType, worker_factory: WorkerFactory, env: dict[str, str], prefix: str,
        redis_client: redis.Redis) -> None:
    """The only worker is SIGKILLed (its whole process group) while the first retry's timer
    is pending; a new worker fires it and the next within 2 s of due: still 3 attempts."""
    first = start(worker_factory, env, prefix)
    saga_id = f"t-{uuid.uuid4().hex[:10]}"
    handle = waiting.retrying.apply_async(saga_id=saga_id)
    assert wait_until(lambda: timers(redis_client, prefix) == 1, timeout=30)
    first.kill()
    start(worker_factory, env, prefix)
    state = handle.wait(timeout=90)
    assert state.status == "errored"
    assert [a.attempt for a in state.step("waiting.flaky").attempts] == [1, 2, 3]
    _assert_on_time(state, "waiting.flaky", timedelta(seconds=waiting.RETRY_DELAY_S))
    runs = [e for e in ledger(waiting, saga_id) if e["kind"] == "flaky"]
    assert [e["attempt"] for e in runs] == [1, 2, 3]
    assert timers(redis_client, prefix) == 0


def test_retry_later_sets_the_next_delay(
        waiting: ModuleType, worker_factory: WorkerFactory, env: dict[str, str],
        prefix: str) -> None:
    """``RetryLater("15 seconds")`` in place of the policy's 1 s: the retry starts within 2 s
    of 15 s after the first attempt ended (a timer, past max_countdown), and completes."""
    start(worker_factory, env, prefix)
    saga_id = f"t-{uuid.uuid4().hex[:10]}"
    state = waiting.called_back.apply_async(saga_id=saga_id).wait(timeout=60)
    assert state.status == "complete"
    assert state.output == 8
    later = state.step("waiting.later").attempts
    assert [a.attempt for a in later] == [1, 2]
    assert later[0].error is not None and later[0].error.type == "RetryLater"
    _assert_on_time(state, "waiting.later", timedelta(seconds=waiting.LATER_DELAY_S))


def test_a_thirty_second_sleep_survives_its_worker_and_ends_on_time(
        waiting: ModuleType, worker_factory: WorkerFactory, env: dict[str, str], prefix: str,
        redis_client: redis.Redis) -> None:
    """A 30 s sleep under a 5 s visibility timeout, its only worker SIGKILLed while it
    sleeps: a new worker ends it within 2 s of due, the next step gets the output from
    before the sleep, and every step ran once."""
    first = start(worker_factory, env, prefix)
    saga_id = f"t-{uuid.uuid4().hex[:10]}"
    handle = waiting.sleeping.apply_async(saga_id=saga_id)
    assert wait_until(lambda: handle.status().step("cool-off").status == "running",
                      timeout=30)
    first.kill()
    start(worker_factory, env, prefix)
    state = handle.wait(timeout=90)
    assert (state.status, state.output) == ("complete", 9)
    slept = state.step("cool-off")
    assert slept.kind == "sleep"
    (attempt,) = slept.attempts
    assert attempt.ended_at is not None
    due = attempt.started_at + timedelta(seconds=waiting.SLEEP_S)
    assert due <= attempt.ended_at <= due + ON_TIME
    kinds = [(e["kind"], e.get("got")) for e in ledger(waiting, saga_id)]
    assert kinds == [("book", None), ("ship", 9)]
    assert timers(redis_client, prefix) == 0


def test_an_event_sent_before_its_wait_and_twice_with_one_id_counts_once(
        waiting: ModuleType, worker_factory: WorkerFactory, env: dict[str, str],
        prefix: str) -> None:
    """Sent right after the start (before the wait began) and again with the same
    ``event_id``: the wait takes it once, and the next step gets its payload."""
    start(worker_factory, env, prefix)
    saga_id = f"t-{uuid.uuid4().hex[:10]}"
    handle = waiting.approval.apply_async(saga_id=saga_id)
    handle.send_event("approval", {"by": "ann"}, event_id="mail-1")
    handle.send_event("approval", {"by": "ann"}, event_id="mail-1")
    state = handle.wait(timeout=30)
    assert (state.status, state.output) == ("complete", {"by": "ann"})
    assert [e["type"] for e in handle.events()].count("event_received") == 1


def test_an_event_that_never_comes_times_out_and_rolls_back(
        waiting: ModuleType, worker_factory: WorkerFactory, env: dict[str, str],
        prefix: str) -> None:
    """No event within the 8 s timeout: ``EventTimeoutError``, the booked step is undone, and
    an event sent to the ended saga is refused with ``SagaStateError``."""
    from saga_celery import SagaStateError

    start(worker_factory, env, prefix)
    saga_id = f"t-{uuid.uuid4().hex[:10]}"
    handle = waiting.approval.apply_async(saga_id=saga_id)
    state = handle.wait(timeout=40)
    assert state.status == "errored"
    assert state.error is not None and state.error.type == "EventTimeoutError"
    wait = state.step("wait:approval")
    assert (wait.kind, wait.status) == ("wait", "errored")
    assert [e["kind"] for e in ledger(waiting, saga_id)] == ["book", "unbook"]
    with pytest.raises(SagaStateError):
        handle.send_event("approval", "too late")
