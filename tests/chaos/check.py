"""The invariants a chaos run checks for every saga, against its final state and the ledger.

- Terminal: every saga ends ``complete`` or ``errored`` (directly or through recovery);
  one that does not by the deadline, or has no state, is *lost*.
- Nothing doubled: each (kind, step, count) has at most one effect in the ledger.
- ``complete``: every step completed and its effect is there once; no compensation ran.
- ``errored``: no step of a stage after the failing one started; every started step with a
  rollback handler was compensated exactly once in effect (its handler completed once, with
  the step's real output), after the step's own effect, in reverse start order; nothing that
  never started ran or was compensated.
- The saga ended the way its params asked (failed at the chosen step, retried what was
  flaky), unless chaos itself failed a step (``WorkerLost`` after three lost workers, or a
  ``TimeoutError`` of a stopped worker): that is an *unexpected outcome*, reported apart.
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import Any

from saga_celery._core.model import Plan, StepSpec
from saga_celery._core.state import SagaState, StepView

CHAOS_ERRORS = frozenset({"WorkerLost", "TimeoutError"})
"""Errors chaos itself can cause: a step that fails with one is not the run's fault."""


@dataclass(frozen=True)
class Planned:
    """One saga the run submits: its shape (saga name) and params."""

    saga_id: str
    shape: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Effect:
    seq: int
    idempotency_key: str
    kind: str
    key: str
    """``"<step>#<count>"`` of the step it belongs to."""
    output_key: str | None


@dataclass
class Ledger:
    """What one saga's bodies did: effects (once per idempotency key) and body runs."""

    effects: list[Effect]
    applies: dict[str, int]
    """Idempotency key -> how often a body got as far as applying its effect."""
    runs: dict[str, int]
    """``"<kind>|<step>#<count>|<attempt>"`` -> how often that attempt's body started."""

    def of(self, kind: str, key: str) -> list[Effect]:
        return [e for e in self.effects if e.kind == kind and e.key == key]

    def ran(self, kind: str, key: str) -> bool:
        return any(r.startswith(f"{kind}|{key}|") for r in self.runs)


@dataclass
class Verdict:
    """What checking one saga found."""

    violations: list[str] = field(default_factory=list)
    duplicate_effects: int = 0
    lost: bool = False
    unexpected: str | None = None


def _key(step: StepView) -> str:
    return f"{step.name}#{step.count}"


def check_saga(planned: Planned, state: SagaState | None, ledger: Ledger, plan: Plan
               ) -> Verdict:
    """Every invariant of one saga."""
    verdict = Verdict()
    if state is None or not state.is_terminal:
        verdict.lost = True
        where = "no state" if state is None else f"still {state.status}"
        verdict.violations.append(f"lost: {where}")
        return verdict
    specs = {spec.key: spec for stage in plan.stages for spec in stage}
    steps = {_key(s): s for s in state.steps}
    v = verdict.violations
    for kind, key in {(e.kind, e.key) for e in ledger.effects}:
        extra = len(ledger.of(kind, key)) - 1
        if extra:
            verdict.duplicate_effects += extra
            v.append(f"{kind} effect of {key} applied {extra + 1} times (different keys)")
    _check_started(steps, ledger, v)
    if state.status == "complete":
        _check_complete(state, steps, ledger, v)
    elif state.status == "errored":
        _check_errored(state, steps, specs, ledger, v)
    else:
        v.append(f"ended {state.status}")
    _check_expected(planned, state, steps, verdict)
    return verdict


def _check_started(steps: dict[str, StepView], ledger: Ledger, v: list[str]) -> None:
    """Nothing ran, took effect or was compensated without a recorded start."""
    for key, step in steps.items():
        if step.kind != "step":
            continue  # a sleep or a wait: no body, no effect
        if step.start_seq is None:
            if ledger.ran("step", key) or ledger.of("step", key):
                v.append(f"{key} has no recorded start, yet its body ran")
            if ledger.ran("rollback", key) or ledger.of("rollback", key):
                v.append(f"{key} never started, yet it was compensated")
        if step.status == "complete" and len(ledger.of("step", key)) != 1:
            v.append(f"{key} completed without its effect")


def _check_complete(state: SagaState, steps: dict[str, StepView], ledger: Ledger,
                    v: list[str]) -> None:
    for key, step in steps.items():
        if step.status != "complete":
            v.append(f"saga complete, but step {key} is {step.status}")
    if state.rollback is not None:
        v.append("saga complete, but a rollback ran")
    if any(e.kind == "rollback" for e in ledger.effects) or any(
            r.startswith("rollback|") for r in ledger.runs):
        v.append("saga complete, but a compensation ran")


