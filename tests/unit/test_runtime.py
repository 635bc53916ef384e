"""What a saga task does when it runs (``_celery/runtime.py``), on the in-memory store.

A step "runs" by ``Task.apply`` of its message in this process, as a worker would (the main
thread: the solo pool's way, an alarm for the timeout).  Messages the runtime sends are
caught as Celery publishes them (``before_task_publish``).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, group
from celery.signals import before_task_publish

from saga_celery import RetryLater, SagaApp, SagaState
from saga_celery._celery import runtime as runtime_module
from saga_celery._celery import timeouts
from saga_celery._celery.control import CONTROL_KEY, Control
from saga_celery._celery.dispatch import build_message
from saga_celery._celery.runtime import BEHIND_MAX_COUNTDOWN_S, LEASE_MARGIN_S
from saga_celery._core.events import AttemptStarted, AttemptSucceeded
from saga_celery._core.model import Kind
from saga_celery._engine import Lease, lease_name

QUICK = {"limit": 0, "delay": 0}


@pytest.fixture
def sent() -> Iterator[list[dict[str, Any]]]:
    """The headers and body of every task message published during the test."""
    seen: list[dict[str, Any]] = []

    def record(body: Any = None, headers: Any = None, **_: Any) -> None:
        seen.append({"headers": dict(headers or {}), "body": body})

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


def run_due(sagas: SagaApp, saga_id: str, *, after: int | None = None) -> None:
    """Run every due message of the saga here, as a worker would, until none is left."""
    for _ in range(20):
        run = sagas._store.load(saga_id).run  # type: ignore[union-attr]
        if not run.outbox:
            return
        for dispatch in list(run.outbox.values()):
            message = build_message(run, dispatch, sagas._dispatcher.clock(), after)
            sagas.app.tasks[message.task].apply(args=message.args, kwargs=message.kwargs,
                                                task_id=message.task_id,
                                                retries=message.retries)


def state(sagas: SagaApp, saga_id: str) -> SagaState:
    return sagas.run(saga_id).status()


# --- outputs are their JSON round trip -----------------------------------------------------


def test_a_tuple_output_and_int_keys_at_any_depth_are_stored_as_json_delivers_them(
        app: Celery, sagas: SagaApp) -> None:
    """A tuple becomes a list and an int dict key a string, at any depth; the next step gets
    that, and the saga completes (the end was not recorded at all before: the body ran
    again until WorkerLost)."""
    got: list[Any] = []

    @sagas.step(name="t.pair", retries=QUICK)
    def pair() -> Any:
        return (1, {2: {3: (4, 5)}})

    @sagas.step(name="t.take", retries=QUICK)
    def take(previous: Any) -> Any:
        got.append(previous)
        return previous

    sagas.saga("round-trip", [pair.s(), take.s()]).apply_async(saga_id="rt-1")
    run_due(sagas, "rt-1")
    final = state(sagas, "rt-1")
    assert final.status == "complete"
    assert got == [[1, {"2": {"3": [4, 5]}}]]
    assert final.step("t.pair").output == [1, {"2": {"3": [4, 5]}}]


# --- a timeout is a timeout on every pool ----------------------------------------------------


def test_a_body_that_swallows_the_timeout_alarm_is_a_timed_out_attempt(
        app: Celery, sagas: SagaApp) -> None:
    """Solo pool: ``except Exception`` around the work swallows the alarm; the attempt is
    still a failed, timed-out one, not a success."""
    @sagas.step(name="t.swallow", retries=QUICK, timeout=200)
    def swallow() -> str:
        try:
            time.sleep(2)
        except Exception:  # what careless code does: swallows the timeout too
            return "done anyway"
        return "done"

    sagas.saga("swallow", [swallow.s()]).apply_async(saga_id="sw-1")
    run_due(sagas, "sw-1")
    (attempt,) = state(sagas, "sw-1").step("t.swallow").attempts
    assert attempt.error is not None and attempt.error.type == "TimeoutError"
    assert state(sagas, "sw-1").status == "errored"


def test_a_body_that_returns_inside_the_hard_limit_grace_is_a_timed_out_attempt(
        app: Celery, sagas: SagaApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefork: a body that caught the soft limit and returned before the hard limit took
    longer than its timeout: recorded as a failed, timed-out attempt."""
    monkeypatch.setattr(timeouts, "_in_pool_child", True)  # Celery's limits apply: no alarm

    @sagas.step(name="t.late", retries=QUICK, timeout=100)
    def late() -> str:
        time.sleep(0.3)  # where SoftTimeLimitExceeded would have been caught and ignored
        return "late"

    sagas.saga("late", [late.s()]).apply_async(saga_id="late-1")
    run_due(sagas, "late-1")
    (attempt,) = state(sagas, "late-1").step("t.late").attempts
    assert attempt.error is not None and attempt.error.type == "TimeoutError"


