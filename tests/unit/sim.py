"""A tiny driver for the pure core: build plans, feed events, read what came out."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from saga_celery._core.config import resolve_config
from saga_celery._core.events import (
    AttemptFailed,
    AttemptStarted,
    AttemptSucceeded,
    Event,
    RetryRollbackRequested,
    TerminateRequested,
    Transition,
)
from saga_celery._core.machine import apply, start_saga
from saga_celery._core.model import ErrorInfo, Kind, Plan, Policy, SagaRun, StepSpec

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def policy(limit: int = 0, delay_ms: float = 100, backoff: str = "constant") -> Policy:
    return resolve_config(owner="t", retries={"limit": limit, "delay": delay_ms,
                                              "backoff": backoff}).policy()


def plan(*stages: str | list[str], rollback: set[str] | None = None, limit: int = 0,
         rb_limit: int = 0, **options: Any) -> Plan:
    """Stages of step names (a list is a group); ``rollback`` names the steps with handlers."""
    with_rb = rollback if rollback is not None else {
        n for s in stages for n in ([s] if isinstance(s, str) else s)}
    seen: dict[str, int] = {}
    specs = []
    for i, stage in enumerate(stages):
        names = [stage] if isinstance(stage, str) else stage
        row = []
        for j, name in enumerate(names):
            seen[name] = seen.get(name, 0) + 1
            row.append(StepSpec(
                key=f"{name}#{seen[name]}", name=name, count=seen[name], stage=i, index=j,
                task=name, in_group=isinstance(stage, list), policy=policy(limit),
                rollback_task=f"{name}.rollback" if name in with_rb else None,
                rollback_policy=policy(rb_limit) if name in with_rb else None))
        specs.append(row)
    return Plan(stages=specs, **options)


@dataclass
class Sim:
    """Feeds events to a run, keeping every transition for inspection."""

    run: SagaRun
    now: datetime = T0
    log: list[Transition] = field(default_factory=list)

    @classmethod
    def start(cls, p: Plan, params: Any = None) -> Sim:
        t = start_saga(saga_id="s", name="saga", plan=p, params=params, now=T0)
        return cls(run=t.run, log=[t])

    def feed(self, event: Event) -> Transition:
        self.now += timedelta(milliseconds=10)
        t = apply(self.run, event, now=self.now)
        self.run = t.run
        self.log.append(t)
        return t

    def start_step(self, name: str, attempt: int = 1, *, count: int = 1,
                   kind: Kind = Kind.STEP, lease_live: bool = False) -> Transition:
        return self.feed(AttemptStarted(kind=kind, key=f"{name}#{count}", attempt=attempt,
                                        lease_live=lease_live))

    def ok(self, name: str, attempt: int = 1, output: Any = None, *, count: int = 1,
           kind: Kind = Kind.STEP) -> Transition:
        return self.feed(AttemptSucceeded(kind=kind, key=f"{name}#{count}", attempt=attempt,
                                          output=output))

    def fail(self, name: str, attempt: int = 1, *, count: int = 1, kind: Kind = Kind.STEP,
             retryable: bool = True, error: str = "Boom") -> Transition:
        return self.feed(AttemptFailed(kind=kind, key=f"{name}#{count}", attempt=attempt,
                                       error=ErrorInfo(type=error, message="it broke"),
                                       retryable=retryable))

    def run_step(self, name: str, output: Any = None, **kw: Any) -> Transition:
        self.start_step(name, **kw)
        return self.ok(name, output=output, **kw)

    def rollback(self, name: str, attempt: int = 1, *, ok: bool = True) -> Transition:
        self.start_step(name, attempt, kind=Kind.ROLLBACK)
        if ok:
            return self.ok(name, attempt, kind=Kind.ROLLBACK)
        return self.fail(name, attempt, kind=Kind.ROLLBACK)

    def terminate(self, rollback: bool) -> Transition:
        return self.feed(TerminateRequested(rollback=rollback))

    def retry_rollback(self) -> Transition:
        return self.feed(RetryRollbackRequested())

    def types(self) -> list[str]:
        return [e["type"] for t in self.log for e in t.events]

    def sent(self, t: Transition | None = None) -> list[str]:
        """Dispatch ids of the last (or given) transition."""
        return [d.id for d in (t or self.log[-1]).dispatches]

    def outbox(self) -> list[str]:
        return sorted(self.run.outbox)
