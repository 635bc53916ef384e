"""Stalled sagas whose awaited message was lost in kombu's take-then-record window.

kombu's Redis transport takes a message off its queue with ``BRPOP`` and only then records
it in the ``unacked`` hash (``QoS.append``), from which a dead consumer's messages come back.
A consumer that dies or loses its connection between the two (its worker SIGKILLed, its main
process crashed, Redis shut down with the reply in flight) loses the message: it is in no
queue and not in ``unacked``, so no redelivery and no visibility timeout brings it back.
Only a periodic check that knows the message is due (the recovery sweep, reading the saga's
outbox and its open attempts' leases) can re-send it; without beat nothing does.  No design
without such a check exists on this transport: the library runs only on the delivery of one
of the saga's messages, and the one left is gone with no trace in the broker; avoiding the
loss would need kombu to take and record in one step (say, ``BLMOVE`` into a per-consumer
list), which its Redis transport does not do.

A stalled saga counts as stalled *in the broker window* only when the AOF proves it, for
every message the saga waits for (each outbox entry never started, each open attempt's
redelivery; ``waits_for``):

- some message carrying that attempt was taken by a consumer and never recorded in
  ``unacked``, acked nor restored (``tests.chaos.broker``), and that take is the last thing
  that happened to any message carrying the attempt (no other one is queued or unacked);
- a consumer ended within ``NEAR_S`` of the take: a worker SIGKILLed by the run, a worker
  whose main process logged Celery's ``Unrecoverable error``, or one that logged losing its
  broker connection (a Redis shutdown).  A take with no consumer ending near it is not
  explained by the window.

Anything else (no message, a message acked, a saga waiting for nothing) stays ``stalled``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from saga_celery._core.model import Kind, SagaRun, dispatch_id
from tests.chaos.broker import Message, Replay, clock
from tests.chaos.check import ChaosEvent

NEAR_S = (1.0, 2.0)
"""A consumer ending this long before, or after, the AOF second of a take explains it.

The AOF stamps a command with Redis's cached clock, in whole seconds, so the take happened
within that second; a live consumer records it milliseconds later.  Redis can also hand a
blocked BRPOP to a client killed an instant earlier, before it noticed the closed socket."""
WORKER_LINE_RE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/MainProcess\] "
    r"(consumer: Connection to broker lost|Unrecoverable error: \w+)")
"""Celery's lines when a worker's consumer loses its connection, or its main loop crashes."""
REDIS_SHUTDOWN_RE = re.compile(r"(\d\d \w{3} \d{4} \d\d:\d\d:\d\d\.\d{3}) # User requested "
                               r"shutdown")


@dataclass(frozen=True)
class ConsumerEnd:
    """A worker's broker consumer ended: whatever it had taken and not recorded is lost."""

    t: float
    worker: str
    """The worker's log name (``<node>-<suffix>``)."""
    what: str

    def line(self) -> str:
        at = datetime.fromtimestamp(self.t).strftime("%H:%M:%S.%f")[:-3]
        return f"{self.worker}: {self.what} at {at}"


def consumer_ends(chaos: list[ChaosEvent], worker_lines: list[tuple[str, str]],
                  redis_log: Path) -> list[ConsumerEnd]:
    """Every consumer ending of the run: chaos kills of whole workers, and the crashes and
    lost connections the workers logged (``worker_lines``: (log name, line) pairs)."""
    ends = [ConsumerEnd(e.t, e.worker, "SIGKILLed by the chaos run (main process and pool)")
            for e in chaos if e.worker]
    shutdowns = redis_shutdowns(redis_log)
    for worker, line in worker_lines:
        found = WORKER_LINE_RE.match(line)
        if found is None:
            continue
        t = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        what = found.group(2)
        if what.startswith("consumer"):
            what = "lost its broker connection"
            cause = [s for s in shutdowns if 0 <= t - s <= NEAR_S[1]]
            if cause:
                what += f" (Redis shut down at {_precise(cause[-1])})"
        else:
            what = f"main process crashed ({what})"
        ends.append(ConsumerEnd(t, worker, what))
    return sorted(ends, key=lambda e: e.t)


