"""Properties of the pure core: random sagas, delivered by a hostile scheduler, keep their promises.

A plan is drawn at random (1-5 stages, groups of 1-3, handlers, retry limits, rollback mode,
on_rollback_error); then a scheduler plays Celery and the workers.  It keeps the messages in
flight (everything the core dispatched, duplicates included) and the attempts running, and
on each turn picks one thing to happen: a message is delivered, a running attempt succeeds
or fails, an old message is delivered again, an end event is re-sent, a worker dies under a
running attempt, or the saga's owner terminates it or retries its rollback.  Once its chaos
budget is spent it only delivers and finishes until nothing is left in flight.

Every transition is checked (purity, idempotence, the world and the run agree) and every
finished run is checked against SPEC section 4 and 5.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saga_celery._context import rollback_idempotency_key, step_idempotency_key
from saga_celery._core.attempts import open_attempt
from saga_celery._core.events import (
    AttemptFailed,
    AttemptStarted,
    AttemptSucceeded,
    Decision,
    Event,
    EventSent,
    RedriveRequested,
    RetryRollbackRequested,
    RollbackRequested,
    TerminateRequested,
    Transition,
    WakeUp,
)
from saga_celery._core.machine import WORKER_LOST_LIMIT, apply, stage_output
from saga_celery._core.model import (
    ErrorInfo,
    Kind,
    OnRollbackError,
    Plan,
    RollbackMode,
    RollbackOutcome,
    RollbackRun,
    RollbackStatus,
    SagaRun,
    SagaStatus,
    StepRun,
    StepSpec,
    dispatch_id,
)
from saga_celery._core.state import to_state
from saga_celery._store.encoding import decode_run, encode_progress
from saga_celery._store.journal import encode_entry, replay
from tests.unit.sim import Sim, policy

NAMES = ("a", "b", "c", "d")
Msg = tuple[Kind, str, int]
"""A task message as the scheduler sees it: (kind, step key, attempt)."""

PROPERTY = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- random plans ------------------------------------------------------------------------


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """1-5 stages of 1-3 steps; a name keeps one config wherever it appears (one Celery task)."""
    shape = {name: (draw(st.booleans()), draw(st.integers(0, 2)), draw(st.integers(0, 2)))
             for name in NAMES}
    stages = draw(st.lists(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
                           min_size=1, max_size=5))
    seen: Counter[str] = Counter()
    rows = []
    for i, names in enumerate(stages):
        in_group = len(names) > 1 or draw(st.booleans())
        row = []
        for j, name in enumerate(names):
            seen[name] += 1
            handler, limit, rb_limit = shape[name]
            row.append(StepSpec(
                key=f"{name}#{seen[name]}", name=name, count=seen[name], stage=i, index=j,
                task=name, in_group=in_group, policy=policy(limit),
                rollback_task=f"{name}.rollback" if handler else None,
                rollback_policy=policy(rb_limit) if handler else None))
        rows.append(row)
    return Plan(stages=rows, rollback_mode=draw(st.sampled_from(list(RollbackMode))),
                on_rollback_error=draw(st.sampled_from(list(OnRollbackError))))


# --- the scheduler -----------------------------------------------------------------------


@dataclass
class World:
    """Celery and the workers around one saga: messages in flight, attempts running."""

    sim: Sim
    data: st.DataObject
    step_failures: bool = True
    handler_failures: bool = True
    pending: list[Msg] = field(default_factory=list)
    delivered: list[Msg] = field(default_factory=list)
    running: list[Msg] = field(default_factory=list)
    lingering: list[Msg] = field(default_factory=list)
    """Bodies recorded as timed out that still run (a thread no exception can stop): each
    keeps its step's lease until it returns."""
    ends: list[Event] = field(default_factory=list)
    accepted: list[Event] = field(default_factory=list)
    """Requests (terminate, retry_rollback) the saga accepted."""
    revivals: int = 0
    """Accepted retry_rollback() calls on a saga that had ended (a rollback can fail while a
    step is still in flight: retried then, the saga has not ended yet and ends only once)."""
    failed_at: int | None = None
    """Index in ``sim.log`` of the transition that first set the saga's error."""

    @property
    def run(self) -> SagaRun:
        return self.sim.run

    def draw(self, strategy: st.SearchStrategy[Any]) -> Any:
        return self.data.draw(strategy)

    # one transition, with the checks every transition must pass

    def feed(self, event: Event) -> Transition:
        before = self.run
        frozen = before.model_dump_json()
        t = self.sim.feed(event)
        assert before.model_dump_json() == frozen, "apply() mutated the run it was given"
        assert t.changed or (t.run == before and not t.events), "an unchanged transition changed"
        if isinstance(event, AttemptStarted) and t.changed and not t.run.is_terminal:
            # committed as a journal line: a load replays it onto the stored run
            stored = decode_run(encode_progress(before), before.plan)
            assert replay(stored, encode_entry(event, self.sim.now)) == t.run, (
                f"replaying the journaled {event!r} gave another run")
        if not isinstance(event, TerminateRequested):  # a second request is recorded as one
            again = apply(t.run, _replayed(event), now=self.sim.now + timedelta(seconds=1))
            assert not again.changed and again.run == t.run and not again.events, (
                f"applying {event!r} a second time changed the saga")
        self.pending.extend((d.kind, d.key, d.attempt) for d in t.dispatches)
        if self.failed_at is None and t.run.error is not None:
            self.failed_at = len(self.sim.log) - 1
        check_run(t.run)
        return t

    def held(self, key: str) -> bool:
        """Whether a body of step ``key`` or of its rollback runs: its lease is live."""
        return any(m[1] == key for m in self.running + self.lingering)

    def check_agreement(self) -> None:
        """The attempts the core thinks are open are exactly those a live worker runs."""
        open_now = sorted((kind, key, record.attempt)
                          for kind, key, item in _items(self.run)
                          if (record := open_attempt(item)) is not None)
        assert open_now == sorted(self.running)
        in_flight = {dispatch_id(*m) for m in self.pending}
        assert set(self.run.outbox) <= in_flight, "a due message is not in flight: it was lost"

    # what can happen next

    def step(self, chaos: bool) -> bool:
        """Make one thing happen; False when nothing is left in flight."""
        deliverable = [m for m in self.pending if chaos or m not in self.running]
        moves = ["deliver"] * 3 * bool(deliverable) + ["end"] * 3 * bool(self.running)
        moves += ["finish_late"] * bool(self.lingering)
        if chaos:  # weights by repetition: chaos is rarer than progress
            moves += ["redeliver"] * bool(self.redeliverable()) + ["resend_end"] * bool(self.ends)
            moves += ["worker_lost"] * 2 * bool(self.running) + ["retry_rollback", "stray"]
            moves += ["timeout_late"] * bool(self.may_time_out())
        if not deliverable and not self.running and not self.lingering:
            return False
        self.move(self.draw(st.sampled_from(moves)), deliverable)
        self.check_agreement()
        return True

    def move(self, move: str, deliverable: list[Msg]) -> None:
        if move == "deliver":
            self.deliver(self.draw(st.sampled_from(deliverable)))
        elif move == "end":
            self.end(self.draw(st.sampled_from(self.running)))
        elif move == "redeliver":
            self.redeliver(self.draw(st.sampled_from(self.redeliverable())))
        elif move == "timeout_late":
            self.timeout_late(self.draw(st.sampled_from(self.may_time_out())))
        elif move == "finish_late":
            self.finish_late(self.draw(st.sampled_from(self.lingering)))
        elif move == "resend_end":
            self.resend_end(self.draw(st.sampled_from(self.ends)))
        elif move == "worker_lost":
            self.worker_lost(self.draw(st.sampled_from(self.running)))
        elif move == "stray":
            self.stray(self.draw(st.sampled_from(_items(self.run))), self.draw(st.integers(1, 4)))
        else:
            self.request(RetryRollbackRequested())  # at a random moment: mostly refused

    def deliver(self, msg: Msg) -> None:
        self.pending.remove(msg)
        if msg not in self.delivered:
            self.delivered.append(msg)
        live = self.held(msg[1])
        t = self.feed(AttemptStarted(kind=msg[0], key=msg[1], attempt=msg[2], lease_live=live))
        if t.decision == Decision.WAIT:
            assert live and not t.changed
            self.pending.append(msg)  # re-queued with a countdown
        elif t.decision == Decision.RUN:
            assert not live
            self.check_may_run(msg)
            self.running.append(msg)

    def check_may_run(self, msg: Msg) -> None:
        kind, key, _ = msg
        step = self.run.steps[key]
        if kind == Kind.STEP:
            assert self.run.error is None, "a forward step started after the saga failed"
        else:
            assert step.status in ("complete", "errored"), (
                f"{key} compensated while it is {step.status}")

    def end(self, msg: Msg) -> None:
        kind, key, attempt = msg
        self.running.remove(msg)
        roll = self.draw(st.integers(0, 9))
        may_fail = self.step_failures if kind == Kind.STEP else self.handler_failures
        event: Event
        if not may_fail or roll < (6 if kind == Kind.STEP else 4):
            output = f"{key}@{attempt}" if kind == Kind.STEP else None
            event = AttemptSucceeded(kind=kind, key=key, attempt=attempt, output=output)
        else:
            asked = self.draw(st.one_of(st.none(), st.floats(0, 86_400_000)))  # RetryLater
            event = AttemptFailed(kind=kind, key=key, attempt=attempt, retryable=roll < 9,
                                  error=ErrorInfo(type="Boom", message=f"{key} {attempt}"),
                                  draw=self.draw(st.floats(0, 1)), delay_ms=asked)
        t = self.feed(event)
        assert t.changed, f"ending running attempt {msg} changed nothing"
        self.ends.append(event)
        if isinstance(event, AttemptFailed) and event.delay_ms is not None:
            for retry in (d for d in t.dispatches if (d.kind, d.key) == (kind, key)):
                assert retry.due_at == self.sim.now + timedelta(milliseconds=event.delay_ms), (
                    "a retry did not wait the delay its attempt asked for")

    def may_time_out(self) -> list[Msg]:
        """Running attempts whose kind this world lets fail (a timeout is a failure)."""
        return [m for m in self.running
                if (self.step_failures if m[0] == Kind.STEP else self.handler_failures)]

    def redeliverable(self) -> list[Msg]:
        """Messages delivered before that are not waiting in the queue again."""
        return [m for m in self.delivered if m not in self.pending]

    def redeliver(self, msg: Msg) -> None:
        """Celery delivers a message again while its attempt runs, or after it ended."""
        t = self.feed(AttemptStarted(kind=msg[0], key=msg[1], attempt=msg[2],
                                     lease_live=self.held(msg[1])))
        assert not t.changed and t.decision in (Decision.WAIT, Decision.SKIP)

    def timeout_late(self, msg: Msg) -> None:
        """The deadline passes: the attempt is recorded as timed out on behalf of a body
        that goes on running (and holding its step's lease) until it returns."""
        kind, key, attempt = msg
        self.running.remove(msg)
        error = ErrorInfo(type="TimeoutError", message=f"{key} {attempt} timed out")
        t = self.feed(AttemptFailed(kind=kind, key=key, attempt=attempt, error=error,
                                    via_retry=False, draw=self.draw(st.floats(0, 1))))
        assert t.changed
        self.lingering.append(msg)

    def finish_late(self, msg: Msg) -> None:
        """A body that outlived its recorded timeout returns; its end changes nothing."""
        kind, key, attempt = msg
        self.lingering.remove(msg)
        output = f"{key}@{attempt}" if kind == Kind.STEP else None
        t = self.feed(AttemptSucceeded(kind=kind, key=key, attempt=attempt, output=output))
        assert not t.changed, "a body's late end changed a saga that recorded it timed out"

    def stray(self, item: tuple[Kind, str, StepRun | RollbackRun], attempt: int) -> None:
        """A message for an attempt nobody sent (cancelled, superseded, forged) runs nothing."""
        kind, key, record = item
        if (kind, key, attempt) in self.pending or any(a.attempt == attempt
                                                       for a in record.attempts):
            return
        t = self.feed(AttemptStarted(kind=kind, key=key, attempt=attempt))
        assert not t.changed and t.decision == Decision.SKIP

    def resend_end(self, event: Event) -> None:
        t = self.feed(event)
        assert not t.changed, f"a duplicate {type(event).__name__} changed the saga"

    def worker_lost(self, msg: Msg) -> None:
        """The worker running ``msg`` died; its message comes back with no live lease."""
        self.running.remove(msg)
        t = self.feed(AttemptStarted(kind=msg[0], key=msg[1], attempt=msg[2]))
        assert t.changed and t.decision in (Decision.RUN, Decision.SKIP)
        if t.decision == Decision.RUN:
            self.running.append(msg)
        else:
            record = _item(self.run, msg[0], msg[1]).attempts[-1]
            assert record.error is not None and record.error.type == "WorkerLost"

    def request(self, event: Event) -> None:
        ended = self.run.is_terminal
        t = self.feed(event)
        assert (t.refusal is None) == t.changed
        if t.refusal is None:
            self.accepted.append(event)
            self.revivals += ended and isinstance(event, RetryRollbackRequested)

    def play(self, script: Script) -> None:
        """Run the saga to the end: chaos for ``script.chaos`` turns, then only progress."""
        resumes = script.resumes
        turn = 0
        while True:
            if turn == script.terminate_at:
                self.request(TerminateRequested(rollback=script.terminate_rollback))
            if not self.step(chaos=turn < script.chaos):
                if not resumes or not self.may_resume():
                    return
                resumes -= 1
                self.request(RetryRollbackRequested())
            turn += 1
            assert turn < 2000, "the saga does not converge"

    def may_resume(self) -> bool:
        progress = self.run.rollback
        return progress is not None and progress.outcome == RollbackOutcome.FAILED


