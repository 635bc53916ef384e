"""What the dashboard shows, computed from what the public reading API returns (pure).

A saga page is built from two things only: the saga's ``SagaState`` as JSON (``run.status()``
dumped, so fields a later release adds to a step entry, such as a sleep's or a wait's
``kind``, pass through untouched) and its events (``run.events()``).  Nothing here reads a
store, a clock or the network: ``now`` comes in, so a test gives any.

The timeline is drawn by generic fields alone: every entry of ``steps`` with a ``kind``
(``"step"`` when absent), a ``status``, and either ``attempts`` (each with ``attempt``,
``started_at``, ``ended_at``, ``success``, ``error``) or its own ``started_at``/``ended_at``;
and every step's ``rollback`` with its ``attempts``.  A sleep or a wait (SPEC section 8) is
such an entry with one attempt, drawn in the "sleeping or waiting" colour (red if it timed
out or was cancelled) and without an attempt number: waits are never retried.  The times a
saga stood held are not in its state but in its events (``saga_held`` up to
``saga_redriven``, ``rollback_started`` or ``terminate_requested``): ``held_periods``, drawn
as a row ``held`` beneath the steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from saga_celery._celery.dispatch import task_id
from saga_celery._core.model import Kind
from saga_celery.dashboard.fields import error_text, held_periods, when

__all__ = [
    "OUTCOMES",
    "Bar",
    "Row",
    "StepLine",
    "Timeline",
    "flower_link",
    "list_row",
    "rollback_budgets",
    "step_lines",
    "timeline",
]

TERMINAL = frozenset({"complete", "errored", "terminated"})
"""Saga statuses after which nothing changes (the page stops refreshing)."""

OUTCOMES: dict[str, str] = {
    "complete": "succeeded",
    "failed": "failed",
    "running": "running",
    "held": "held",
    "waiting": "sleeping or waiting",
    "lost": "never ended (no end recorded)",
}
"""Every bar outcome, and what the legend says of it (the colours are in dashboard.css)."""

MIN_WIDTH_PCT = 0.6
"""The narrowest bar drawn, in percent of the axis, so a millisecond's attempt still shows."""

_FAILED_STATUSES = frozenset({"errored", "failed", "timed_out", "cancelled"})
_WAITING_KINDS = frozenset({"sleep", "wait"})


@dataclass(frozen=True, kw_only=True)
class Bar:
    """One attempt (of a step, a rollback, a sleep or a wait) on the time axis."""

    lane: str
    """``forward`` (steps, sleeps, waits) or ``rollback``."""
    row: int
    """Its row within the lane: one row per step entry, or per rollback in the order it ran."""
    kind: str
    name: str
    count: int
    attempt: int | None
    outcome: str
    """A key of ``OUTCOMES``: the bar's colour."""
    label: str
    title: str
    """The hover text: what it was, when, how it ended, and its error."""
    started_at: datetime
    ended_at: datetime | None
    left_pct: float
    width_pct: float
    task_url: str | None = None


@dataclass(frozen=True, kw_only=True)
class Timeline:
    """Every bar of one saga, forward lane first, on one axis from ``start`` to ``end``."""

    start: datetime
    end: datetime
    forward_rows: int
    rollback_rows: int
    bars: list[Bar] = field(default_factory=list)
    ticks: list[tuple[float, str]] = field(default_factory=list)
    """Axis labels: (percent, seconds since the start)."""


@dataclass(frozen=True, kw_only=True)
class StepLine:
    """One line of the step table."""

    start_seq: int | None
    name: str
    count: int
    stage: int
    kind: str
    status: str
    attempts: int
    rollback_status: str
    rollback_attempts: int
    error: str
    task_urls: list[tuple[str, str]]
    """(what, Flower URL) of the step's task and of each rollback budget's task."""


@dataclass(frozen=True, kw_only=True)
class Row:
    """One saga in the list."""

    id: str
    name: str
    status: str
    rollback: str
    created_at: str
    ended_at: str
    duration: str

    def as_json(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "status": self.status,
                "rollback": self.rollback, "created_at": self.created_at,
                "ended_at": self.ended_at, "duration": self.duration}


