"""Where the run's task messages went in the broker, replayed from Redis's AOF.

The run's redis-server writes every command to its append-only file, with a timestamp line
each second and no rewrite (``procs.RedisServer``), so the file is the broker's whole
history.  Replaying the list and ``unacked`` commands of kombu's Redis transport tells, for
each saga message (one delivery tag: a new message, a retry, a re-queued wait), each step of
its life::

    sent      LPUSH/RPUSH of a new message onto a queue
    taken     a consumer's BRPOP took it (the AOF records it as RPOP)
    delivered the consumer recorded it in ``unacked`` (kombu's ``QoS.append``)
    acked     removed from ``unacked`` with nothing pushed back (an ack, or a reject)
    restored  removed from ``unacked`` and pushed back in one transaction (visibility
              timeout, a worker's warm shutdown, a reject with requeue)

A message ``taken`` and never ``delivered`` went to a consumer that died or lost its
connection before it recorded the message (kombu's take-then-record window): it is in no
queue and not in ``unacked``, so nothing in Redis can bring it back.  Every message of every
saga is kept (a saga's id is in each message's ``kwargsrepr`` header), with the second and
the position in the AOF of its latest take.
"""

from __future__ import annotations

import ast
import bisect
import json
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SAGA_ID_RE = re.compile(rb"'saga_id': '([^']+)'")
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


def clock(stamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(stamp))


@dataclass
class Message:
    """One delivery tag's life."""

    tag: str
    saga_id: str
    task: str
    task_id: str
    item: str
    """``"<kind>:<key>:<attempt>"``, as the saga's outbox names the attempt it carries."""
    life: list[str] = field(default_factory=list)
    state: str = "queued"
    """``queued``, ``taken`` (by a consumer, not recorded yet), ``unacked`` or ``acked``."""
    taken_at: tuple[float, int] = (0.0, 0)
    """The AOF second and command number of its latest take."""
    last: int = 0
    """The AOF command number of the latest step of its life."""

    def note(self, stamp: float, index: int, what: str) -> None:
        self.life.append(f"{what} {clock(stamp)}")
        self.last = index

    @property
    def lost(self) -> bool:
        """Taken by a consumer that never recorded it in ``unacked``."""
        return self.state == "taken"

    def line(self) -> str:
        """Task, attempt, its life, where it ended."""
        end = {"taken": " => LOST: taken by a consumer that never recorded it",
               "queued": " => still queued", "unacked": " => still unacked"}.get(self.state, "")
        return (f"{self.task}[{self.task_id[:8]}] {self.item} tag {self.tag[:8]}: "
                f"{', '.join(self.life)}{end}")


class Replay:
    """The broker history of every saga message, from the run's AOF."""

    def __init__(self) -> None:
        self.queues: dict[bytes, list[bytes]] = defaultdict(list)
        self.messages: dict[str, Message] = {}
        self.by_saga: dict[str, list[Message]] = defaultdict(list)
        self.commands = 0
        self._seconds: list[tuple[float, int]] = []
        """(AOF second, number of its first command), one per second that has commands."""
        self._removed: list[str] = []
        self._pushed: set[str] = set()
        self._in_multi = False

    def run(self, files: list[Path]) -> Replay:
        for path in files:
            for stamp, args in commands(path):
                self.commands += 1
                if not self._seconds or self._seconds[-1][0] != stamp:
                    self._seconds.append((stamp, self.commands))
                self._apply(stamp, args)
        return self

    def first_command_at(self, second: float) -> int:
        """The number of the first AOF command stamped ``second`` or later (past the end if
        none is)."""
        at = bisect.bisect_left(self._seconds, (second, 0))
        return self._seconds[at][1] if at < len(self._seconds) else self.commands + 1

    def history(self, saga_id: str) -> list[str]:
        """One line per message of the saga."""
        return ([m.line() for m in self.by_saga.get(saga_id, [])]
                or ["no message of this saga ever reached a queue"])

    def lost(self) -> list[Message]:
        """Every message taken by a consumer and never recorded."""
        return [m for m in self.messages.values() if m.lost]

    def _apply(self, stamp: float, args: list[bytes]) -> None:
        name = args[0].upper()
        if name in PUSHES:
            for raw in args[2:]:
                self._push(stamp, args[1], raw, left=name == b"LPUSH")
        elif name in POPS:
            self._pop(stamp, args)
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
        found = SAGA_ID_RE.search(raw)
        if found is None:
            return
        message = self._parse(raw, found.group(1).decode())
        if message.tag in self.messages:
            self._pushed.add(message.tag)
            return
        self.messages[message.tag] = message
        self.by_saga[message.saga_id].append(message)
        message.note(stamp, self.commands, f"sent to {queue.decode()}")

    def _pop(self, stamp: float, args: list[bytes]) -> None:
        queue = self.queues[args[1]]
        for _ in range(int(args[2]) if len(args) > 2 else 1):
            if not queue:
                return
            raw = queue.pop() if args[0].upper() == b"RPOP" else queue.pop(0)
            found = SAGA_ID_RE.search(raw)
            if found is not None:
                message = self.messages[json.loads(raw)["properties"]["delivery_tag"]]
                message.state, message.taken_at = "taken", (stamp, self.commands)
                message.note(stamp, self.commands, "taken")

    def _delivered(self, stamp: float, tag: str) -> None:
        message = self.messages.get(tag)
        if message is not None:
            message.state = "unacked"
            message.note(stamp, self.commands, "delivered")

    def _settle(self, stamp: float) -> None:
        for tag in self._removed:
            message = self.messages.get(tag)
            if message is not None:
                restored = tag in self._pushed
                message.state = "queued" if restored else "acked"
                message.note(stamp, self.commands, "restored" if restored else "acked")
        self._removed, self._pushed = [], set()

    @staticmethod
    def _parse(raw: bytes, saga_id: str) -> Message:
        payload = json.loads(raw)
        headers = payload.get("headers", {})
        try:
            control = ast.literal_eval(headers.get("kwargsrepr") or "")
            item = f"{control['kind']}:{control['step']}#{control['count']}:{control['attempt']}"
        except (ValueError, SyntaxError, TypeError, KeyError):
            item = "?"
        return Message(tag=payload["properties"]["delivery_tag"], saga_id=saga_id,
                       task=headers.get("task", "?"), task_id=headers.get("id", "?"), item=item)


def replay(data_dir: Path) -> Replay:
    """The broker history of the run whose Redis data directory is ``data_dir``."""
    return Replay().run(aof_files(data_dir))