@dataclass(frozen=True)
class Script:
    """What the saga's owner and the chaos do, beyond deliveries and outcomes."""

    chaos: int
    """Turns during which duplicates, worker losses and stray requests may happen."""
    terminate_at: int | None
    """The turn at which the owner terminates the saga (None: never)."""
    terminate_rollback: bool
    resumes: int
    """How many times the owner may call ``retry_rollback()`` after a failed rollback."""


scripts = st.builds(Script, chaos=st.integers(0, 40),
                    terminate_at=st.one_of(st.none(), st.integers(0, 12)),
                    terminate_rollback=st.booleans(), resumes=st.integers(0, 2))


def play(plan: Plan, data: st.DataObject, script: Script, **options: bool) -> World:
    """Start ``plan``, put its first messages in flight, and play ``script`` to the end."""
    world = World(Sim.start(plan), data, **options)
    world.pending.extend((d.kind, d.key, d.attempt) for d in world.sim.log[0].dispatches)
    world.play(script)
    check_finished(world)
    return world


def _replayed(event: Event) -> Event:
    """The same event again; a repeated start finds its own lease live (its holder runs)."""
    if isinstance(event, AttemptStarted):
        return event.model_copy(update={"lease_live": True})
    return event


def _items(run: SagaRun) -> list[tuple[Kind, str, StepRun | RollbackRun]]:
    items: list[tuple[Kind, str, StepRun | RollbackRun]] = []
    for key, step in run.steps.items():
        items.append((Kind.STEP, key, step))
        if step.rollback is not None:
            items.append((Kind.ROLLBACK, key, step.rollback))
    return items