# --- RetryLater ---------------------------------------------------------------------------


def test_retry_later_sets_the_delay_of_each_retry_within_the_limit(
        app: Celery, sagas: SagaApp) -> None:
    """``raise RetryLater("45 seconds")``: each retry waits the step's own delay, not its
    policy's (10 ms here), and the limit still ends it after 1 + 2 attempts."""
    @sagas.step(name="t.limited", retries={"limit": 2, "delay": 10, "backoff": "constant"})
    def limited() -> None:
        raise RetryLater("45 seconds", "rate limited: Retry-After 45")

    sagas.saga("limited", [limited.s()]).apply_async(saga_id="rl-1")
    run_due(sagas, "rl-1")  # eager: Celery runs each retry at once, whatever its countdown
    errored = [e for e in sagas.run("rl-1").events() if e["type"] == "attempt_errored"]
    assert [e["retry_delay_ms"] for e in errored] == [45_000, 45_000, None]
    assert errored[0]["error"] == {"type": "RetryLater",
                                   "message": "rate limited: Retry-After 45"}
    assert state(sagas, "rl-1").status == "errored"


def test_retry_later_survives_pickling_as_celery_stores_a_task_error() -> None:
    """Rebuilt with its delay and message (not wrapped as an unpicklable exception)."""
    import pickle

    again = pickle.loads(pickle.dumps(RetryLater(1500, "busy")))
    assert (again.delay_ms, str(again)) == (1500.0, "busy")


def test_retry_later_with_a_bad_delay_names_it() -> None:
    """A delay that is not a duration is a clear error naming it."""
    with pytest.raises(ValueError, match="soon"):
        RetryLater("soon")


# --- deliveries that must come back ------------------------------------------------------------


def test_a_duplicate_of_a_running_attempt_comes_back_when_the_lease_can_have_lapsed(
        app: Celery, sagas: SagaApp, sent: list[dict[str, Any]]) -> None:
    """Not every second for the attempt's whole run: once per lease time to live."""
    @sagas.step(name="t.slow", retries=QUICK)
    def slow() -> None:
        return None

    sagas.saga("slow", [slow.s()]).apply_async(saga_id="dup-1")
    run = sagas._store.load("dup-1").run  # type: ignore[union-attr]
    message = build_message(run, next(iter(run.outbox.values())), sagas._dispatcher.clock())
    holder = Lease(lease_name("step", "t.slow#1"), "another-worker", 60_000)
    sagas._engine.handle("dup-1", AttemptStarted(kind=Kind.STEP, key="t.slow#1", attempt=1),
                        lease=holder)
    sent.clear()
    app.tasks["t.slow"].apply(args=message.args, kwargs=message.kwargs,
                              task_id=message.task_id)
    (again,) = sent
    ttl_s = sagas._runtime.settings.lease_ttl_ms / 1000
    assert _countdown(again) == pytest.approx(ttl_s + LEASE_MARGIN_S, abs=0.5)


