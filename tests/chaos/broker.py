"""Where a stalled saga's task messages went in the broker, replayed from Redis's AOF.

The run's redis-server writes every command to its append-only file, with a timestamp line
each second and no rewrite (``procs.RedisServer``), so the file is the broker's whole
history.  Replaying the list and ``unacked`` commands of kombu's Redis transport tells, for
each message of a saga (one delivery tag: a new message, a retry, a re-queued wait), each
step of its life::

    sent      LPUSH/RPUSH of a new message onto a queue
    taken     a consumer's BRPOP took it (the AOF records it as RPOP)
    delivered the consumer recorded it in ``unacked`` (kombu's ``QoS.append``)
    acked     removed from ``unacked`` with nothing pushed back (an ack, or a reject)
    restored  removed from ``unacked`` and pushed back in one transaction (visibility
              timeout, a worker's warm shutdown, a reject with requeue)

A message ``taken`` and never ``delivered`` went to a consumer that died or stopped reading
before it recorded the message: nothing in Redis can bring it back.  Only what names the
saga (its id is in every message's ``kwargsrepr`` header) is kept.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ATTEMPT_RE = re.compile(r"'attempt': (\d+)")
PUSHES = frozenset({b"LPUSH", b"RPUSH"})
POPS = frozenset({b"LPOP", b"RPOP"})


def commands(path: Path) -> Iterator[tuple[float, list[bytes]]]:
    """(timestamp, command) pairs of one AOF file in RESP; timestamp 0 before the first."""
    data = path.read_bytes()
    i, stamp = 0, 0.0
    while i < len(data):
        end = data.index(b"\n", i)
        if data[i:i + 1] != b"*":  # "#TS:<epoch>" annotation
            if data.startswith(b"#TS:", i):
                stamp = float(data[i + 4:end])
            i = end + 1
            continue
        count, i = int(data[i + 1:end - 1]), end + 1
        args = []
        for _ in range(count):
            end = data.index(b"\r\n", i)
            size = int(data[i + 1:end])
            args.append(data[end + 2:end + 2 + size])
            i = end + 2 + size + 2
        yield stamp, args


def aof_files(directory: Path) -> list[Path]:
    """The AOF's files in order: Redis 7's incremental files (its base is empty: the run
    never rewrites), or the one file of an older Redis."""
    manifest = directory / "appendonlydir" / "appendonly.aof.manifest"
    if not manifest.exists():
        single = directory / "appendonly.aof"
        return [single] if single.exists() else []
    names = [line.split()[1] for line in manifest.read_text().splitlines()
             if " type i" in line]
    return [manifest.parent / name for name in names]


@dataclass
class Message:
    """One delivery tag's life."""

    task: str
    task_id: str
    attempt: str
    steps: list[str] = field(default_factory=list)
    taken: bool = False
    delivered: bool = False

    def note(self, stamp: float, what: str) -> None:
        self.steps.append(f"{what} {time.strftime('%H:%M:%S', time.localtime(stamp))}")


class Replay:
    """The broker history of the messages that name any of the given sagas."""

    def __init__(self, saga_ids: set[str]) -> None:
        self.needles = {f"'saga_id': {s!r}".encode(): s for s in saga_ids}
        self.queues: dict[bytes, list[bytes]] = defaultdict(list)
        self.messages: dict[str, Message] = {}
        self.owner: dict[str, str] = {}
        """delivery tag -> saga id."""
        self._removed: list[str] = []
        self._pushed: set[str] = set()
        self._in_multi = False

    def run(self, files: list[Path]) -> None:
        for path in files:
            for stamp, args in commands(path):
                self._apply(stamp, args)

    def _apply(self, stamp: float, args: list[bytes]) -> None:
        name = args[0].upper()
        if name in PUSHES:
            for raw in args[2:]:
                self._push(stamp, args[1], raw, left=name == b"LPUSH")
        elif name in POPS:
            self._pop(stamp, args, right=name == b"RPOP")
        elif name == b"HSET" and args[1] == b"unacked":
            self._delivered(stamp, args[2].decode())
        elif name == b"HDEL" and args[1] == b"unacked":
            self._removed += [tag.decode() for tag in args[2:]]
            if not self._in_multi:
                self._settle(stamp)
        elif name == b"MULTI":
            self._in_multi = True
        elif name == b"EXEC":
            self._in_multi = False
            self._settle(stamp)

    def _push(self, stamp: float, queue: bytes, raw: bytes, *, left: bool) -> None:
        if left:
            self.queues[queue].insert(0, raw)
        else:
            self.queues[queue].append(raw)
        if not any(n in raw for n in self.needles):
            return
        tag, message = self._parse(raw)
        if tag in self.messages:
            self._pushed.add(tag)
            return
        self.messages[tag] = message
        message.note(stamp, f"sent to {queue.decode()}")

    def _pop(self, stamp: float, args: list[bytes], *, right: bool) -> None:
        queue = self.queues[args[1]]
        for _ in range(int(args[2]) if len(args) > 2 else 1):
            if not queue:
                return
            raw = queue.pop() if right else queue.pop(0)
            if any(n in raw for n in self.needles):
                message = self.messages[self._parse(raw)[0]]
                message.taken, message.delivered = True, False
                message.note(stamp, "taken")

    def _delivered(self, stamp: float, tag: str) -> None:
        message = self.messages.get(tag)
        if message is not None:
            message.delivered = True
            message.note(stamp, "delivered")

    def _settle(self, stamp: float) -> None:
        for tag in self._removed:
            message = self.messages.get(tag)
            if message is not None:
                message.taken = False
                message.note(stamp, "restored" if tag in self._pushed else "acked")
        self._removed, self._pushed = [], set()

    def _parse(self, raw: bytes) -> tuple[str, Message]:
        payload = json.loads(raw)
        headers = payload.get("headers", {})
        tag = payload["properties"]["delivery_tag"]
        self.owner[tag] = next(s for n, s in self.needles.items() if n in raw)
        attempt = ATTEMPT_RE.search(headers.get("kwargsrepr") or "")
        return tag, Message(task=headers.get("task", "?"), task_id=headers.get("id", "?"),
                            attempt=attempt.group(1) if attempt else "?")

    def history(self, saga_id: str) -> list[str]:
        """One line per message of the saga: task, attempt, its life, where it ended."""
        lines = []
        for tag, message in self.messages.items():
            if self.owner[tag] != saga_id:
                continue
            end = ""
            if message.taken and not message.delivered:
                end = " => LOST: taken by a consumer that never recorded it"
            elif any(tag.encode() in raw for q in self.queues.values() for raw in q):
                end = " => still queued"
            lines.append(f"{message.task}[{message.task_id[:8]}] attempt {message.attempt} "
                         f"tag {tag[:8]}: {', '.join(message.steps)}{end}")
        return lines or ["no message of this saga ever reached a queue"]


def broker_histories(data_dir: Path, saga_ids: set[str]) -> dict[str, list[str]]:
    """Saga id -> its messages' broker history, read from the run's AOF."""
    if not saga_ids:
        return {}
    replay = Replay(saga_ids)
    replay.run(aof_files(data_dir))
    return {saga_id: replay.history(saga_id) for saga_id in saga_ids}