def _item(run: SagaRun, kind: Kind, key: str) -> StepRun | RollbackRun:
    step = run.steps[key]
    if kind == Kind.STEP:
        return step
    assert step.rollback is not None
    return step.rollback


# --- invariants --------------------------------------------------------------------------


def check_run(run: SagaRun) -> None:
    """What holds after every transition, whatever was delivered."""
    for _, key, item in _items(run):
        for a in item.attempts:
            assert a.losses < WORKER_LOST_LIMIT or (
                a.losses == WORKER_LOST_LIMIT and a.error is not None
                and a.error.type == "WorkerLost"), f"{key}: a worker died {a.losses} times"
        numbers = [a.attempt for a in item.attempts]
        assert numbers == list(range(1, len(numbers) + 1)), f"{key}: attempts {numbers}"
        assert all(a.ended_at is not None for a in item.attempts[:-1]), f"{key}: two open"
        if isinstance(item, RollbackRun):
            assert sum(bool(a.success) for a in item.attempts) <= 1, f"{key} undone twice"
            assert open_attempt(item) is None or open_attempt(run.steps[key]) is None, (
                f"{key} compensated while its own attempt still runs")
    started = [s for s in run.steps.values() if s.start_seq is not None]
    assert sorted(s.start_seq or 0 for s in started) == list(range(1, run.next_seq))
    assert all(s.attempts for s in started)
    assert all(not s.attempts and s.rollback is None for s in run.steps.values()
               if s.start_seq is None)
    for s in run.steps.values():
        if s.status == "complete":
            assert [a.success for a in s.attempts][-1] is True
            assert sum(bool(a.success) for a in s.attempts) == 1
    _check_rollback_progress(run)
    if run.is_terminal:
        assert not run.outbox, "a finished saga still has messages due"
        assert all(open_attempt(item) is None for _, _, item in _items(run))