def test_a_message_ahead_of_its_commit_comes_back_without_using_an_attempt(
        app: Celery, sagas: SagaApp, sent: list[dict[str, Any]]) -> None:
    """A next-step message whose commit the store does not show yet is sent again, soon and
    then less often, carrying how often it waited; it was dropped after ~90 ms before."""
    @sagas.step(name="t.first", retries=QUICK)
    def first() -> None:
        return None

    sagas.saga("ahead", [first.s()]).apply_async(saga_id="ahead-1")
    run = sagas._store.load("ahead-1").run  # type: ignore[union-attr]
    version = sagas._store.load("ahead-1").version  # type: ignore[union-attr]
    message = build_message(run, next(iter(run.outbox.values())), sagas._dispatcher.clock(),
                            after=version + 1)
    sent.clear()
    app.tasks["t.first"].apply(args=message.args, kwargs=message.kwargs,
                               task_id=message.task_id)
    (again,) = sent
    control = Control.parse(again["body"][1][CONTROL_KEY])
    assert (control.after, control.behind) == (version + 1, 1)
    assert 0 < _countdown(again) <= BEHIND_MAX_COUNTDOWN_S
    step = sagas.run("ahead-1").status().step("t.first")
    assert step.status == "pending" and step.attempts == []


def _countdown(message: dict[str, Any]) -> float:
    from datetime import datetime

    eta = datetime.fromisoformat(message["headers"]["eta"])
    return (eta - datetime.now(eta.tzinfo)).total_seconds()


# --- what a handler gets -----------------------------------------------------------------------


def test_a_handler_gets_what_it_needs_to_undo_a_step_that_never_returned(
        app: Celery, sagas: SagaApp) -> None:
    """SPEC 2: the step's own call arguments (the previous stage's output first), the key
    its body saw and its own last error, beside ``output`` (None: it failed)."""
    from saga_celery import NonRetryableError, RollbackContext, current_step

    seen: list[RollbackContext] = []
    keys: list[str] = []

    @sagas.step(name="t.hold", retries=QUICK)
    def hold(sku: str) -> dict[str, str]:
        return {"hold": sku}

    @sagas.step(name="t.pay", retries=QUICK)
    def pay(held: Any, amount: int) -> None:
        keys.append(current_step().idempotency_key)
        raise NonRetryableError("card declined")

    @pay.rollback(retries=QUICK)
    def refund(ctx: RollbackContext) -> None:
        seen.append(ctx)

    sagas.saga("pay", [hold.s("sku-9"), pay.s(amount=12)]).apply_async(saga_id="ctx:1")
    run_due(sagas, "ctx:1")
    (ctx,) = seen
    assert ctx.output is None
    assert (ctx.args, ctx.kwargs) == ([{"hold": "sku-9"}], {"amount": 12})
    assert ctx.step_idempotency_key == keys[0] != ctx.idempotency_key
    assert ctx.step_error == {"type": "NonRetryableError", "message": "card declined"}


# --- the ack waits for the end commit ----------------------------------------------------------


