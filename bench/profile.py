"""Where the time goes in the pool processes: pyinstrument (wall) and py-spy (CPU) summaries."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

# --- profile ---------------------------------------------------------------------------------


def profile_summary(profile_dir: Path, text_out: Path | None) -> dict[str, Any]:
    """Inclusive and self time per function inside task execution, % of all task time."""
    from pyinstrument.renderers import ConsoleRenderer
    from pyinstrument.session import Session

    sessions = [Session.load(str(p)) for p in sorted(profile_dir.glob("*.pyisession"))]
    if not sessions:
        return {"error": "no profile was saved"}
    session = sessions[0]
    for other in sessions[1:]:
        session = Session.combine(session, other)
    tasks = _task_frames(session.root_frame())
    total = sum(f.time for f in tasks) or 1.0
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for frame in tasks:
        _walk(frame, inclusive, own, ())
    if text_out is not None:
        text_out.write_text(ConsoleRenderer(unicode=True, color=False, show_all=False,
                                            timeline=False).render(session))
    return {
        "task_time_s": round(total, 3),
        "tasks_profiled": len(tasks),
        "top_inclusive": [{"function": f, "pct": round(100 * t / total, 1)}
                          for f, t in inclusive.most_common(40)],
        "top_self": [{"function": f, "pct": round(100 * t / total, 1)}
                     for f, t in own.most_common(25)],
    }


_FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def pyspy_summary(raw: Path) -> dict[str, Any]:
    """CPU samples from ``py-spy record --format raw --subprocesses``, idle time excluded.

    Pool processes: inclusive and self samples per function inside task execution, as % of
    all task samples.  The main process: inclusive samples per function, % of its samples.
    """
    roles: Counter[str] = Counter()
    task_total = 0
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    main: Counter[str] = Counter()
    main_own: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n, frames = int(count), stack.split(";")
        role = "pool" if sum(f.startswith("process ") for f in frames) > 1 else "main"
        roles[role] += n
        code = [_function(f) for f in frames if not f.startswith("process ")]
        if not code:
            continue
        if role == "main":
            for name in set(code):
                main[name] += n
            main_own[code[-1]] += n
            continue
        start = next((i for i, f in enumerate(code) if _is_trace_task(f)), None)
        if start is None:
            continue
        task_total += n
        for name in set(code[start:]):
            inclusive[name] += n
        own[code[-1]] += n
    return {
        "samples": dict(roles), "pool_task_samples": task_total,
        "pool_in_tasks_pct": round(100 * task_total / max(roles["pool"], 1), 1),
        "top_inclusive": _shares(inclusive, task_total, 40),
        "top_self": _shares(own, task_total, 25),
        "main_top_inclusive": _shares(main, roles["main"], 60),
        "main_top_self": _shares(main_own, roles["main"], 20),
    }


def _is_trace_task(function: str) -> bool:
    """Celery's per-task tracer, ``build_tracer.<locals>.trace_task`` in py-spy's names."""
    return function.split(" (", 1)[0].rsplit(".", 1)[-1] == "trace_task"


def _function(frame: str) -> str:
    match = _FRAME.match(frame)
    return f"{match['fn']} ({match['file']})" if match else frame


def _shares(counts: Counter[str], total: int, top: int) -> list[dict[str, Any]]:
    return [{"function": f, "pct": round(100 * n / max(total, 1), 1)}
            for f, n in counts.most_common(top)]


def _task_frames(root: Any) -> list[Any]:
    """The outermost frames that run one task (Celery's ``trace_task``)."""
    found, stack = [], [root] if root is not None else []
    while stack:
        frame = stack.pop()
        if frame.function in ("trace_task", "fast_trace_task") and "celery" in (
                frame.file_path or ""):
            found.append(frame)
            continue
        stack.extend(frame.children)
    return found


def _walk(frame: Any, inclusive: Counter[str], own: Counter[str], seen: tuple[str, ...]) -> None:
    if frame.is_synthetic:  # "[self]" and the like: already in the parent's self time
        return
    name = f"{frame.function} ({frame.file_path_short or '?'})"
    if name not in seen:
        inclusive[name] += frame.time
    own[name] += frame.total_self_time
    for child in frame.children:
        _walk(child, inclusive, own, (*seen, name))