def _check_rollback_progress(run: SagaRun) -> None:
    progress = run.rollback
    if progress is None:
        return
    eligible = sorted((s for s in run.steps.values() if s.rollback is not None),
                      key=lambda s: s.start_seq or 0, reverse=True)
    assert progress.order == [s.key for s in eligible], "not reverse start order"
    assert progress.total_steps == len(eligible)
    handlers = [s.rollback for s in eligible if s.rollback is not None]
    done = sum(h.status == RollbackStatus.COMPLETE for h in handlers)
    assert progress.completed_steps == done
    if progress.outcome == RollbackOutcome.COMPLETE:
        assert done == len(handlers)
    elif progress.outcome == RollbackOutcome.FAILED:
        assert done < len(handlers)
    if run.plan.rollback_mode == RollbackMode.SEQUENTIAL:
        busy = [h for h in handlers if h.next_attempt is not None or open_attempt(h)]
        assert len(busy) <= 1, "sequential rollback ran two handlers at once"


def check_finished(world: World) -> None:
    """What a saga looks like once nothing is left in flight."""
    run = world.run
    assert run.is_terminal, f"deadlock: nothing in flight but the saga is {run.status}"
    assert SagaRun.model_validate_json(run.model_dump_json()) == run
    to_state(run).model_dump_json()
    events = [e for t in world.sim.log for e in t.events]
    _check_event_counts(run, events, world.accepted, world.revivals)
    _check_nothing_started_after_failure(world)
    if run.status == SagaStatus.COMPLETE:
        _check_complete(run)
    else:
        _check_compensated(run, events)