def step_key(entry: Mapping[str, Any]) -> str:
    """The step's key in the plan, which its task ids are made of."""
    return f"{entry['name']}#{entry['count']}"


def flower_link(flower_url: str | None, task: str) -> str | None:
    """Flower's page of the task with id ``task`` (``<flower>/task/<id>``), or None."""
    if not flower_url:
        return None
    return f"{flower_url.rstrip('/')}/task/{quote(task, safe='')}"


def rollback_budgets(events: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], list[int]]:
    """(step, count) -> the attempt numbers that opened each of its rollback's retry budgets.

    A handler's first attempt of a budget is announced by ``rollback_step_started`` right
    before its ``rollback_attempt_started`` (``retry_rollback()`` opens a new budget, and
    with it a new task id).
    """
    opening: set[tuple[str, int]] = set()
    budgets: dict[tuple[str, int], list[int]] = {}
    for event in events:
        kind = event.get("type")
        who = (str(event.get("step")), int(event.get("count") or 1))
        if kind == "rollback_step_started":
            opening.add(who)
        elif kind == "rollback_attempt_started" and who in opening:
            opening.discard(who)
            budgets.setdefault(who, []).append(int(event["attempt"]))
    return budgets


def _budget_of(attempt: int, starts: Sequence[int]) -> int:
    return max((s for s in starts if s <= attempt), default=1)


def _outcome(success: Any, ended: datetime | None, *, entry_status: str, kind: str,
             terminal: bool) -> str:
    """The bar's colour.  A sleep or a wait that ended as it should (its time passed, its
    event came) stays ``waiting``: time spent waiting, not work done; a wait that timed out
    or was cancelled is ``failed``."""
    if success is True:
        return "waiting" if kind in _WAITING_KINDS else "complete"
    if success is False:
        return "failed"
    if ended is not None:
        if entry_status in _FAILED_STATUSES:
            return "failed"
        return "waiting" if kind in _WAITING_KINDS else "complete"
    if terminal:
        return "lost"
    return "waiting" if kind in _WAITING_KINDS else "running"


@dataclass(frozen=True, kw_only=True)
class _Span:
    lane: str
    row: int
    kind: str
    name: str
    count: int
    attempt: int | None
    outcome: str
    started_at: datetime
    ended_at: datetime | None
    error: str
    task: str | None


def _entry_spans(entry: Mapping[str, Any], row: int, saga_id: str, *,
                 terminal: bool) -> list[_Span]:
    kind = str(entry.get("kind") or "step")
    status = str(entry.get("status") or "")
    name, count = str(entry["name"]), int(entry.get("count") or 1)
    attempts = entry.get("attempts") or []
    spans = []
    for attempt in attempts:
        started = when(attempt.get("started_at"))
        if started is None:
            continue
        ended = when(attempt.get("ended_at"))
        task = task_id(saga_id, Kind.STEP, step_key(entry), 1) if kind == "step" else None
        number = None if kind in _WAITING_KINDS else int(attempt["attempt"])  # never retried
        spans.append(_Span(
            lane="forward", row=row, kind=kind, name=name, count=count,
            attempt=number, started_at=started, ended_at=ended,
            outcome=_outcome(attempt.get("success"), ended, entry_status=status, kind=kind,
                             terminal=terminal),
            error=error_text(attempt.get("error")), task=task))
    started = when(entry.get("started_at"))
    if not spans and started is not None:  # an entry timed as a whole: a sleep, a wait
        ended = when(entry.get("ended_at"))
        success = {"complete": True}.get(status, False if status in _FAILED_STATUSES else None)
        spans.append(_Span(
            lane="forward", row=row, kind=kind, name=name, count=count, attempt=None,
            started_at=started, ended_at=ended,
            outcome=_outcome(success, ended, entry_status=status, kind=kind, terminal=terminal),
            error=error_text(entry.get("error")), task=None))
    return spans