def _check_errored(state: SagaState, steps: dict[str, StepView], specs: dict[str, StepSpec],
                   ledger: Ledger, v: list[str]) -> None:
    failed = [s.stage for s in steps.values() if s.status == "errored"]
    if state.error is None or not failed:
        v.append("saga errored with no error or no errored step")
        return
    for key, step in steps.items():
        if step.stage > min(failed) and step.start_seq is not None:
            v.append(f"{key} (stage {step.stage}) started after stage {min(failed)} failed")
    eligible = [k for k, s in steps.items()
                if s.start_seq is not None and specs[k].rollback_task is not None]
    _check_rollback_totals(state, eligible, v)
    for key in eligible:
        _check_compensated(steps[key], key, ledger, v)
    compensations = sorted((e for e in ledger.effects if e.kind == "rollback"),
                           key=lambda e: e.seq)
    starts = [steps[e.key].start_seq or 0 for e in compensations]
    if any(a <= b for a, b in pairwise(starts)):
        order = [e.key for e in compensations]
        v.append(f"compensated in order {order} (start seqs {starts}): not reverse start order")


def _check_rollback_totals(state: SagaState, eligible: list[str], v: list[str]) -> None:
    rollback = state.rollback
    if not eligible:
        if rollback is not None:
            v.append("a rollback ran with no eligible step")
        return
    if rollback is None or rollback.outcome != "complete":
        v.append(f"rollback did not complete: {rollback}")
    elif rollback.completed_steps != len(eligible) or rollback.total_steps != len(eligible):
        v.append(f"rollback counts {rollback.completed_steps}/{rollback.total_steps}, "
                 f"expected {len(eligible)} eligible steps")


def _check_compensated(step: StepView, key: str, ledger: Ledger, v: list[str]) -> None:
    undo = ledger.of("rollback", key)
    done = ledger.of("step", key)
    handler = step.rollback
    if handler is None or handler.status != "complete":
        v.append(f"{key} started but its rollback is {handler and handler.status}")
    elif sum(1 for a in handler.attempts if a.success) != 1:
        v.append(f"{key}: {sum(1 for a in handler.attempts if a.success)} successful "
                 "rollback attempts recorded, expected 1")
    if len(undo) != 1:
        v.append(f"{key} started, compensated {len(undo)} times in effect")
        return
    expected_output = done[0].idempotency_key if step.status == "complete" and done else None
    if undo[0].output_key != expected_output:
        v.append(f"{key}: rollback saw output key {undo[0].output_key!r}, "
                 f"expected {expected_output!r} (step {step.status})")
    if done and done[0].seq > undo[0].seq:
        v.append(f"{key}: the step's effect landed after its compensation")


def _check_expected(planned: Planned, state: SagaState, steps: dict[str, StepView],
                    verdict: Verdict) -> None:
    """Did it end the way its params asked? Chaos-caused failures are reported apart.

    A step planned to fail (with retries) whose last attempt chaos failed instead still
    failed as planned: only its error type differs.
    """
    params = planned.params
    fail = _first_failure(params, steps)
    error = state.error
    if error is not None and error.type in CHAOS_ERRORS:
        as_planned = (fail is not None and not params.get("nonretryable")
                      and error.step == fail.split("#")[0] and steps[fail].status == "errored")
        if not as_planned:
            verdict.unexpected = f"{error.type} at {error.step}: {error.message}"
            return
    if fail is None:
        if state.status != "complete":
            verdict.violations.append(f"expected complete, got {state.status} ({error})")
    elif state.status != "errored" or error is None or error.step != fail.split("#")[0]:
        verdict.violations.append(f"expected to fail at {fail}, got {state.status} ({error})")
    elif steps[fail].kind == "wait":
        _check_timed_out(fail, error.type, steps[fail], verdict)
    else:
        _check_failing_attempts(fail, bool(params.get("nonretryable")), steps[fail], verdict)
    for key in params.get("flaky", ()):
        attempts = steps[key].attempts
        if steps[key].status == "complete" and (len(attempts) < 2 or attempts[0].success):
            verdict.violations.append(f"{key} is flaky but its first attempt succeeded")
    for key in params.get("rollback_flaky", ()):
        handler = steps[key].rollback
        if handler is not None and handler.status == "complete" and (
                len(handler.attempts) < 2 or handler.attempts[0].success):
            verdict.violations.append(f"rollback of {key} is flaky but succeeded at once")