def test_nothing_is_published_or_acked_before_the_end_commit_lands(
        app: Celery, sagas: SagaApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's end commit refused (a sibling's commit came first) is applied again; only
    once one lands do its messages and its ack go out.  Before, they went out with the
    refused commit: a process dying then left its message acked and the end unrecorded,
    for the recovery sweep alone to find."""
    from saga_celery._engine import Engine

    other = Engine(sagas._store)  # another worker, finishing the sibling meanwhile
    trace: list[str] = []
    commit, send, ack = sagas._store.commit, sagas._dispatcher.send, sagas._dispatcher._ack

    def traced_commit(run: Any, **kwargs: Any) -> bool:
        landed = commit(run, **kwargs)
        trace.append(f"commit:{'landed' if landed else 'refused'}")
        return landed

    def traced_send(run: Any, dispatches: Any, **kwargs: Any) -> None:
        trace.append(f"send:{len(dispatches)}")
        send(run, dispatches, **kwargs)

    def traced_ack(pending: Any) -> None:
        trace.append("ack")
        ack(pending)

    monkeypatch.setattr(sagas._store, "commit", traced_commit)
    monkeypatch.setattr(sagas._dispatcher, "send", traced_send)
    monkeypatch.setattr(sagas._dispatcher, "_ack", traced_ack)

    @sagas.step(name="t.left", retries=QUICK)
    def left() -> str:
        for event in (AttemptStarted(kind=Kind.STEP, key="t.right#1", attempt=1),
                      AttemptSucceeded(kind=Kind.STEP, key="t.right#1", attempt=1,
                                       output="R")):
            other.handle("ack-1", event)
        trace.append("body")
        return "L"

    @sagas.step(name="t.right", retries=QUICK)
    def right() -> str:
        return "R"

    @sagas.step(name="t.next", retries=QUICK)
    def after(outputs: Any) -> Any:
        return outputs

    sagas.saga("ack", [group(left.s(), right.s()), after.s()]).apply_async(saga_id="ack-1")
    run = sagas._store.load("ack-1").run  # type: ignore[union-attr]
    message = build_message(run, run.outbox["step:t.left#1:1"], sagas._dispatcher.clock())
    trace.clear()
    app.tasks["t.left"].apply(args=message.args, kwargs=message.kwargs,
                              task_id=message.task_id)
    ended = trace[trace.index("body") + 1:]
    assert ended[:2] == ["commit:refused", "commit:landed"], trace
    assert ended[2:] == ["send:1", "ack"], trace  # the next stage, then the step's own ack


# --- an unreachable store or broker -------------------------------------------------------------


@pytest.mark.parametrize("fails", ["start", "end"])
def test_a_message_whose_bookkeeping_cannot_reach_the_store_is_handed_back(
        app: Celery, sagas: SagaApp, monkeypatch: pytest.MonkeyPatch, fails: str) -> None:
    """Redis restarting under a task: its message is rejected with requeue (delivered
    again) rather than failed, which Celery acknowledges, leaving the saga to the sweep."""
    from celery.exceptions import Reject

    from saga_celery import SagaStoreUnavailableError
    from saga_celery._celery import runtime

    monkeypatch.setattr(runtime, "UNREACHABLE_PAUSE_S", 0.0)
    commits = [0]
    commit = sagas._store.commit

    def flaky(run: Any, **kwargs: Any) -> bool:
        commits[0] += 1
        if commits[0] == (1 if fails == "start" else 2):
            raise SagaStoreUnavailableError("Redis at 127.0.0.1:6379 cannot be reached")
        return commit(run, **kwargs)

    monkeypatch.setattr(sagas._store, "commit", flaky)

    @sagas.step(name="t.work", retries=QUICK)
    def work() -> str:
        return "done"

    sagas.saga("work", [work.s()]).apply_async(saga_id="gone-1")
    run = sagas._store.load("gone-1").run  # type: ignore[union-attr]
    message = build_message(run, next(iter(run.outbox.values())), sagas._dispatcher.clock())
    result = app.tasks["t.work"].apply(args=message.args, kwargs=message.kwargs,
                                       task_id=message.task_id)
    assert isinstance(result.result, Reject) and result.result.requeue
    again = app.tasks["t.work"].apply(args=message.args, kwargs=message.kwargs,
                                      task_id=message.task_id)  # the redelivery
    assert again.successful()
    assert state(sagas, "gone-1").status == "complete"


def test_starting_again_after_the_first_send_failed_sends_the_first_stage(
        app: Celery, sagas: SagaApp, sent: list[dict[str, Any]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The create landed but the broker went away before its first message went out: the
    caller's retry of ``apply_async`` (same id, same params) sends it, where before it
    found the saga and sent nothing, leaving it queued for the sweep alone."""
    from kombu.exceptions import OperationalError

    @sagas.step(name="t.once", retries=QUICK)
    def once() -> str:
        return "once"

    definition = sagas.saga("once", [once.s()])
    send = sagas._dispatcher.send

    def broker_down(*_: Any, **__: Any) -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(sagas._dispatcher, "send", broker_down)
    with pytest.raises(OperationalError):
        definition.apply_async(saga_id="again-1", params={"n": 1})
    monkeypatch.setattr(sagas._dispatcher, "send", send)
    sent.clear()
    definition.apply_async(saga_id="again-1", params={"n": 1})
    assert [m["headers"]["task"] for m in sent] == ["t.once"]
    sent.clear()
    run_due(sagas, "again-1")
    definition.apply_async(saga_id="again-1", params={"n": 1})  # started: nothing again
    assert [m["headers"]["task"] for m in sent] == []