def _rollback_spans(entry: Mapping[str, Any], row: int, saga_id: str,
                    budgets: Sequence[int], *, terminal: bool) -> list[_Span]:
    handler = entry.get("rollback") or {}
    status = str(handler.get("status") or "")
    spans = []
    for attempt in handler.get("attempts") or []:
        started = when(attempt.get("started_at"))
        if started is None:
            continue
        ended = when(attempt.get("ended_at"))
        number = int(attempt["attempt"])
        spans.append(_Span(
            lane="rollback", row=row, kind="rollback", name=str(entry["name"]),
            count=int(entry.get("count") or 1), attempt=number, started_at=started,
            ended_at=ended,
            outcome=_outcome(attempt.get("success"), ended, entry_status=status,
                             kind="rollback", terminal=terminal),
            error=error_text(attempt.get("error")),
            task=task_id(saga_id, Kind.ROLLBACK, step_key(entry), _budget_of(number, budgets))))
    return spans


def _held_spans(events: Sequence[Mapping[str, Any]], row: int) -> list[_Span]:
    """The times the saga stood held, on one row of their own beneath the steps."""
    return [_Span(lane="forward", row=row, kind="hold", name="held", count=1, attempt=None,
                  outcome="held", started_at=p.started_at, ended_at=p.ended_at,
                  error="; ".join(filter(None, [p.error, _HELD_ENDS.get(p.outcome, "")])),
                  task=None)
            for p in held_periods(events)]


_HELD_ENDS = {"redriven": "then redriven", "rolled_back": "then rolled back",
              "terminated": "then terminated"}


def _first_start(entry: Mapping[str, Any], *, rollback: bool) -> datetime | None:
    source = (entry.get("rollback") or {}) if rollback else entry
    starts = [when(a.get("started_at")) for a in source.get("attempts") or []]
    starts.append(None if rollback else when(entry.get("started_at")))
    known = [s for s in starts if s is not None]
    return min(known) if known else None