def _check_complete(run: SagaRun) -> None:
    assert run.error is None and run.rollback is None and run.terminate is None
    assert all(s.status == "complete" for s in run.steps.values())
    assert all(s.rollback is None or not s.rollback.attempts for s in run.steps.values())
    assert run.output == stage_output(run, len(run.plan.stages) - 1)


def _check_compensated(run: SagaRun, events: list[dict[str, Any]]) -> None:
    assert run.error is not None
    assert run.status == (SagaStatus.TERMINATED if run.terminate else SagaStatus.ERRORED)
    eligible = {s.key for s in run.steps.values() if s.rollback is not None}
    rolls_back = run.terminate is None or run.terminate.rollback
    if not rolls_back or not eligible:
        assert run.rollback is None, "a rollback ran with nothing to compensate"
        assert not any(e["type"].startswith("rollback") for e in events)
        return
    assert run.rollback is not None and run.rollback.outcome is not None
    done = {k for k in eligible if run.steps[k].rollback.status == "complete"}  # type: ignore[union-attr]
    if run.rollback.outcome == RollbackOutcome.COMPLETE:
        assert done == eligible, "the rollback completed without compensating every start"
    if run.plan.rollback_mode == RollbackMode.SEQUENTIAL:
        _check_sequential_order(run.rollback.order, events)


def _check_sequential_order(order: list[str], events: list[dict[str, Any]]) -> None:
    """Within one rollback round, handlers start and finish in reverse step-start order."""
    rank = {key: i for i, key in enumerate(order)}
    started: list[int] = []
    completed: list[int] = []
    for e in events:
        if e["type"] == "rollback_started":
            started, completed = [], []
        elif e["type"] == "rollback_attempt_started":
            started.append(rank[f"{e['step']}#{e['count']}"])
            assert started == sorted(started), "a handler ran before a later-started step's"
        elif e["type"] == "rollback_step_completed":
            completed.append(rank[f"{e['step']}#{e['count']}"])
            assert completed == sorted(set(completed)), "compensated out of order or twice"


def _check_event_counts(run: SagaRun, events: list[dict[str, Any]], accepted: list[Event],
                        revivals: int) -> None:
    """The event stream tells the same story as the final state, each fact once."""
    def count(type_: str, key: str | None = None) -> int:
        return sum(e["type"] == type_ and (key is None or f"{e['step']}#{e['count']}" == key)
                   for e in events)

    started = [s for s in run.steps.values() if s.start_seq is not None]
    assert count("saga_queued") == 1
    assert count("saga_started") == (1 if started else 0)
    resumed = sum(isinstance(r, RetryRollbackRequested) for r in accepted)
    ends = count("saga_completed") + count("saga_errored") + count("saga_terminated")
    assert ends == 1 + revivals, "a saga ends once, and again each time retry_rollback() revives it"
    seqs = [e["start_seq"] for e in events if e["type"] == "step_started"]
    assert seqs == list(range(1, len(started) + 1)), "start_seq not unique and increasing"
    assert count("terminate_requested") == sum(isinstance(r, TerminateRequested)
                                               for r in accepted)
    for key, step in run.steps.items():
        assert count("step_started", key) == (step.start_seq is not None)
        assert count("attempt_started", key) == len(step.attempts)
        assert count("attempt_completed", key) == sum(a.success is True for a in step.attempts)
        assert count("attempt_errored", key) == sum(a.success is False for a in step.attempts)
        assert count("step_completed", key) == (step.status == "complete")
        assert count("step_errored", key) == (step.status == "errored")
        handler = step.rollback
        attempts = handler.attempts if handler else []
        assert count("rollback_attempt_started", key) == len(attempts)
        assert count("rollback_attempt_completed", key) == sum(a.success is True
                                                               for a in attempts)
        assert count("rollback_attempt_errored", key) == sum(a.success is False
                                                             for a in attempts)
        assert count("rollback_step_completed", key) == (
            handler is not None and handler.status == "complete")
    assert resumed == sum(e["type"] == "rollback_started" and e["resumed"] for e in events)
    rounds = count("rollback_started")
    assert rounds == (0 if run.rollback is None else 1 + resumed)
    assert count("rollback_completed") + count("rollback_errored") == rounds


