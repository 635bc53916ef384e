"""Plain-text views of sagas: the status table ``saga-celery status`` and the demo print.

One row per step, in declaration order: its start order, forward outcome and attempts, and
(once a rollback ran) its rollback outcome and attempts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from saga_celery._core.state import AttemptView, SagaState, StepView

STEP_COLUMNS = ("step", "start", "forward", "attempts", "rollback", "rollback attempts")


def render(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as left-aligned columns two spaces apart (the first row a header)."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def attempts_cell(attempts: Sequence[AttemptView]) -> str:
    """``"2 (failed, ok)"``: how many attempts, and how each ended; ``-`` for none."""
    if not attempts:
        return "-"
    outcomes = ["ok" if a.success else "failed" if a.success is False else "running"
                for a in attempts]
    return f"{len(attempts)} ({', '.join(outcomes)})"


def step_row(step: StepView, rolled_back: bool) -> list[str]:
    """One step's cells, in ``STEP_COLUMNS`` order."""
    handler = step.rollback
    rollback = ("-", "-") if handler is None or not rolled_back else (
        str(handler.status), attempts_cell(handler.attempts))
    start = "-" if step.start_seq is None else str(step.start_seq)
    return [step.name, start, str(step.status), attempts_cell(step.attempts), *rollback]


def header(state: SagaState) -> str:
    """``saga <id> (<name>): status=...`` with the output or error and the rollback outcome."""
    parts = [f"saga {state.id} ({state.name}): status={state.status}"]
    if state.error is not None:
        parts.append(f"error={state.error.type} in {state.error.step}: {state.error.message}")
    else:
        parts.append(f"output={json.dumps(state.output)}")
    rollback = state.rollback
    if rollback is None:
        parts.append("rollback=none")
    else:
        parts.append(f"rollback={rollback.outcome or 'running'} "
                     f"({rollback.completed_steps}/{rollback.total_steps} steps compensated)")
    return "  ".join(parts)


def failures(state: SagaState) -> list[str]:
    """Every failed attempt, step or rollback, oldest first."""
    failed = []
    for step in state.steps:
        runs = [("step", step.attempts)]
        if step.rollback is not None:
            runs.append(("rollback", step.rollback.attempts))
        for kind, attempts in runs:
            failed += [(a.started_at, f"{step.name} {kind} attempt {a.attempt}: "
                                      f"{a.error.type}: {a.error.message}")
                       for a in attempts if a.error is not None]
    return [line for _, line in sorted(failed)]


def rollback_order(events: Sequence[Mapping[str, Any]]) -> str:
    """The steps in the order their compensation started: ``c -> b -> a``."""
    started = [str(e["step"]) for e in events if e["type"] == "rollback_step_started"]
    return " -> ".join(started)


def status_lines(state: SagaState, events: Sequence[Mapping[str, Any]]) -> list[str]:
    """The header, the step table, the rollback order and the failed attempts."""
    rows = [list(STEP_COLUMNS), *(step_row(s, state.rollback is not None) for s in state.steps)]
    lines = [header(state), *(f"  {line}" for line in render(rows))]
    if state.rollback is not None:
        lines.append(f"  rolled back in reverse start order: {rollback_order(events)}")
    failed = failures(state)
    if failed:
        lines += ["  failed attempts:", *(f"    {line}" for line in failed)]
    return lines
