"""Every Redis key and field name saga_celery writes, in one place.

Per saga, all keys carry the hash tag ``{<id>}`` so Redis Cluster puts them in one slot and
one Lua script may touch them all::

    <prefix>{<id>}:state          hash    v = version (int), d = the run's progress JSON,
                                          j = starts committed since d, one JSON line each
                                              (absent when none: ``_store/journal.py``),
                                          p = its plan JSON (written once, at the start),
                                          t = 1 if the saga is terminal, else 0
                                          Once a saga of format 4+ ended (``history.py``):
                                          c = its compacted history (progress, plan and
                                              events, compressed), d = a format marker,
                                              p, j and the event stream deleted; or, with
                                              an archive, a tombstone: a = the archive
                                              marker, s = its status, d = the marker
    <prefix>{<id>}:events         stream  one field, e = the event's JSON
    <prefix>{<id>}:lease:<name>   string  the holder's token, with a PX time to live

Global keys (no hash tag; never touched inside a saga's Lua script, so Cluster works)::

    <prefix>index                 zset    every saga id, score = created_at in epoch ms
    <prefix>active                zset    ids that may not be terminal yet, same score
    <prefix>corrupt               zset    ids the recovery sweep could not read and moved
                                          out of ``active``, score = when, in epoch ms
    <prefix>corrupt:why           hash    id -> the error that reading it raised
    <prefix>timers                zset    the timers (SPEC section 8): member = JSON
                                          [saga id, outbox entry id], score = due time in
                                          epoch ms (a claimed one: when its claim lapses).
                                          On one Redis (or Sentinel) the create or commit
                                          script writes it; on Cluster their pipeline does
                                          (another slot), and a redelivery of the message
                                          whose commit it was (or the sweep) repairs a
                                          timer a cut pipeline left out
    <prefix>finishing             zset    ids of ended sagas not yet compacted or archived,
                                          score = when marked (epoch ms); written with
                                          the commit that ends the saga (``finisher.py``)
    <prefix>health                hash    what the last recovery sweep saw (``SweepRecord``),
                                          replaced by one HSET as each sweep ends:
                                          swept_at_ms, sagas, overdue (ints),
                                          oldest_overdue_ms, oldest_overdue_saga,
                                          oldest_overdue_message ("" when none overdue),
                                          interval_ms (only a sweep beat started writes it)

An id moves to ``corrupt`` before it leaves ``active`` (a crash between the two leaves it in
both, and the next sweep moves it again).  ``saga-celery list --corrupt`` lists them; once
the record is repaired, ``ZADD <prefix>active <created_at ms> <id>`` gives it back to the
sweep, and ``ZREM``/``HDEL`` of the id takes it off the list.
"""

from __future__ import annotations

from dataclasses import dataclass

from saga_celery._core.model import SagaRun

DEFAULT_PREFIX = "saga:"

VERSION_FIELD = "v"
DATA_FIELD = "d"
PLAN_FIELD = "p"
JOURNAL_FIELD = "j"
TERMINAL_FIELD = "t"
EVENT_FIELD = "e"
HISTORY_FIELD = "c"
ARCHIVED_FIELD = "a"
STATUS_FIELD = "s"

SWEPT_AT_FIELD = "swept_at_ms"
SAGAS_FIELD = "sagas"
OVERDUE_FIELD = "overdue"
OLDEST_OVERDUE_FIELD = "oldest_overdue_ms"
OLDEST_SAGA_FIELD = "oldest_overdue_saga"
OLDEST_MESSAGE_FIELD = "oldest_overdue_message"
INTERVAL_FIELD = "interval_ms"


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Key names under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            # Cluster hashes the first {...} of a key: a brace in the prefix would hide the
            # saga's own hash tag and scatter one saga's keys over several slots.
            raise ValueError(f"a saga key prefix may not contain '{{' or '}}': {self.prefix!r}")

    def state(self, saga_id: str) -> str:
        return f"{self._tagged(saga_id)}:state"

    def events(self, saga_id: str) -> str:
        return f"{self._tagged(saga_id)}:events"

    def lease(self, saga_id: str, name: str) -> str:
        return f"{self._tagged(saga_id)}:lease:{name}"

    @property
    def index(self) -> str:
        return f"{self.prefix}index"

    @property
    def active(self) -> str:
        return f"{self.prefix}active"

    @property
    def corrupt(self) -> str:
        return f"{self.prefix}corrupt"

    @property
    def corrupt_why(self) -> str:
        return f"{self.prefix}corrupt:why"

    @property
    def timers(self) -> str:
        return f"{self.prefix}timers"

    @property
    def finishing(self) -> str:
        return f"{self.prefix}finishing"

    @property
    def health(self) -> str:
        return f"{self.prefix}health"

    def _tagged(self, saga_id: str) -> str:
        return f"{self.prefix}{{{saga_id}}}"


def index_score(run: SagaRun) -> int:
    """The score of a saga in the index and active sets: its creation time in epoch ms."""
    return int(run.created_at.timestamp() * 1000)