def _check_nothing_started_after_failure(world: World) -> None:
    if world.failed_at is None:
        return
    late = [e["type"] for t in world.sim.log[world.failed_at + 1:] for e in t.events]
    assert "step_started" not in late and "attempt_started" not in late, (
        "a forward step started after the saga failed")


# --- the properties ----------------------------------------------------------------------


@PROPERTY
@given(plan=plans(), data=st.data(), script=scripts)
def test_any_delivery_of_any_saga_keeps_every_invariant(
    plan: Plan, data: st.DataObject, script: Script
) -> None:
    """Under random failures, duplicates, reorderings, worker losses, terminate and
    retry_rollback, every transition and every finished saga keeps the invariants."""
    play(plan, data, script)


@PROPERTY
@given(plan=plans(), data=st.data(), script=scripts)
def test_a_saga_whose_steps_never_fail_completes_and_compensates_nothing(
    plan: Plan, data: st.DataObject, script: Script
) -> None:
    """With no step failing, duplicates and worker losses never stop a saga completing
    (unless its owner terminates it or a worker dies under one attempt three times)."""
    world = play(plan, data, script, step_failures=False)
    lost = any(a.error is not None and a.error.type == "WorkerLost"
               for s in world.run.steps.values() for a in s.attempts)
    if world.run.terminate is None and not lost:
        assert world.run.status == SagaStatus.COMPLETE


@PROPERTY
@given(plan=plans(), data=st.data(), script=scripts)
def test_with_handlers_that_succeed_every_started_step_is_compensated_once_in_order(
    plan: Plan, data: st.DataObject, script: Script
) -> None:
    """When handlers never fail, a failed saga compensates exactly its started steps with
    handlers, once each, and in sequential mode in reverse start order."""
    world = play(plan, data, script, handler_failures=False)
    run = world.run
    events = [e for t in world.sim.log for e in t.events]
    if run.rollback is None or any(e["type"] == "rollback_step_errored" for e in events):
        return  # nothing to compensate, or a handler's worker died too often
    assert run.rollback.outcome == RollbackOutcome.COMPLETE
    done = [f"{e['step']}#{e['count']}" for e in events if e["type"] == "rollback_step_completed"]
    if run.plan.rollback_mode == RollbackMode.SEQUENTIAL:
        assert done == run.rollback.order
    else:
        assert sorted(done) == sorted(run.rollback.order)


KEY_PARTS = st.one_of(st.text(alphabet="ab:%3A25", max_size=6), st.text())
"""Saga ids and step names: arbitrary text, often made of the characters an encoding escapes
or produces."""
TRIPLES = st.tuples(KEY_PARTS, KEY_PARTS, st.integers(min_value=1))


def decode_key(key: str) -> list[str]:
    """The parts of an escaped key, unescaped: what makes the encoding injective."""
    unescape = {"%25": "%", "%3A": ":"}
    return [re.sub("%25|%3A", lambda m: unescape[m.group()], p) for p in key.split(":")]


@settings(max_examples=300)
@given(first=TRIPLES, second=TRIPLES)
def test_idempotency_keys_are_injective_over_arbitrary_text(
    first: tuple[str, str, int], second: tuple[str, str, int]
) -> None:
    """A key splits back into its (saga id, step, count), so two different triples never share
    a step or rollback key, and no step key is ever a rollback key."""
    saga_id, step, count = first
    key = step_idempotency_key(saga_id, step, count, key_format=2)
    assert decode_key(key) == [saga_id, step, str(count)]
    rollback = rollback_idempotency_key(saga_id, step, count, key_format=2)
    assert decode_key(rollback) == [saga_id, step, str(count), "rollback"]
    if first != second:
        assert key != step_idempotency_key(*second, key_format=2)
        assert rollback != rollback_idempotency_key(*second, key_format=2)
    assert key != rollback_idempotency_key(*second, key_format=2)