def _first_failure(params: dict[str, Any], steps: dict[str, StepView]) -> str | None:
    """The step the saga should fail at: the planned ``fail``, or a wait for an event the
    run never sends, whichever stage comes first."""
    fail = params.get("fail")
    if params.get("event") != "never":
        return fail  # type: ignore[no-any-return]
    wait = next((k for k, s in steps.items() if s.kind == "wait"), None)
    if wait is None or (fail is not None and steps[fail].stage < steps[wait].stage):
        return fail  # type: ignore[no-any-return]
    return wait


def _check_timed_out(key: str, error_type: str, step: StepView, verdict: Verdict) -> None:
    """A wait whose event never came: one attempt, ended by ``EventTimeoutError``."""
    if error_type != "EventTimeoutError" or step.status != "errored" or len(step.attempts) != 1:
        verdict.violations.append(f"{key}: expected an EventTimeoutError, got {error_type} "
                                  f"({step.status}, {len(step.attempts)} attempts)")


def _check_failing_attempts(key: str, nonretryable: bool, step: StepView,
                            verdict: Verdict) -> None:
    """3 failed attempts (limit 2), or 1 for NonRetryableError after any chaos-failed ones."""
    attempts = step.attempts
    if any(a.success for a in attempts) or not attempts:
        verdict.violations.append(f"{key}: attempts {attempts}, expected only failed ones")
    elif nonretryable:
        other = [a for a in attempts[:-1] if a.error is None or a.error.type not in CHAOS_ERRORS]
        if other or attempts[-1].error is None or attempts[-1].error.type != "NonRetryableError":
            verdict.violations.append(f"{key}: attempts {[a.error for a in attempts]}, "
                                      "expected chaos failures, then one NonRetryableError")
    elif len(attempts) != 3:
        verdict.violations.append(f"{key}: {len(attempts)} attempts, expected 3 failed ones")


def parse_ledger(effects: dict[bytes, bytes], applies: dict[bytes, bytes],
                 runs: dict[bytes, bytes]) -> Ledger:
    """A saga's ledger from the raw ``HGETALL`` replies of its three hashes."""
    parsed = []
    for idem, raw in effects.items():
        seq, _, body = raw.decode().partition(" ")
        data = json.loads(body)
        parsed.append(Effect(seq=int(seq), idempotency_key=idem.decode(), kind=data["kind"],
                             key=f"{data['step']}#{data['count']}",
                             output_key=data.get("output_key")))
    return Ledger(effects=parsed,
                  applies={k.decode(): int(n) for k, n in applies.items()},
                  runs={k.decode(): int(n) for k, n in runs.items()})


@dataclass(frozen=True)
class ChaosEvent:
    t: float
    """Wall-clock time (epoch seconds) the event began."""
    kind: str
    detail: str = ""
    worker: str = ""
    """The worker (its log's name) whose main process, and so its broker consumer, this event
    killed; empty for events that leave every consumer running."""


def progress_times(events: list[dict[str, Any]]) -> list[float]:
    """When the saga made progress: its lifecycle events, minus attempts chaos failed.

    An attempt recorded as failed by a timeout or a lost worker is the damage, not progress.
    """
    times = []
    for e in events:
        error = e.get("error") or {}
        if e["type"].endswith("attempt_errored") and error.get("type") in CHAOS_ERRORS:
            continue
        times.append(datetime.fromisoformat(e["timestamp"]).timestamp())
    return sorted(times)


def recovery_stalls(events: list[dict[str, Any]], chaos: list[ChaosEvent]
                    ) -> tuple[list[tuple[float, ChaosEvent]], float]:
    """How long the saga took to progress again after each chaos event it was in flight for.

    For every chaos event that began while the saga was in flight (after its first lifecycle
    event, before its last), the time from the event to the saga's next progress (see
    ``progress_times``).  Returned as (seconds, chaos event) pairs, with the longest gap
    between two consecutive progress times, chaos or not.
    """
    times = progress_times(events)
    stalls = []
    for event in chaos:
        if times and times[0] <= event.t < times[-1]:
            stalls.append((times[bisect.bisect_right(times, event.t)] - event.t, event))
    return stalls, max((b - a for a, b in pairwise(times)), default=0.0)


def recovery_by_kind(stalls: list[tuple[float, ChaosEvent]]) -> dict[str, dict[str, float]]:
    """Per kind of chaos event: how many (event, saga) pairs, and their median, p99 and max."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    for seconds, event in stalls:
        by_kind[event.kind].append(seconds)
    table = {}
    for kind, values in sorted(by_kind.items()):
        values.sort()
        table[kind] = {"n": len(values), "p50": round(values[len(values) // 2], 2),
                       "p99": round(values[int(len(values) * 0.99)], 2),
                       "max": round(values[-1], 2)}
    return table