def redis_shutdowns(redis_log: Path) -> list[float]:
    """When redis-server began each shutdown (its log's ``User requested shutdown``)."""
    if not redis_log.exists():
        return []
    return [datetime.strptime(m.group(1), "%d %b %Y %H:%M:%S.%f").timestamp()
            for m in REDIS_SHUTDOWN_RE.finditer(redis_log.read_text(errors="replace"))]


@dataclass
class Classified:
    """Whether a stalled saga stalled in the broker window, and the evidence either way."""

    in_window: bool
    evidence: list[dict[str, Any]]
    """Per message the saga waits for: the lost message and the consumer that took it."""
    reason: str = ""
    """When not in the window: the first awaited message the window does not explain."""


def classify(saga_id: str, awaited: list[tuple[str, str]], replay: Replay,
             ends: list[ConsumerEnd], shutdowns: list[float]) -> Classified:
    """Whether every message the saga waits for (``awaited_items``) was lost in kombu's
    take-then-record window."""
    if not awaited:
        return Classified(False, [], "it waits for no message it can tell (no outbox entry, "
                                     "no open attempt, or a next attempt not in the outbox)")
    messages = replay.by_saga.get(saga_id, [])
    evidence: list[dict[str, Any]] = []
    for label, item in awaited:
        found = _lost_in_window(label, item, [m for m in messages if m.item == item], replay,
                                ends, shutdowns)
        if isinstance(found, str):
            return Classified(False, evidence, found)
        evidence.append(found)
    return Classified(True, evidence)


def awaited_items(run: SagaRun) -> list[tuple[str, str]]:
    """(label, ``"<kind>:<key>:<attempt>"``) of each message the saga waits for: its outbox
    entries, and its open attempts (their redelivery); empty if a step records a next
    attempt that is not in the outbox (nothing would carry it)."""
    awaited = [(f"outbox {d.id} (never started)", d.id) for d in run.outbox.values()]
    for step in run.steps.values():
        for kind, item in ((Kind.STEP, step), (Kind.ROLLBACK, step.rollback)):
            if item is None:
                continue
            last = item.attempts[-1] if item.attempts else None
            if last is not None and last.ended_at is None:
                attempt = dispatch_id(kind, step.key, last.attempt)
                awaited.append((f"open {attempt} (started, never ended)", attempt))
            if item.next_attempt is not None and not any(
                    d.kind == kind and d.key == step.key for d in run.outbox.values()):
                return []
    return awaited


def _lost_in_window(label: str, item: str, messages: list[Message], replay: Replay,
                    ends: list[ConsumerEnd], shutdowns: list[float]) -> dict[str, Any] | str:
    """The evidence that ``item``'s message was lost in the window, or why it was not."""
    if not messages:
        return f"{label}: no message carrying it ever reached a queue"
    latest = max(messages, key=lambda m: m.last)
    pending = [m for m in messages if m.state in ("queued", "unacked")]
    if pending:
        return f"{label}: a message carrying it is still {pending[0].state}"
    if not latest.lost:
        return f"{label}: its latest message was {latest.state}, not lost in a take"
    second, index = latest.taken_at
    if not second:
        return f"{label}: its message was taken before the AOF's first timestamp: when is unknown"
    near = [e for e in ends if second - NEAR_S[0] <= e.t <= second + 1 + NEAR_S[1]]
    if not near:
        return (f"{label}: its message was taken at {clock(second)} and never recorded, but "
                "no consumer ended near then")
    takers = sorted({e.worker for e in near})
    return {
        "waits_for": label,
        "message": f"{latest.task}[{latest.task_id[:8]}] tag {latest.tag[:8]}",
        "life": ", ".join(latest.life),
        "taken": f"{clock(second)}, AOF command {index}"
                 f"{_before_shutdown(index, second, replay, shutdowns)}",
        "taker": takers[0] if len(takers) == 1 else f"one of {', '.join(takers)}",
        "taker_ended": [e.line() for e in near],
    }


def _before_shutdown(index: int, second: float, replay: Replay, shutdowns: list[float]) -> str:
    """How many AOF commands came between the take and a Redis shutdown right after it."""
    for at in shutdowns:
        if second <= at < second + 1 + NEAR_S[1]:
            after = replay.first_command_at(int(at) + 1) - index - 1
            return f" ({after} commands before Redis shut down at {_precise(at)})"
    return ""


def _precise(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]