# --- sagas that wait (SPEC section 8): sleep, wait_for_event, hold --------------------------

WAIT_TYPES = ("x", "y")
EVENT_IDS = (None, "e1", "e2", "e3")


@st.composite
def waiting_plans(draw: st.DrawFn) -> Plan:
    """2-5 stages mixing steps (with handlers), sleeps and waits for "x" or "y" (some with a
    timeout), rolling back or holding on failure (some with a hold timeout)."""
    from saga_celery._core.model import OnFailure, WaitKind, WaitSpec

    kinds = draw(st.lists(st.sampled_from(["step", "sleep", "wait"]), min_size=2, max_size=5))
    seen: Counter[str] = Counter()
    rows = []
    for i, kind in enumerate(kinds):
        name = {"step": "a", "sleep": "nap", "wait": "w"}[kind]
        seen[name] += 1
        key = f"{name}#{seen[name]}"
        if kind == "step":
            rows.append([StepSpec(key=key, name=name, count=seen[name], stage=i, index=0,
                                  task=name, policy=policy(draw(st.integers(0, 1))),
                                  rollback_task="a.rollback", rollback_policy=policy(1))])
            continue
        wait = (WaitSpec(kind=WaitKind.SLEEP, duration_ms=1000.0) if kind == "sleep" else
                WaitSpec(kind=WaitKind.WAIT, event_type=draw(st.sampled_from(WAIT_TYPES)),
                         duration_ms=draw(st.sampled_from([None, 5000.0]))))
        rows.append([StepSpec(key=key, name=name, count=seen[name], stage=i, index=0, task="",
                              policy=policy(0), wait=wait)])
    hold = draw(st.booleans())
    return Plan(stages=rows, on_failure=OnFailure.HOLD if hold else OnFailure.ROLLBACK,
                hold_timeout_ms=draw(st.sampled_from([None, 60_000.0])) if hold else None)


@dataclass
class WaitingWorld:
    """A saga that waits, fed at random: messages, outcomes, timers firing, events (with
    repeated ids, for types nobody waits for, before their wait began), redrives,
    rollbacks and a terminate."""

    sim: Sim
    data: st.DataObject
    pending: list[Msg] = field(default_factory=list)
    running: list[Msg] = field(default_factory=list)
    taken_ids: set[str] = field(default_factory=set)
    received: int = 0

    @property
    def run(self) -> SagaRun:
        return self.sim.run

    def feed(self, event: Event) -> Transition:
        before = self.run
        t = self.sim.feed(event)
        assert before.model_dump_json() != "" and (t.changed or t.run == before)
        if t.refusal is None and not _counts_twice(event):
            again = apply(t.run, _replayed(event), now=self.sim.now + timedelta(seconds=1))
            assert not again.changed, f"applying {event!r} twice changed the saga"
        self.pending.extend((d.kind, d.key, d.attempt) for d in t.dispatches
                            if d.kind != Kind.WAKE)
        self.received += sum(e["type"] == "event_received" for e in t.events)
        check_waiting_run(t.run)
        return t

    def wakes(self) -> list[str]:
        return [d.id for d in self.run.outbox.values() if d.kind == Kind.WAKE]

    def step(self, chaos: bool) -> bool:
        moves = ["deliver"] * 3 * bool(self.pending) + ["end"] * 3 * bool(self.running)
        moves += ["wake"] * 2 * bool(self.wakes())
        moves += ["event"] * 2 * (not self.run.is_terminal and self.waiting_for() is not None)
        if self.run.status == SagaStatus.HELD:
            moves += ["redrive", "rollback"]
        if chaos:
            moves += ["event", "stray_wake", "terminate"]
        if not moves:
            return False
        self.move(self.data.draw(st.sampled_from(moves)), chaos)
        return True

    def waiting_for(self) -> str | None:
        for step in self.run.steps.values():
            spec = self.run.plan.spec(step.key)
            if spec.wait is not None and spec.wait.event_type and open_attempt(step):
                return spec.wait.event_type
        return None

    def move(self, move: str, chaos: bool) -> None:
        draw = self.data.draw
        if move == "deliver":
            msg = draw(st.sampled_from(self.pending))
            self.pending.remove(msg)
            t = self.feed(AttemptStarted(kind=msg[0], key=msg[1], attempt=msg[2]))
            if t.decision == Decision.RUN:
                self.running.append(msg)
        elif move == "end":
            msg = draw(st.sampled_from(self.running))
            self.running.remove(msg)
            fail = chaos and draw(st.booleans())
            self.feed(AttemptFailed(kind=msg[0], key=msg[1], attempt=msg[2],
                                    error=ErrorInfo(type="Boom", message="b")) if fail else
                      AttemptSucceeded(kind=msg[0], key=msg[1], attempt=msg[2],
                                       output=f"{msg[1]}@{msg[2]}"))
        elif move in ("wake", "stray_wake"):
            choices = self.wakes() if move == "wake" else ["wake:nap#1:1", "wake:hold:1"]
            _, key, attempt = draw(st.sampled_from(choices)).rsplit(":", 2)[-3:]
            self.feed(WakeUp(key=key.split("wake:")[-1], attempt=int(attempt)))
        elif move == "event":
            wanted = self.waiting_for()
            kind = wanted if wanted and not chaos else draw(st.sampled_from([*WAIT_TYPES, "z"]))
            event_id = draw(st.sampled_from(EVENT_IDS))
            ended = self.run.is_terminal
            t = self.feed(EventSent(event_type=kind, payload={"n": len(self.sim.log)},
                                    event_id=event_id))
            assert (t.refusal is not None) == ended
            if event_id is not None and t.refusal is None:
                assert t.changed == (event_id not in self.taken_ids)
                self.taken_ids.add(event_id)
        elif move == "terminate":
            self.feed(TerminateRequested(rollback=draw(st.booleans())))
        else:
            t = self.feed(RedriveRequested() if move == "redrive" else RollbackRequested())
            assert t.refusal is None

    def play(self, chaos_turns: int) -> None:
        turn = 0
        while not (self.run.is_terminal and turn >= chaos_turns) and self.step(
                chaos=turn < chaos_turns):
            turn += 1
            assert turn < 2000, "the saga does not converge"