def test_a_retry_that_cannot_be_published_hands_its_message_back(
        app: Celery, sagas: SagaApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery's ``Task.retry`` rejects without requeue when its publish fails, which drops
    the message and the retry with it; the runtime rejects with requeue instead."""
    from celery.exceptions import Reject

    @sagas.step(name="t.flaky", retries={"limit": 2, "delay": 0})
    def flaky() -> None:
        raise RuntimeError("boom")

    sagas.saga("flaky", [flaky.s()]).apply_async(saga_id="retry-1")
    run = sagas._store.load("retry-1").run  # type: ignore[union-attr]
    message = build_message(run, next(iter(run.outbox.values())), sagas._dispatcher.clock())

    def unpublishable(self: Any, *_: Any, **__: Any) -> None:
        raise Reject(ConnectionError("broker gone"), requeue=False)  # what Task.retry raises

    monkeypatch.setattr(type(app.tasks["t.flaky"]), "retry", unpublishable)
    result = app.tasks["t.flaky"].apply(args=message.args, kwargs=message.kwargs,
                                        task_id=message.task_id)
    assert isinstance(result.result, Reject) and result.result.requeue
    retry = sagas._store.load("retry-1").run.outbox  # type: ignore[union-attr]
    assert list(retry) == ["step:t.flaky#1:2"]  # still due: its redelivery sends it


@pytest.fixture
def prefork_soft_limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process as a prefork child: Celery's limits apply (no alarm of ours) and its
    soft limit arrives as billiard's ``SIGUSR1`` handler raising ``SoftTimeLimitExceeded``."""
    from billiard.pool import soft_timeout_sighandler

    monkeypatch.setattr(timeouts, "_in_pool_child", True)
    monkeypatch.setattr(timeouts, "soft_limit_gate", timeouts.SoftLimitGate())
    monkeypatch.setattr(runtime_module, "soft_limit_gate", timeouts.soft_limit_gate)
    previous = signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
    yield
    signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("fires", ["start", "end"])
def test_a_soft_time_limit_that_lands_outside_the_body_is_held_back_from_bookkeeping(
        app: Celery, sagas: SagaApp, monkeypatch: pytest.MonkeyPatch,
        prefork_soft_limit: None, fires: str) -> None:
    """Celery's soft limit is a signal: after a pause (a stopped worker) it lands wherever
    the child is, here in the commit that records the start or the end.  Before, the
    exception broke the bookkeeping (handed back; inside pydantic's serializer it became a
    ``PydanticSerializationError`` and the task failed with the attempt left open: a saga
    only the sweep could finish, seen in the no-beat chaos run).  Now it reaches only the
    body: one that had not begun is a timed-out attempt; one that had ended is recorded."""
    commits = [0]
    commit = sagas._store.commit

    def interrupted(run: Any, **kwargs: Any) -> bool:
        commits[0] += 1
        if commits[0] == (1 if fires == "start" else 2):
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs here, mid-commit
        return commit(run, **kwargs)

    monkeypatch.setattr(sagas._store, "commit", interrupted)
    bodies = [0]

    @sagas.step(name="t.paused", retries=QUICK)
    def paused() -> str:
        bodies[0] += 1
        return "done"

    sagas.saga("paused", [paused.s()]).apply_async(saga_id="paused-1")
    run_due(sagas, "paused-1")
    saga = state(sagas, "paused-1")
    (attempt,) = saga.step("t.paused").attempts
    if fires == "start":
        assert bodies == [0]
        assert attempt.error is not None and attempt.error.type == "TimeoutError"
        assert saga.status == "errored"
    else:
        assert bodies == [1]
        assert attempt.error is None and saga.status == "complete"


def test_a_body_that_swallows_its_soft_time_limit_early_is_a_timed_out_attempt(
        app: Celery, sagas: SagaApp, prefork_soft_limit: None) -> None:
    """Celery's soft limit counts from when the task began, before the commit that records
    the attempt's start, so under load it reaches the body before the timeout has passed
    from where the attempt is timed.  A body that swallows it (``except Exception``) and
    returns at once is still a timed-out attempt, not a success (seen failing in the fresh
    clone's CI run: ``test_pools.py::...swallows_its_timeout...[prefork]``)."""
    from celery.exceptions import SoftTimeLimitExceeded

    swallowed: list[str] = []

    @sagas.step(name="t.careless", retries=QUICK, timeout="10 seconds")
    def careless() -> str:
        try:
            os.kill(os.getpid(), signal.SIGUSR1)  # the soft limit, well inside 10 s
            time.sleep(1)
        except SoftTimeLimitExceeded as exc:
            swallowed.append(type(exc).__name__)
        return "as if all went well"

    sagas.saga("careless", [careless.s()]).apply_async(saga_id="careless-1")
    run_due(sagas, "careless-1")
    saga = state(sagas, "careless-1")
    (attempt,) = saga.step("t.careless").attempts
    assert swallowed == ["SoftTimeLimitExceeded"]
    assert attempt.error is not None and attempt.error.type == "TimeoutError"
    assert saga.status == "errored"


def test_outside_saga_tasks_the_soft_limit_raises_as_before(prefork_soft_limit: None) -> None:
    """The gate stands in front of billiard's handler only during a saga task."""
    from celery.exceptions import SoftTimeLimitExceeded

    timeouts.soft_limit_gate.begin()
    timeouts.soft_limit_gate.end()
    with pytest.raises(SoftTimeLimitExceeded):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)


