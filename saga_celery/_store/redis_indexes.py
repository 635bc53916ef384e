"""``SagaIndexes``: the store's sets beside the sagas themselves, for the recovery sweep,
the timers and the lists.

The ``active`` and ``index`` sorted sets (which sagas are live, every saga by creation time),
the sagas the sweep moved aside as unreadable, the timers (SPEC section 8), and the sweep's
health record.  ``RedisStore`` (``redis.py``) builds on this class; everything is sent
through ``RedisIO`` (``redis_io.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from saga_celery._store.base import CorruptRecord, SweepRecord, Timer, timer_member, timer_of
from saga_celery._store.encoding import decode_sweep, encode_sweep
from saga_celery._store.keys import TERMINAL_FIELD, VERSION_FIELD
from saga_celery._store.redis_history import FinishedSagas
from saga_celery._store.redis_io import as_str, as_text, first_line


class SagaIndexes(FinishedSagas):
    """The index sets, corrupt records, timers and sweep record of a Redis saga store."""

    def active_ids(self, limit: int = 1000) -> list[str]:
        return self._first_ids(self._keys.active, limit, newest=False)

    def active_page(self, after_ms: int | None = None, count: int = 1000
                    ) -> tuple[list[str], int | None]:
        if count < 1:
            raise ValueError(f"count must be positive, not {count}")
        key = self._keys.active
        low = "-inf" if after_ms is None else f"({after_ms}"
        with self._errors(key=key):
            found = cast(list[tuple[bytes | str, float]], self._client.zrangebyscore(
                key, low, "+inf", start=0, num=count, withscores=True))
            if len(found) < count:
                return [as_str(saga_id) for saga_id, _ in found], None
            last = found[-1][1]
            # The rest created in the same ms as the last: the next page starts after it.
            ties = cast(list[bytes | str], self._client.zrangebyscore(key, last, last))
        ids = [as_str(saga_id) for saga_id, score in found if score != last]
        return ids + [as_str(saga_id) for saga_id in ties], int(last)

    def mark_corrupt(self, saga_id: str, why: str, *, at_ms: int) -> None:
        # In this order, and not one transaction (Cluster: three slots): a crash between
        # them leaves the id in both sets, and the next sweep moves it again.
        with self._errors(saga_id):  # a WRONGTYPE names its command, and so its key
            pipe = self._client.pipeline(transaction=False)
            pipe.zadd(self._keys.corrupt, {saga_id: at_ms})
            pipe.hset(self._keys.corrupt_why, saga_id, why)
            pipe.zrem(self._keys.active, saga_id)
            pipe.execute()

    def corrupt_records(self, limit: int = 100) -> list[CorruptRecord]:
        if limit <= 0:
            return []
        with self._errors(key=self._keys.corrupt):
            found = cast(list[tuple[bytes | str, float]], self._client.zrevrange(
                self._keys.corrupt, 0, limit - 1, withscores=True))
            if not found:
                return []
            whys = self._client.hmget(self._keys.corrupt_why, [i for i, _ in found])
        return [CorruptRecord(as_str(saga_id), int(at_ms), as_text(why) or "")
                for (saga_id, at_ms), why in zip(found, whys, strict=True)]

    def list_ids(self, limit: int = 100) -> list[str]:
        return self._first_ids(self._keys.index, limit, newest=True)

    def _first_ids(self, key: str, limit: int, *, newest: bool) -> list[str]:
        """The first ``limit`` saga ids of the sorted set ``key``, oldest or newest first."""
        if limit <= 0:
            return []
        with self._errors(key=key):
            read = self._client.zrevrange if newest else self._client.zrange
            ids = read(key, 0, limit - 1)
        return [as_str(i) for i in cast(list[bytes | str], ids)]

    def forget_active(self, saga_id: str) -> None:
        state = self._keys.state(saga_id)
        with self._errors(saga_id, key=self._keys.active):
            pipe = self._client.pipeline(transaction=False)
            pipe.zrem(self._keys.active, saga_id)
            pipe.hmget(state, [VERSION_FIELD, TERMINAL_FIELD])
            pipe.zscore(self._keys.index, saga_id)
            _, (version, ended), score = pipe.execute()
            # A retry_rollback() that revived the saga after the caller saw it terminal has
            # re-added it before this ZREM, or will after: put it back if it is live now.
            if version is not None and as_text(ended) == "0" and score is not None:
                self._client.zadd(self._keys.active, {saga_id: score}, nx=True)

    def prune_index(self, limit: int = 1000) -> int:
        if limit <= 0:
            return 0
        with self._errors(key=self._keys.index):
            ids = [as_str(i) for i in cast(list[bytes | str],
                                         self._client.zrange(self._keys.index, 0, limit - 1))]
            if not ids:
                return 0
            pipe = self._client.pipeline(transaction=False)
            for saga_id in ids:
                pipe.exists(self._keys.state(saga_id))
            gone = [i for i, exists in zip(ids, pipe.execute(), strict=True) if not exists]
            if gone:
                self._client.zrem(self._keys.index, *gone)
        return len(gone)

    # -- timers (SPEC section 8; ``_celery/timers.py`` polls them) -------------------------

    def add_timers(self, timers: Sequence[Timer]) -> None:
        if not timers:
            return
        with self._errors(key=self._keys.timers):
            self._client.zadd(self._keys.timers, timer_scores(timers), nx=True)

    def claim_timers(self, now_ms: int, hold_ms: int, limit: int = 100) -> list[Timer]:
        key = self._keys.timers
        with self._errors(key=key):
            reply = self._claim(keys=[key], args=[now_ms, now_ms + hold_ms, limit])
        flat = cast(list[bytes | str], reply)
        found = (timer_of(as_str(member), int(float(as_str(due))))
                 for member, due in zip(flat[::2], flat[1::2], strict=True))
        return [timer for timer in found if timer is not None]

    def drop_timer(self, timer: Timer) -> None:
        with self._errors(timer.saga_id, key=self._keys.timers):
            self._client.zrem(self._keys.timers, timer_member(timer))

    # -- the recovery sweep's health record (``saga-celery health``) -------------------

    def record_sweep(self, record: SweepRecord) -> None:
        key = self._keys.health
        with self._errors(key=key):
            self._client.hset(key, mapping=encode_sweep(record))  # type: ignore[arg-type]

    def last_sweep(self) -> SweepRecord | None:
        key = self._keys.health
        with self._errors(key=key):
            found = self._client.hgetall(key)
        if not found:
            return None
        try:
            return decode_sweep({as_str(name): as_str(value) for name, value in found.items()})
        except (KeyError, ValueError) as exc:
            detail = f"{key} does not hold a sweep record ({first_line(exc)})"
            raise self._corrupt(None, detail) from exc


def timer_scores(timers: Sequence[Timer]) -> dict[str, int]:
    """Timers as ``ZADD`` takes them: member, due time in epoch ms."""
    return {timer_member(timer): timer.due_ms for timer in timers}
