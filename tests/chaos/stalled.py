"""What a stalled saga was waiting for: one not terminal when the run's drain ended.

A stalled saga is described from what the run can still read once the workers stopped:

- ``waits_for``: its outbox entries (messages recorded as due: were they ever started?), its
  open attempts (started, never ended: killed, or lost its end commit) with their worker
  losses and sweep re-sends, and ``nothing``: no message due and no attempt open, the state
  a lost ``next-step`` message or an unrecorded end leaves behind;
- ``leases``: the saga's lease keys still in Redis, their holder and time to live;
- ``steps``: each step and rollback handler that started, with its attempts; from the
  ledger, ``bodies_run`` (``"<kind>|<step>#<count>|<attempt>"``: times a body started) and
  the ``effects`` applied;
- ``last_events``: the tail of its event stream;
- ``log_tail``: the worker log lines that name one of its task ids (Celery's ``received``,
  ``retry``, ``succeeded``, ``WorkerLostError`` lines) or its id (saga_celery's warnings).

Ages are seconds before the description was made (the end of the run).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from saga_celery._celery.dispatch import _TASK_ID_NS
from saga_celery._core.model import AttemptRecord, Kind, SagaRun, StepRun
from saga_celery._store.keys import KeySpace
from tests.chaos.check import Ledger, Planned

LAST_EVENTS = 8
LOG_LINES = 14


def task_ids(run: SagaRun) -> dict[str, str]:
    """Task id -> ``"<kind>:<key>"`` of every step and rollback message the saga can send.

    A task keeps its id through Celery retries (``dispatch.build_message``: one id per
    retry budget), so these few ids find every delivery of the saga in the worker logs.
    """
    ids = {}
    for step in run.steps.values():
        budgets = [(Kind.STEP, 1)]
        if step.rollback is not None:
            budgets.append((Kind.ROLLBACK, step.rollback.budget_base))
        for kind, budget in budgets:
            task_id = uuid.uuid5(_TASK_ID_NS, f"{run.id}|{kind}|{step.key}|{budget}")
            ids[str(task_id)] = f"{kind}:{step.key}"
    return ids


class WorkerLogs:
    """Every line of the run's worker logs, searched per stalled saga."""

    def __init__(self, paths: list[Path]) -> None:
        self.texts = [path.read_text(errors="replace") for path in paths]
        """Each log whole, for the summary's counts."""
        self.lines = [(path.stem, line) for path, text in zip(paths, self.texts, strict=True)
                      for line in text.splitlines()]

    def naming(self, needles: list[str], limit: int = LOG_LINES) -> list[str]:
        found = [f"{name}: {line.strip()}" for name, line in self.lines
                 if any(n in line for n in needles)]
        return found[-limit:]


def describe(planned: Planned, run: SagaRun, version: int, events: list[dict[str, Any]],
             ledger: Ledger, client: redis.Redis, logs: WorkerLogs, now: datetime
             ) -> dict[str, Any]:
    """Everything the report says about one stalled saga."""
    ids = task_ids(run)
    return {
        "saga_id": run.id, "shape": planned.shape, "params": planned.params,
        "status": str(run.status), "version": version,
        "error": None if run.error is None else f"{run.error.type} at {run.error.step}",
        "rollback": None if run.rollback is None else (
            f"{run.rollback.outcome or 'running'}, {run.rollback.completed_steps}/"
            f"{run.rollback.total_steps} done, order {run.rollback.order}"),
        "waits_for": waits_for(run, now),
        "leases": leases(run.id, client),
        "steps": [line for step in run.steps.values() for line in _step_lines(step, now)],
        "bodies_run": ledger.runs,
        "effects": sorted(f"{e.kind} {e.key}" for e in ledger.effects),
        "last_events": [_event_line(e, now) for e in events[-LAST_EVENTS:]],
        "task_ids": {v: k for k, v in ids.items()},
        "log_tail": logs.naming([*ids, f"saga_id={run.id}", f"'{run.id}'"]),
    }


def waits_for(run: SagaRun, now: datetime) -> list[str]:
    """The messages due and the attempts open; ``nothing`` when there are neither."""
    found = [f"outbox {d.id}: due {_age(d.due_at, now)} s ago, never started "
             f"(via_retry={d.via_retry}, sweep re-sends {d.resends}, origin {d.origin})"
             for d in run.outbox.values()]
    for step in run.steps.values():
        for kind, item in ((Kind.STEP, step), (Kind.ROLLBACK, step.rollback)):
            if item is None:
                continue
            last = item.attempts[-1] if item.attempts else None
            if last is not None and last.ended_at is None:
                found.append(f"open {kind}:{step.key}:{last.attempt}: started "
                             f"{_age(last.started_at, now)} s ago, never ended "
                             f"(worker losses {last.losses}, sweep re-sends {last.resends})")
            if item.next_attempt is not None and not any(
                    d.kind == kind and d.key == step.key for d in run.outbox.values()):
                found.append(f"next {kind}:{step.key}:{item.next_attempt} recorded as sent, "
                             "but not in the outbox")
    return found or ["nothing: no message due, no attempt open"]


def leases(saga_id: str, client: redis.Redis) -> dict[str, str]:
    """The saga's lease keys still in Redis: holder token and time to live."""
    pattern = KeySpace().lease(saga_id, "*")
    found = {}
    for key in client.scan_iter(match=pattern):
        name = key.decode().rsplit(":lease:", 1)[1]
        holder, ttl = client.get(key), client.pttl(key)
        found[name] = f"{holder.decode() if holder else None} (ttl {ttl} ms)"
    return found


def _step_lines(step: StepRun, now: datetime) -> list[str]:
    lines = []
    if step.attempts or step.next_attempt is not None:
        lines.append(f"step {step.key} seq {step.start_seq} {step.status}: "
                     f"{_attempts(step.attempts, now)}; next {step.next_attempt}")
    handler = step.rollback
    if handler is not None and (handler.attempts or handler.next_attempt is not None):
        lines.append(f"rollback {step.key} {handler.status}: "
                     f"{_attempts(handler.attempts, now)}; next {handler.next_attempt}")
    return lines


def _attempts(records: list[AttemptRecord], now: datetime) -> str:
    parts = []
    for r in records:
        if r.ended_at is None:
            outcome = "open"
        elif r.success:
            outcome = "ok"
        else:
            outcome = r.error.type if r.error else "failed"
        extra = f" losses {r.losses}" if r.losses else ""
        extra += f" resends {r.resends}" if r.resends else ""
        parts.append(f"#{r.attempt} {outcome} at -{_age(r.started_at, now)} s{extra}")
    return ", ".join(parts) or "none"


def _event_line(event: dict[str, Any], now: datetime) -> str:
    at = datetime.fromisoformat(event["timestamp"])
    where = f" {event['step']}#{event.get('count')}" if event.get("step") else ""
    attempt = f" attempt {event['attempt']}" if event.get("attempt") else ""
    error = event.get("error") or {}
    failed = f" ({error.get('type')})" if error else ""
    return f"-{_age(at, now)} s {event['type']}{where}{attempt}{failed}"


def _age(at: datetime, now: datetime) -> float:
    return round((now - at).total_seconds(), 1)