def _spans(state: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> list[_Span]:
    saga_id = str(state["id"])
    terminal = str(state.get("status")) in TERMINAL
    entries = list(state.get("steps") or [])
    begun = [(start, e.get("start_seq") or 0, n, e) for n, e in enumerate(entries)
             if (start := _first_start(e, rollback=False)) is not None]
    forward = [e for *_, e in sorted(begun, key=lambda item: item[:3])]
    spans = [s for row, e in enumerate(forward)
             for s in _entry_spans(e, row, saga_id, terminal=terminal)]
    spans += _held_spans(events, len(forward))
    # The rollback beneath, in the order it ran: by each handler's first attempt.
    started = [(start, n, e) for n, e in enumerate(entries)
               if (start := _first_start(e, rollback=True)) is not None]
    handlers = [e for _, _, e in sorted(started, key=lambda item: (item[0], item[1]))]
    budgets = rollback_budgets(events)
    for row, entry in enumerate(handlers):
        who = (str(entry["name"]), int(entry.get("count") or 1))
        spans += _rollback_spans(entry, row, saga_id, budgets.get(who, [1]), terminal=terminal)
    return spans


def timeline(state: Mapping[str, Any], events: Sequence[Mapping[str, Any]], *,
             now: datetime, flower_url: str | None = None) -> Timeline:
    """The saga's bars on one axis: from its creation to its end (``now`` while it runs)."""
    spans = _spans(state, events)
    start = min([when(state.get("created_at")) or now, *(s.started_at for s in spans)])
    ends = [when(state.get("ended_at")), *(s.ended_at for s in spans)]
    end = max([e for e in ends if e is not None] + [start])
    if str(state.get("status")) not in TERMINAL:
        end = max(end, now)
    total = max((end - start).total_seconds(), 0.001)
    bars = [_bar(s, start, end, total, flower_url) for s in spans]
    rows = {lane: 1 + max((b.row for b in bars if b.lane == lane), default=-1)
            for lane in ("forward", "rollback")}
    return Timeline(start=start, end=end, forward_rows=rows["forward"],
                    rollback_rows=rows["rollback"], bars=bars, ticks=_ticks(total))


def _bar(span: _Span, start: datetime, end: datetime, total: float,
         flower_url: str | None) -> Bar:
    ended = span.ended_at or end
    left = (span.started_at - start).total_seconds() / total * 100
    width = max((ended - span.started_at).total_seconds() / total * 100, MIN_WIDTH_PCT)
    left = min(max(left, 0.0), 100 - MIN_WIDTH_PCT)
    what = ("rollback of " + span.name if span.lane == "rollback"
            else span.name if span.kind == "hold" else f"{span.kind} {span.name}")
    attempt = "" if span.attempt is None else f" #{span.attempt}"
    suffix = " rollback" if span.lane == "rollback" else ""
    label = f"{span.name}{'' if span.count == 1 else f' ({span.count})'}{suffix}{attempt}"
    took = _seconds(ended - span.started_at)
    title = (f"{what}{'' if span.count == 1 else f' (count {span.count})'}"
             f"{'' if span.attempt is None else f', attempt {span.attempt}'}: "
             f"{OUTCOMES[span.outcome]}, {took} from +{_seconds(span.started_at - start)}"
             f"{f' — {span.error}' if span.error else ''}")
    return Bar(lane=span.lane, row=span.row, kind=span.kind, name=span.name,
               count=span.count, attempt=span.attempt, outcome=span.outcome, label=label,
               title=title, started_at=span.started_at, ended_at=span.ended_at,
               left_pct=round(left, 3), width_pct=round(min(width, 100 - left), 3),
               task_url=None if span.task is None else flower_link(flower_url, span.task))


def _seconds(span: timedelta) -> str:
    seconds = span.total_seconds()
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _ticks(total: float, count: int = 5) -> list[tuple[float, str]]:
    return [(i * 100 / count, _seconds(timedelta(seconds=total * i / count)))
            for i in range(count + 1)]


def step_lines(state: Mapping[str, Any], events: Sequence[Mapping[str, Any]], *,
               flower_url: str | None = None) -> list[StepLine]:
    """The step table: every step entry in start order (those never started last)."""
    saga_id = str(state["id"])
    budgets = rollback_budgets(events)
    entries = sorted(state.get("steps") or [],
                     key=lambda e: (e.get("start_seq") is None, e.get("start_seq") or 0))
    return [_step_line(e, saga_id, budgets, flower_url) for e in entries]


def _step_line(entry: Mapping[str, Any], saga_id: str,
               budgets: Mapping[tuple[str, int], list[int]],
               flower_url: str | None) -> StepLine:
    kind = str(entry.get("kind") or "step")
    handler = entry.get("rollback") or {}
    attempts = entry.get("attempts") or []
    errors = [error_text(a.get("error")) for a in attempts if a.get("error")]
    errors += [error_text(handler.get("error"))] if handler.get("error") else []
    links = []
    if kind == "step" and attempts:
        links.append(("step", task_id(saga_id, Kind.STEP, step_key(entry), 1)))
    who = (str(entry["name"]), int(entry.get("count") or 1))
    if handler.get("attempts"):
        for budget in budgets.get(who, [1]):
            links.append((f"rollback from #{budget}",
                          task_id(saga_id, Kind.ROLLBACK, step_key(entry), budget)))
    urls = [(what, url) for what, task in links
            if (url := flower_link(flower_url, task)) is not None]
    return StepLine(start_seq=entry.get("start_seq"), name=who[0], count=who[1],
                    stage=int(entry.get("stage") or 0), kind=kind,
                    status=str(entry.get("status") or ""), attempts=len(attempts),
                    rollback_status=str(handler.get("status") or "-"),
                    rollback_attempts=len(handler.get("attempts") or []),
                    error=errors[-1] if errors else "", task_urls=urls)


def list_row(*, saga_id: str, name: str, status: str, rollback: str | None,
             created_at: datetime, ended_at: datetime | None) -> Row:
    """One line of the saga list."""
    duration = "" if ended_at is None else _seconds(ended_at - created_at)
    return Row(id=saga_id, name=name, status=status, rollback=rollback or "-",
               created_at=created_at.isoformat(timespec="seconds"),
               ended_at="" if ended_at is None else ended_at.isoformat(timespec="seconds"),
               duration=duration)