def _counts_twice(event: Event) -> bool:
    """Events whose repetition legitimately changes the saga (or is refused)."""
    return isinstance(event, TerminateRequested | RedriveRequested | RollbackRequested) or (
        isinstance(event, EventSent) and event.event_id is None)


def check_waiting_run(run: SagaRun) -> None:
    """A waiting stage is running exactly while its attempt is open; a wake timer exists
    only for a running wait, a hold timer only while held; held means nothing undone yet."""
    for step in run.steps.values():
        spec = run.plan.spec(step.key)
        if spec.wait is None:
            continue
        is_open = open_attempt(step) is not None
        assert (step.status == "running") == is_open, (step.key, step.status)
        assert len(step.attempts) <= 1
        wake = dispatch_id(Kind.WAKE, step.key, 1) in run.outbox
        assert not wake or is_open
        if is_open and spec.wait.duration_ms is not None:
            assert wake, f"{step.key} waits with no timer to end it"
    holds = [d for d in run.outbox.values() if d.kind == Kind.WAKE and d.key == "hold"]
    assert not holds or run.status == SagaStatus.HELD
    if run.status == SagaStatus.HELD:
        assert run.error is None and run.rollback is None and run.held is not None
    if run.is_terminal:
        assert not run.outbox and all(open_attempt(s) is None for s in run.steps.values())


@PROPERTY
@given(plan=waiting_plans(), data=st.data(), chaos=st.integers(0, 30))
def test_sleeps_waits_and_holds_keep_their_promises_under_any_event_order(
        plan: Plan, data: st.DataObject, chaos: int) -> None:
    """Whatever the order of messages, timers, events (early, repeated, unwanted) and owner
    requests, every transition keeps the waiting invariants, an event id counts once, and a
    saga driven on to the end by progress alone ends terminal with its outputs chained."""
    world = WaitingWorld(Sim.start(plan), data)
    world.pending.extend((d.kind, d.key, d.attempt) for d in world.sim.log[0].dispatches
                         if d.kind != Kind.WAKE)
    world.play(chaos)
    run = world.run
    assert run.is_terminal, f"the saga stopped {run.status} with nothing left to do"
    kept = sum(len(payloads) for payloads in run.inbox.values())
    taken = sum(1 for s in run.steps.values()
                if run.plan.spec(s.key).wait is not None and s.output is not None
                and run.plan.spec(s.key).wait.kind == "wait")  # type: ignore[union-attr]
    assert kept + taken <= world.received
    if run.status == SagaStatus.COMPLETE:
        for i, stage in enumerate(run.plan.stages):
            spec = stage[0]
            if spec.wait is not None and spec.wait.kind == "sleep":
                assert run.steps[spec.key].output == (stage_output(run, i - 1) if i else None)
