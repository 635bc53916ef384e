"""The verdict of a chaos run: every saga checked, and the run's JSON summary.

``evaluate`` reads each saga's state, events and ledger once the workers stopped, checks it
(``tests.chaos.check``) and adds it all up; the summary's figures are described in
``tests.chaos.run``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from saga_celery import SagaError
from tests.chaos.broker import Message, Replay, replay
from tests.chaos.chaos import Chaos
from tests.chaos.check import (
    ChaosEvent,
    Ledger,
    Planned,
    Verdict,
    check_saga,
    parse_ledger,
    recovery_by_kind,
    recovery_stalls,
)
from tests.chaos.procs import Fleet
from tests.chaos.stalled import WorkerLogs, describe
from tests.chaos.window import (
    ConsumerEnd,
    awaited_items,
    classify,
    consumer_ends,
    redis_shutdowns,
)

MAX_SAMPLES = 20
RECOVERED_RE = re.compile(r"saga\.recovered .*?saga_id=(\S+)")
"""The recovery sweep's log line: it re-sent a message of this saga."""
RESENT_RE = re.compile(r"saga\.recovered +messages=\[([^\]]*)\].*?saga_id=(\S+)")
"""The same line: which messages (``"<kind>:<key>:<attempt>"``) it re-sent."""
FATAL_RE = re.compile(r"Unrecoverable error: (\w+)")
"""Celery's log line when a worker's main loop crashes; the exception's class name."""
SWEEP_RECEIVED = "Task saga_celery.recover["
"""Celery's log line when a worker receives the recovery sweep task."""
MAX_STALLED_SAMPLES = 10
WINDOW_FIELDS = ("saga_id", "shape", "status", "waits_for", "broker_window", "broker")
"""What the summary shows of a saga stalled in the broker window (``chaos.json`` has all)."""


@dataclass
class Tally:
    """What checking the sagas one by one adds up to."""

    sagas: int = 0
    totals: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    stalls: list[tuple[float, ChaosEvent]] = field(default_factory=list)
    worst: tuple[float, str, ChaosEvent] | None = None
    gap: float = 0.0

    def add(self, planned: Planned, state: Any, ledger: Ledger, verdict: Verdict,
            stalls: list[tuple[float, ChaosEvent]], gap: float) -> None:
        self.sagas += 1
        if state is not None and state.status in ("complete", "errored"):
            self.totals[str(state.status)] += 1
        self.totals["violations"] += len(verdict.violations)
        self.totals["duplicate_effects"] += verdict.duplicate_effects
        self.totals["lost_sagas"] += int(verdict.lost)
        self.violations += [f"{planned.saga_id} ({planned.shape} {planned.params}): {v}"
                            for v in verdict.violations]
        if verdict.unexpected:
            self.totals["unexpected_outcomes"] += 1
            self.unexpected.append(f"{planned.saga_id}: {verdict.unexpected}")
        self.totals["bodies_run"] += sum(ledger.runs.values())
        self.totals["bodies_run_twice"] += sum(1 for n in ledger.runs.values() if n > 1)
        self.totals["effects_applied"] += len(ledger.effects)
        self.totals["effects_deduplicated"] += sum(n - 1 for n in ledger.applies.values())
        self.stalls += stalls
        for seconds, event in stalls:
            if self.worst is None or seconds > self.worst[0]:
                self.worst = (seconds, planned.saga_id, event)
        self.gap = max(self.gap, gap)


def evaluate(chaos_app: ModuleType, planned: list[Planned], chaos: Chaos, fleet: Fleet,
             started: float, redis_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check every saga: the run's summary (``started``: the run's wall-clock start), and
    what each saga not terminal was waiting for (``tests.chaos.stalled``), with its
    messages' broker history from the AOF in ``redis_dir`` (``tests.chaos.broker``) and
    whether they were lost in kombu's take-then-record window (``tests.chaos.window``)."""
    chaos_events = sorted(chaos.events, key=lambda e: e.t)
    logs = WorkerLogs(fleet.logs())
    checked, stalled = [], []
    for p in planned:
        state, ledger, events = _read(chaos_app, p.saga_id)
        checked.append((p, state, ledger, check_saga(p, state, ledger,
                                                     chaos_app.SAGAS[p.shape].plan), events))
        if state is not None and not state.is_terminal:
            stalled.append(_describe(chaos_app, p, events, ledger, logs))
    broker = replay(redis_dir)
    in_window = _classify(stalled, broker, consumer_ends(chaos_events, logs.lines,
                                                         redis_dir / "redis.log"),
                          redis_shutdowns(redis_dir / "redis.log"))
    tally = Tally()
    for p, state, ledger, verdict, events in checked:
        if p.saga_id in in_window:  # stalled, but by the broker: counted apart
            verdict.lost = False
            verdict.violations = [v for v in verdict.violations if not v.startswith("lost:")]
        tally.add(p, state, ledger, verdict, *recovery_stalls(events, chaos_events))
    window = [d for d in stalled if d["saga_id"] in in_window]
    stalled = [d for d in stalled if d["saga_id"] not in in_window]
    summary = _summary(tally, stalled, window, broker.lost(), chaos, fleet, started,
                       logs.texts)
    return summary, stalled + window