def test_a_publish_that_fails_inside_kombu_is_a_failed_publish(
        app: Celery, sagas: SagaApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu 5.7's AttributeError from a publish retried while Redis restarts reaches the
    task as kombu's OperationalError, so its message is handed back, not failed."""
    from kombu.exceptions import OperationalError

    def broken(*_: Any, **__: Any) -> None:
        raise AttributeError("'NoneType' object has no attribute 'declare'")

    monkeypatch.setattr(sagas._dispatcher, "_publish_to", broken)

    @sagas.step(name="t.lonely", retries=QUICK)
    def lonely() -> None:
        return None

    with pytest.raises(OperationalError, match="publishing saga messages failed"):
        sagas.saga("lonely", [lonely.s()]).apply_async(saga_id="lonely-1")


def test_a_hard_timeout_is_recorded_and_the_dead_childs_lease_freed_in_one_commit(
        app: Celery, sagas: SagaApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main process records the killed attempt as timed out and gives back the child's
    lease in the same commit, so a retry due at once finds it free (it was two writes: a
    retry between them found the lease held and errored after 200 rounds)."""
    @sagas.step(name="t.killed", retries={"limit": 1, "delay": 0})
    def killed() -> None:
        return None

    sagas.saga("killed", [killed.s()]).apply_async(saga_id="hard-1")
    token = "host-1:4242:task-7:1:140"  # hostname:pid:task id:attempt:thread
    lease = Lease(lease_name("step", "t.killed#1"), token, 60_000)
    sagas._engine.handle("hard-1", AttemptStarted(kind=Kind.STEP, key="t.killed#1", attempt=1),
                         lease=lease)
    commits: list[Any] = []
    releases: list[Any] = []
    commit, release = sagas._store.commit, sagas._store.release_lease
    monkeypatch.setattr(sagas._store, "commit",
                        lambda run, **kw: commits.append(kw["lease"]) or commit(run, **kw))
    monkeypatch.setattr(sagas._store, "release_lease",
                        lambda *a: releases.append(a) or release(*a))
    control = Control(saga_id="hard-1", kind=Kind.STEP, key="t.killed#1", step="t.killed",
                      count=1, attempt=1)
    sagas._runtime.record_hard_timeout(control, "host-1", 4242, "task-7", 1.0)
    assert [c.token for c in commits] == [token] and releases == []
    assert sagas._store.load("hard-1", lease=lease.name).lease_holder is None  # type: ignore[union-attr]
    (attempt,) = sagas.run("hard-1").status().step("t.killed").attempts
    assert attempt.error is not None and attempt.error.type == "TimeoutError"