def _classify(stalled: list[dict[str, Any]], broker: Replay, ends: list[ConsumerEnd],
              shutdowns: list[float]) -> set[str]:
    """Add each stalled saga's broker history and window verdict to its description; the
    ids of those stalled in the window."""
    in_window = set()
    for description in stalled:
        run = description.pop("run")
        description["broker"] = broker.history(run.id)
        verdict = classify(run.id, awaited_items(run), broker, ends, shutdowns)
        description["broker_window"] = verdict.evidence if verdict.in_window else (
            f"no: {verdict.reason}")
        if verdict.in_window:
            in_window.add(run.id)
    return in_window


def _summary(tally: Tally, stalled: list[dict[str, Any]], window: list[dict[str, Any]],
             lost_messages: list[Message], chaos: Chaos, fleet: Fleet, started: float,
             logs: list[str]
             ) -> dict[str, Any]:
    recovery = recovery_by_kind(tally.stalls)
    where = None
    if tally.worst is not None:
        _, saga_id, event = tally.worst
        where = {"saga_id": saga_id, "after": event.detail,
                 "at_s": round(event.t - started, 1)}
    totals = tally.totals
    return {
        "sagas": tally.sagas, "complete": totals["complete"], "errored": totals["errored"],
        "kills": chaos.kills, **chaos.counts, "worker_crashes": len(fleet.revived),
        "redis_down_s": round(chaos.redis_unavailable_s, 2),
        "sigstop_s": chaos.stop_s, "sigstop_mid_body": chaos.sigstop_mid_body,
        **{k: totals[k] for k in ("violations", "duplicate_effects", "lost_sagas")},
        "stalled": len(stalled), "stalled_in_broker_window": len(window),
        "messages_lost_in_broker_window": len(lost_messages),
        "messages_lost_in_broker_window_resent_by_sweep": len(_resent(lost_messages, logs)),
        "unexpected_outcomes": totals["unexpected_outcomes"],
        "max_recovery_s": max((r["max"] for r in recovery.values()), default=0.0),
        "max_recovery_at": where, "recovery_by_event": recovery,
        "max_gap_s": round(tally.gap, 2),
        **{k: totals[k] for k in ("bodies_run", "bodies_run_twice", "effects_applied",
                                  "effects_deduplicated")},
        "recovery_resends": sum(text.count("saga.recovered") for text in logs),
        "sagas_recovered": len({m for text in logs for m in RECOVERED_RE.findall(text)}),
        "worker_crash_causes": sorted({m for text in logs for m in FATAL_RE.findall(text)}),
        "sweeps_run": sum(text.count(SWEEP_RECEIVED) for text in logs),
        "violation_samples": tally.violations[:MAX_SAMPLES],
        "unexpected_samples": tally.unexpected[:MAX_SAMPLES],
        "stalled_samples": stalled[:MAX_STALLED_SAMPLES],
        "broker_window_samples": [{k: d[k] for k in WINDOW_FIELDS}
                                  for d in window[:MAX_STALLED_SAMPLES]],
    }


def _resent(messages: list[Message], logs: list[str]) -> list[Message]:
    """Those of ``messages`` whose attempt the recovery sweep re-sent (after or not)."""
    resent = {(saga_id, item.strip(" '")) for text in logs
              for items, saga_id in RESENT_RE.findall(text) for item in items.split(",")}
    return [m for m in messages if (m.saga_id, m.item) in resent]


def _read(chaos_app: ModuleType, saga_id: str) -> tuple[Any, Ledger, list[dict[str, Any]]]:
    ledger = chaos_app.ledger
    pipe = ledger.pipeline(transaction=False)
    for what in ("effects", "applies", "runs"):
        pipe.hgetall(chaos_app.ledger_key(saga_id, what))
    effects, applies, runs = pipe.execute()
    try:
        handle = chaos_app.sagas.run(saga_id)
    except SagaError:
        return None, parse_ledger(effects, applies, runs), []
    return handle.status(), parse_ledger(effects, applies, runs), handle.events()


def _describe(chaos_app: ModuleType, planned: Planned, events: list[dict[str, Any]],
              ledger: Ledger, logs: WorkerLogs) -> dict[str, Any]:
    snapshot = chaos_app.sagas._store.load(planned.saga_id)
    description = describe(planned, snapshot.run, snapshot.version, events, ledger,
                           chaos_app.ledger, logs, datetime.now(UTC))
    return description | {"run": snapshot.run}
