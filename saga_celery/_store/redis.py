"""``RedisStore``: saga runs, events and leases in Redis, one round trip per operation.

Each write of one saga is one Lua script over that saga's hash-tagged keys (see
``scripts.py``), sent in one pipeline with the updates of the global index sets, which stay
out of the scripts so that Redis Cluster can run them.  The index sets are therefore only
eventually exact: ``active`` is kept a superset of the non-terminal sagas.  On one Redis,
behind Sentinel or on Redis Cluster alike (``topology.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar, cast

import redis
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, to_json
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import ClusterError, RedisClusterException, TryAgainError
from redis.retry import Retry

from saga_celery._core.model import FORMATS, TERMINAL_STATUSES, Plan, SagaProgress, SagaRun
from saga_celery._errors import (
    SagaConfigError,
    SagaCorruptStateError,
    SagaError,
    SagaFormatError,
    SagaStateError,
    SagaStoreError,
    SagaStoreUnavailableError,
)
from saga_celery._store import scripts
from saga_celery._store.archive import PostgresArchive
from saga_celery._store.base import (
    CorruptRecord,
    EventDict,
    LeaseAction,
    LeaseChange,
    Snapshot,
    SweepRecord,
    Timer,
    timer_member,
    timer_of,
)
from saga_celery._store.connections import ThreadConnections, exchange, pack, pack_args
from saga_celery._store.durability import Durability
from saga_celery._store.encoding import (
    decode_sweep,
    encode_plan,
    encode_progress,
    encode_sweep,
    with_plan,
)
from saga_celery._store.finisher import BATCH as FINISH_BATCH
from saga_celery._store.finisher import TAKEOVER_GRACE_MS, Finisher
from saga_celery._store.history import (
    COMPACTED_FORMAT,
    MARKER,
    History,
    Stored,
    compacts,
    decode_history,
    encode_history,
    encode_stored_history,
    events_after,
)
from saga_celery._store.journal import count_entries, replay
from saga_celery._store.keys import (
    ARCHIVED_FIELD,
    DATA_FIELD,
    DEFAULT_PREFIX,
    EVENT_FIELD,
    HISTORY_FIELD,
    JOURNAL_FIELD,
    PLAN_FIELD,
    TERMINAL_FIELD,
    VERSION_FIELD,
    KeySpace,
    index_score,
)
from saga_celery._store.topology import StoreClient, check_client, describe, socket_timeout_of

DEFAULT_RETENTION_MS = 7 * 24 * 3600 * 1000
"""How long a terminal saga's state and events are kept: a week."""
_PLAN_CACHE_SIZE = 256
T = TypeVar("T")

_FIX_CORRUPT = (
    "The key under the saga prefix was not written by this version of saga_celery: "
    "delete it, or give saga_celery a key prefix of its own."
)


class RedisStore:
    """The production ``SagaStore``; works with ``fakeredis.FakeRedis`` clients too.

    ``client`` is a ``redis.Redis``, a Sentinel master client or a ``RedisCluster``
    (``topology.py``).  ``durability`` makes every saga write wait until that many replicas
    have it (``durability.py``; not on Redis Cluster)."""

    def __init__(
        self,
        client: StoreClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention_ms: int | Mapping[str, int | None] | None = DEFAULT_RETENTION_MS,
        durability: Durability | None = None,
        archive: PostgresArchive | None = None,
    ) -> None:
        self._client = check_client(client)
        try:
            self._keys = KeySpace(prefix)
        except ValueError as exc:
            raise SagaConfigError(str(exc)) from exc
        self._retention_ms, self._retention_by = _check_retentions(retention_ms)
        self.archive = archive
        """Where finished sagas go (``archive.py``), None to keep them compacted in Redis."""
        self._compact = client.register_script(scripts.COMPACT)
        self._tombstone = client.register_script(scripts.TOMBSTONE)
        self._expand_script = client.register_script(scripts.EXPAND)
        self._delete = client.register_script(scripts.DELETE)
        self._unmark = client.register_script(_UNMARK)
        self.finisher = Finisher(self.finish_many, self._take_over)
        """This process's thread that compacts and archives ended sagas (``finisher.py``)."""
        self._where = describe(client)
        self._durability = Durability.check(durability, client)
        self._create = client.register_script(scripts.CREATE)
        self._commit = client.register_script(scripts.COMMIT)
        self._renew = client.register_script(scripts.RENEW_LEASE)
        self._release = client.register_script(scripts.RELEASE_LEASE)
        self._claim = client.register_script(scripts.CLAIM_TIMERS)
        self._plans: dict[bytes | str, Plan] = {}
        self._raw = isinstance(client, redis.Redis)
        # A kept connection per thread on one Redis or a Sentinel master, never on Cluster.
        self._connections = ThreadConnections(
            client.connection_pool if isinstance(client, redis.Redis) else None)
        self._heads: dict[tuple[str, int], bytes] = {}
        self._timeout = socket_timeout_of(client)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention_ms: int | Mapping[str, int | None] | None = DEFAULT_RETENTION_MS,
        socket_timeout: float = 5.0,
        durability: Durability | None = None,
        archive: PostgresArchive | None = None,
    ) -> RedisStore:
        """A store on a new client for ``url`` (``redis://``, ``rediss://``, ``unix://``)."""
        try:
            client = redis.Redis.from_url(
                url,
                socket_connect_timeout=socket_timeout,
                socket_timeout=socket_timeout,
                health_check_interval=30,
                retry=reconnecting(),
            )
        except ValueError as exc:
            raise SagaConfigError(f"Invalid Redis URL for the saga store: {exc}") from exc
        return cls(client, prefix=prefix, retention_ms=retention_ms, durability=durability,
                   archive=archive)

    @property
    def prefix(self) -> str:
        return self._keys.prefix

    def ping(self) -> None:
        with self._errors():
            self._client.ping()

    def create(self, run: SagaRun, events: Sequence[EventDict],
               timers: Sequence[Timer] = ()) -> bool:
        keys = [self._keys.state(run.id), self._keys.events(run.id)]
        args: list[str | bytes] = [encode_progress(run), encode_plan(run.plan)]
        in_script = self._raw and bool(timers)  # Cluster: another slot, see ``keys.py``
        if in_script:
            keys.append(self._keys.timers)
            args.append(str(len(timers)))
        args += _encode_events(run.id, events)
        if in_script:
            args += _timer_args(timers)
        score = {run.id: index_score(run)}

        def queue(pipe: Pipeline) -> None:
            _queue_evalsha(pipe, self._create, keys, args)
            pipe.zadd(self._keys.index, score, nx=True)
            pipe.zadd(self._keys.active, score, nx=True)
            if timers and not in_script:  # beside the creation, in its pipeline
                pipe.zadd(self._keys.timers, _timer_scores(timers), nx=True)

        return int(self._pipeline(run.id, self._create, queue)[0]) == 1

    def load(self, saga_id: str, *, lease: str | None = None) -> Snapshot | None:
        keys = [self._keys.state(saga_id)]
        commands: list[tuple[str | bytes, ...]] = [
            ("HMGET", keys[0], VERSION_FIELD, DATA_FIELD, PLAN_FIELD, JOURNAL_FIELD,
             HISTORY_FIELD, ARCHIVED_FIELD)]
        if lease is not None:
            keys.append(self._keys.lease(saga_id, lease))
            commands.append(("GET", keys[1]))
        try:  # ``_errors``, without a context manager on the hot path
            replies = self._send(commands)
        except Exception as exc:
            self._reraise(exc, saga_id)
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, redis.ResponseError):
                with self._errors(saga_id, key=key):
                    raise reply
        version, data, plan, journal, history, archived = replies[0]
        if version is None and data is None:
            return None
        holder = _text(replies[1]) if lease is not None else None
        if history is not None or archived is not None:
            found = self._finished(saga_id, keys[0], history, archived)
            # Redis's version: the one a commit compares against (the same, as written).
            return Snapshot(run=found.run, version=int(cast(str, version)),
                            lease_holder=holder)
        run, number = self._parse_state(saga_id, keys[0], version, data, plan, journal)
        return Snapshot(run=run, version=number, lease_holder=holder,
                        journal=count_entries(journal))

    def commit(
        self,
        run: SagaRun,
        *,
        version: int,
        events: Sequence[EventDict],
        lease: LeaseChange | None = None,
        terminal: bool = False,
        journal: bytes | None = None,
        timers: Sequence[Timer] = (),
    ) -> bool:
        self.finisher.activity()  # finished sagas wait while this process works on sagas
        keys = [self._keys.state(run.id), self._keys.events(run.id)]
        if lease is not None:
            keys.append(self._keys.lease(run.id, lease.name))
        in_script = self._raw and bool(timers)  # Cluster: another slot, see ``keys.py``
        if in_script:
            keys.append(self._keys.timers)
        ends = terminal or run.is_terminal  # stays terminal: keep the retention clock
        data: str | bytes
        if journal is not None and not ends:
            data, mode = journal, "j"
        else:
            data, mode = encode_progress(run), "d"
        if lease is None:
            action, token, ttl = "", "", ""
        else:
            if lease.action is LeaseAction.ACQUIRE:
                _check_ttl(lease.ttl_ms)
            action, token, ttl = lease.action.value, lease.token, str(lease.ttl_ms)
        kept = self._retention_for(run.status.value)
        retention = "" if not ends or kept is None else str(kept)
        args: list[str | bytes] = [
            f"{version}|{version + 1}|{action}|{ttl}|{'1' if ends else '0'}|{retention}|{mode}"
            + (f"|{len(timers)}" if in_script else ""),
            token,
            data,
            *_encode_events(run.id, events),
            *(_timer_args(timers) if in_script else ()),
        ]
        if timers and not in_script:
            return self._commit_beside(run, keys, args, timers, terminal)
        if not terminal:
            # One command: the saga is already in the active index, unless this commit
            # revived it (the script says so), which is rare enough for a second trip.
            reply = int(self._script(run.id, self._commit, keys, args))
            if reply == 3:  # compacted or archived: its full record back, then again
                self._expand(run.id, version)
                return self.commit(run, version=version, events=events, lease=lease,
                                   terminal=terminal, journal=journal)
            if reply == 2:
                self._restore_active(run.id, {run.id: index_score(run)})
            return reply != 0
        reply = self._commit_terminal(run, keys, args)
        if reply == 3:
            self._expand(run.id, version)
            return self.commit(run, version=version, events=events, lease=lease,
                               terminal=terminal, journal=journal)
        return reply != 0

    def _commit_terminal(self, run: SagaRun, keys: list[str], args: list[str | bytes]
                         ) -> int:
        """The commit that ends a saga, with its index updates and, for a saga compacted
        when it ends, the durable marker and the hand-over to the finisher thread."""
        score = {run.id: index_score(run)}
        marks = compacts(run)

        def queue(pipe: Pipeline) -> None:
            _queue_evalsha(pipe, self._commit, keys, args)
            pipe.zrem(self._keys.active, run.id)
            if marks:  # the durable "to compact / archive" marker (``finisher.py``)
                pipe.zadd(self._keys.finishing, {run.id: int(time.time() * 1000)})

        try:
            reply = int(self._pipeline(run.id, self._commit, queue)[0])
        except SagaStoreError:
            self._restore_active(run.id, score)
            raise
        if reply not in (1, 2):
            self._restore_active(run.id, score)
        elif marks:
            self.finisher.submit(run.id)
        return reply

    def _commit_beside(self, run: SagaRun, keys: list[str], args: list[str | bytes],
                       timers: Sequence[Timer], terminal: bool) -> bool:
        """A commit with timers on Redis Cluster: the timers set is in another slot, so it
        is written in the commit's pipeline, just after it (the recovery sweep puts back a
        timer this leaves out: ``add_timers``).  A commit refused leaves a timer that finds
        no outbox entry when it fires, and is dropped then."""
        score = {run.id: index_score(run)}

        def queue(pipe: Pipeline) -> None:
            _queue_evalsha(pipe, self._commit, keys, args)
            pipe.zadd(self._keys.timers, _timer_scores(timers), nx=True)
            if terminal:
                pipe.zrem(self._keys.active, run.id)

        reply = int(self._pipeline(run.id, self._commit, queue)[0])
        if reply == 2 or (terminal and reply == 0):
            self._restore_active(run.id, score)
        return reply != 0

    def _restore_active(self, saga_id: str, score: Mapping[str, float]) -> None:
        """Put a live saga back in the active index: a terminal commit's ZREM ran although
        the commit did not, or a commit revived a terminal saga."""
        try:
            with self._errors(saga_id):
                self._client.zadd(self._keys.active, score, nx=True)
        except SagaStoreError:
            pass  # the sweep only misses it until the next commit re-adds it

    def renew_lease(self, saga_id: str, name: str, token: str, ttl_ms: int) -> bool:
        _check_ttl(ttl_ms)
        key = self._keys.lease(saga_id, name)
        with self._errors(saga_id):
            return int(self._renew(keys=[key], args=[token, ttl_ms])) == 1

    def release_lease(self, saga_id: str, name: str, token: str) -> bool:
        key = self._keys.lease(saga_id, name)
        with self._errors(saga_id):
            return int(self._release(keys=[key], args=[token])) == 1

    def read_events(
        self,
        saga_id: str,
        *,
        after: str = "0",
        count: int | None = None,
        block_ms: int | None = None,
    ) -> list[tuple[str, dict[str, Any]]]:
        if count is not None and count < 1:
            raise ValueError(f"count must be positive or None, not {count}")
        key = self._keys.events(saga_id)
        deadline = time.monotonic() + max(block_ms or 0, 0) / 1000
        while True:
            wait_ms = self._block_slice(deadline)
            with self._errors(saga_id, key=key):
                reply = self._client.xread({key: after}, count=count, block=wait_ms)
            entries = _stream_entries(reply)
            if not entries:
                finished = self._finished_events(saga_id)
                if finished is not None:
                    return events_after(finished, after, count)
            if entries or wait_ms is None or time.monotonic() >= deadline:
                return [_decode_entry(saga_id, key, entry, self._corrupt) for entry in entries]

    def active_ids(self, limit: int = 1000) -> list[str]:
        if limit <= 0:
            return []
        with self._errors(key=self._keys.active):
            ids = self._client.zrange(self._keys.active, 0, limit - 1)
        return [_str(i) for i in cast(list[bytes | str], ids)]

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
                return [_str(saga_id) for saga_id, _ in found], None
            last = found[-1][1]
            # The rest created in the same ms as the last: the next page starts after it.
            ties = cast(list[bytes | str], self._client.zrangebyscore(key, last, last))
        ids = [_str(saga_id) for saga_id, score in found if score != last]
        return ids + [_str(saga_id) for saga_id in ties], int(last)

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
        return [CorruptRecord(_str(saga_id), int(at_ms), _text(why) or "")
                for (saga_id, at_ms), why in zip(found, whys, strict=True)]

    def list_ids(self, limit: int = 100) -> list[str]:
        if limit <= 0:
            return []
        with self._errors(key=self._keys.index):
            ids = self._client.zrevrange(self._keys.index, 0, limit - 1)
        return [_str(i) for i in cast(list[bytes | str], ids)]

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
            if version is not None and _text(ended) == "0" and score is not None:
                self._client.zadd(self._keys.active, {saga_id: score}, nx=True)

    def prune_index(self, limit: int = 1000) -> int:
        if limit <= 0:
            return 0
        with self._errors(key=self._keys.index):
            ids = [_str(i) for i in cast(list[bytes | str],
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

    # -- helpers -----------------------------------------------------------------------

    def _script(self, saga_id: str, script: Script, keys: Sequence[str],
                args: Sequence[str | bytes]) -> Any:
        """EVALSHA ``script`` as one command (see ``_loading``), and the durability's WAIT
        after it on the same connection, in the same write."""
        command = ("EVALSHA", script.sha, str(len(keys)), *keys, *args)
        durable = self._durability
        if self._raw:
            head = self._heads.get((script.sha, len(keys)))
            if head is None:  # "EVALSHA <sha> <numkeys>" packed once per script
                head = self._heads[script.sha, len(keys)] = pack_args(*command[:3])
            payload = b"".join([b"*%d\r\n" % len(command), head, pack_args(*command[3:]),
                                durable.packed if durable else b""])

        def send() -> Any:
            if not self._raw:
                reply = self._reply_of(command)
            elif durable:
                reply, waited = self._exchange(payload, 2)
                durable.confirm(reply, waited, self._where, saga_id)
            else:
                reply = self._exchange(payload, 1)[0]
            if isinstance(reply, redis.ResponseError):
                raise reply
            return reply

        return self._loading(saga_id, script, send)

    def _loading(self, saga_id: str, script: Script, send: Callable[[], T]) -> T:
        """``send()``, whose first command is ``script``'s EVALSHA; on NOSCRIPT (a restarted or
        failed-over Redis) load the script and send again.  That is safe because the script
        did not run and any other command sent with it is idempotent."""
        try:  # what ``_errors`` does, without a context manager on the hot path
            for _ in range(2):
                try:
                    return send()
                except redis.exceptions.NoScriptError:
                    self._client.script_load(script.script)
        except Exception as exc:
            self._reraise(exc, saga_id)
        raise SagaStoreError(f"Redis at {self._where} keeps forgetting saga_celery's scripts.")

    def _send(self, commands: list[tuple[str | bytes, ...]]) -> list[Any]:
        """Send commands in one write and read their replies, errors as values.

        On this thread's kept connection (``connections.py``): redis-py connects it, and
        its retry policy sends the commands again over a new connection when one drops.  A
        client that is not a ``redis.Redis`` (a Redis Cluster client routes each command
        itself) goes through its own pipeline: one round trip when they share a slot.
        """
        if not self._raw:
            pipe = self._client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies: list[Any] = pipe.execute(raise_on_error=False)
            return replies
        return self._exchange(b"".join([pack(*command) for command in commands]),
                              len(commands))

    def _exchange(self, payload: bytes, count: int) -> list[Any]:
        """Write ``count`` packed commands in one write on this thread's kept connection and
        read their replies, errors as values; retried as redis-py's policy says."""
        conn = self._connections.get()
        replies: list[Any] = conn.retry.call_with_retry(
            lambda: exchange(conn, payload, count), _ignore)
        return replies

    def _reply_of(self, command: tuple[str | bytes, ...]) -> Any:
        try:
            return self._client.execute_command(*command)  # type: ignore[no-untyped-call]
        except redis.ResponseError as exc:
            return exc

    def _pipeline(
        self, saga_id: str, script: Script, queue: Callable[[Pipeline], None]
    ) -> list[Any]:
        """Run one pipeline whose first command is ``script``'s EVALSHA: one round trip.

        redis-py's own pipeline script support asks SCRIPT EXISTS before every execute (a
        second round trip), so NOSCRIPT is handled by ``_loading`` instead.
        """
        durable = self._durability

        def send() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            queue(pipe)
            if not durable:
                return pipe.execute()
            pipe.execute_command(*durable.command)  # a redis.Redis: on the same connection
            *replies, waited = pipe.execute()
            durable.confirm(replies[0], waited, self._where, saga_id)
            return replies

        return self._loading(saga_id, script, send)

    def _parse_state(
        self, saga_id: str, key: str, version: object, data: object, plan: object,
        journal: object = None,
    ) -> tuple[SagaRun, int]:
        try:
            number = int(cast(str, version))
            progress = SagaProgress.model_validate_json(cast(str, data))
            if number < 1:
                raise ValueError(f"version {number} is not positive")
            if progress.id == saga_id:
                run = with_plan(progress, self._plan(cast(bytes, plan)))
                if journal is not None:
                    replay(run, cast(bytes, journal))
        except (TypeError, ValueError, ValidationError) as exc:
            _check_format(saga_id, data)
            detail = f"{key} does not hold a readable saga record ({_first_line(exc)})"
            raise self._corrupt(saga_id, detail) from exc
        if progress.id != saga_id:
            raise self._corrupt(saga_id, f"{key} holds the record of saga {progress.id!r}")
        return run, number

    def _plan(self, text: bytes) -> Plan:
        """The plan stored as ``text``, validated once per process for every saga sharing it.

        Every saga of one definition has the same plan text (its arguments included), so a
        worker validates each definition's plan about once, not at every load.
        """
        if not isinstance(text, bytes | str):
            raise TypeError(f"the plan field holds {type(text).__name__}, not JSON text")
        plan = self._plans.get(text)
        if plan is None:
            plan = Plan.model_validate_json(text)
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.pop(next(iter(self._plans)))
            self._plans[text] = plan
        return plan

    def _block_slice(self, deadline: float) -> int | None:
        """How long the next XREAD may block, in ms: None for not at all.

        A BLOCK longer than the socket timeout would end in a TimeoutError, so a long wait
        is cut into slices of half of it (Redis ends a BLOCK up to ~100 ms late).
        """
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            return None
        timeout = self._timeout
        if timeout is None:
            return left_ms
        return min(left_ms, max(1, int(timeout * 500)))

    def _corrupt(self, saga_id: str | None, detail: str) -> SagaCorruptStateError:
        whose = f"Saga {saga_id!r} in Redis" if saga_id is not None else "Redis"
        message = f"{whose} at {self._where}: {detail}. {_FIX_CORRUPT}"
        return SagaCorruptStateError(message, saga_id=saga_id)

    @contextmanager
    def _errors(self, saga_id: str | None = None, *, key: str | None = None) -> Iterator[None]:
        """Turn redis-py's errors into ``SagaStoreError``s that say what to do.

        ``key``, when one command on one key runs, names it in a WRONGTYPE error.
        """
        try:
            yield
        except Exception as exc:
            self._reraise(exc, saga_id, key=key)

    def _reraise(self, exc: Exception, saga_id: str | None, *, key: str | None = None
                 ) -> NoReturn:
        """Raise ``exc`` as the ``SagaStoreError`` it means, or as it is if not redis-py's.

        Called from an ``except`` block; ``_errors`` is the same as a context manager, for
        the paths where a generator's cost does not matter."""
        translated = self._translated(exc, saga_id, key=key)
        if translated is exc:
            raise exc
        raise translated from exc

    def _translated(self, exc: Exception, saga_id: str | None, *, key: str | None = None
                    ) -> Exception:
        """The ``SagaStoreError`` to raise for ``exc`` (``exc`` itself if not redis-py's)."""
        if isinstance(exc, SagaError):
            return exc
        if isinstance(exc, _UNREACHABLE):
            message = (
                f"Redis at {self._where} cannot be reached ({exc}). Check the saga store's "
                "Redis URL and that Redis is running."
            )
            return SagaStoreUnavailableError(message, saga_id=saga_id)
        if isinstance(exc, redis.ResponseError):
            # Pipelines prefix the server's message ("Command # 1 (...) caused error: ...").
            text = str(exc)
            if "WRONGTYPE" in text:
                return self._corrupt(saga_id, _wrong_type(text, key, self.prefix))
            return SagaStoreError(f"Redis at {self._where} refused: {exc}", saga_id=saga_id)
        if isinstance(exc, redis.RedisError):
            return SagaStoreError(f"Redis at {self._where} failed: {exc}", saga_id=saga_id)
        return exc

    # -- timers (SPEC section 8; ``_celery/timers.py`` polls them) -------------------------

    def add_timers(self, timers: Sequence[Timer]) -> None:
        if not timers:
            return
        with self._errors(key=self._keys.timers):
            self._client.zadd(self._keys.timers, _timer_scores(timers), nx=True)

    def claim_timers(self, now_ms: int, hold_ms: int, limit: int = 100) -> list[Timer]:
        key = self._keys.timers
        with self._errors(key=key):
            reply = self._claim(keys=[key], args=[now_ms, now_ms + hold_ms, limit])
        flat = cast(list[bytes | str], reply)
        found = (timer_of(_str(member), int(float(_str(due))))
                 for member, due in zip(flat[::2], flat[1::2], strict=True))
        return [timer for timer in found if timer is not None]

    def drop_timer(self, timer: Timer) -> None:
        with self._errors(timer.saga_id, key=self._keys.timers):
            self._client.zrem(self._keys.timers, timer_member(timer))

    # -- finished sagas: compaction, archive, deletion (``history.py``, ``finisher.py``) ---

    def _retention_for(self, status: str) -> int | None:
        """How long a saga that ended with ``status`` is kept (ms), None: forever."""
        if self._retention_by is not None and status in self._retention_by:
            return self._retention_by[status]
        return self._retention_ms

    def finish(self, saga_id: str) -> bool:
        """Compact an ended saga, or archive it and leave a tombstone, then drop its marker.

        Idempotent: an archived or compacted saga is left as it is, a saga that runs again
        (``retry_rollback``) is left to the commit that ends it next.  True once nothing is
        left to do; False if the saga changed meanwhile (its marker stays for a retry)."""
        return self.finish_many([saga_id]) == 1

    def finish_many(self, saga_ids: Sequence[str]) -> int:
        """``finish`` for a batch: one round trip reads them all, one transaction archives
        them, one pipeline compacts or tombstones them.  A saga that cannot be read is
        logged and keeps its marker; the others go on.  How many are done."""
        if not saga_ids:
            return 0
        with self._errors():
            pipe = self._client.pipeline(transaction=False)
            for saga_id in saga_ids:
                pipe.zscore(self._keys.finishing, saga_id)
                pipe.hmget(self._keys.state(saga_id), [
                    VERSION_FIELD, TERMINAL_FIELD, DATA_FIELD, PLAN_FIELD, JOURNAL_FIELD,
                    HISTORY_FIELD, ARCHIVED_FIELD])
                pipe.xrange(self._keys.events(saga_id))
            replies = pipe.execute(raise_on_error=False)
        done, marks, work = 0, {}, []
        for i, saga_id in enumerate(saga_ids):
            mark, fields, stream = replies[3 * i: 3 * i + 3]
            marks[saga_id] = mark
            try:
                found, compacted = self._to_finish(saga_id, fields, stream)
            except (SagaError, redis.RedisError) as exc:
                _log_deferred(saga_id, exc)
                continue
            if found is None or (compacted and self.archive is None):
                done += 1  # nothing (more) to do
                self._drop_mark(saga_id, mark)
            else:
                work.append((saga_id, found))
        return done + self._finish_found(work, marks)

    def _finish_found(self, work: list[tuple[str, History | Stored]],
                      marks: dict[str, Any]) -> int:
        """Archive and tombstone, or compact, what ``finish_many`` read; how many are done."""
        if not work:
            return 0
        with self._errors():
            if self.archive is not None:
                self.archive.write_many([(f.run, f.version, f.events) for _, f in work
                                         if isinstance(f, History)])  # all, with an archive
        script = self._tombstone if self.archive is not None else self._compact
        calls: list[tuple[list[str], list[str | bytes]]] = []
        for saga_id, found in work:
            keys = [self._keys.state(saga_id), self._keys.events(saga_id)]
            if isinstance(found, Stored):
                args: list[str | bytes] = [str(found.version), found.value, MARKER]
            elif self.archive is not None:
                args = [str(found.version), found.run.status.value, "pg", MARKER]
            else:
                args = [str(found.version),
                        encode_history(found.run, found.version, found.events), MARKER]
            calls.append((keys, args))

        def send() -> list[Any]:  # EVALSHA as a plain command: Cluster pipelines route it
            pipe = self._client.pipeline(transaction=False)
            for keys, args in calls:
                _queue_evalsha(pipe, script, keys, args)
            replies: list[Any] = pipe.execute()
            return replies

        results = self._loading(work[0][0], script, send)
        finished = [(saga_id, marks[saga_id]) for (saga_id, _), result
                    in zip(work, results, strict=True) if int(result) == 1]
        self._drop_marks(finished)
        return len(finished)

    def _to_finish(self, saga_id: str, fields: Any, stream: Any
                   ) -> tuple[History | Stored | None, bool]:
        """What ``finish_many`` read of one saga: its history (None: nothing to do) and
        whether it is compacted already."""
        for reply in (fields, stream):
            if isinstance(reply, Exception):
                raise self._translated(reply, saga_id)
        state_key, events_key = self._keys.state(saga_id), self._keys.events(saga_id)
        version, ended, data, plan, journal, history, archived = fields
        if version is None or _text(ended) != "1" or archived is not None:
            return None, False  # gone, running again, or archived already
        if history is None and journal is None and self.archive is None:
            stored = _stored_history(saga_id, version, data, plan, stream)
            if stored is not None:
                return (stored if stored.version else None), False
        if history is not None:
            found = self._finished(saga_id, state_key, history, None)
        else:
            run, number = self._parse_state(saga_id, state_key, version, data, plan, journal)
            found = History(run, number, [
                _decode_entry(saga_id, events_key, entry, self._corrupt) for entry in stream])
        if not compacts(found.run):
            return None, False
        return found, history is not None

    def finish_pending(self, older_than_ms: int = TAKEOVER_GRACE_MS, limit: int = 1000, *,
                       purge: bool = True) -> int:
        """Finish the ended sagas whose marker is older than ``older_than_ms``: their
        process died before it compacted or archived them.  With ``purge`` (the recovery
        sweep), also deletes the archive's sagas whose retention ran out.  How many were
        finished."""
        now = int(time.time() * 1000)
        with self._errors(key=self._keys.finishing):
            stale = [_str(i) for i in cast(list[bytes | str], self._client.zrangebyscore(
                self._keys.finishing, "-inf", now - older_than_ms, start=0, num=limit))]
        if stale:
            with self._errors(key=self._keys.finishing):  # claimed: other sweeps wait a grace
                self._client.zadd(self._keys.finishing, dict.fromkeys(stale, now), xx=True)
        done, reachable = 0, True
        for start in range(0, len(stale), FINISH_BATCH):
            chunk = stale[start:start + FINISH_BATCH]
            try:
                done += self.finish_many(chunk)
            except SagaStoreUnavailableError as exc:  # the archive is down: try next sweep
                _log_deferred(",".join(chunk), exc)
                reachable = False
                break
            except SagaError as exc:
                _log_deferred(",".join(chunk), exc)
        if self.archive is not None and reachable and purge:
            try:
                self.archive.purge()
            except SagaError as exc:
                _log_deferred("", exc)
        return done

    def _take_over(self) -> int:
        return self.finish_pending(TAKEOVER_GRACE_MS, purge=False)

    def delete(self, saga_id: str) -> bool:
        """Remove an ended saga everywhere (Redis and the archive); False if unknown.
        ``SagaStateError`` while it runs."""
        keys = [self._keys.state(saga_id), self._keys.events(saga_id)]
        with self._errors(saga_id):
            reply = int(self._delete(keys=keys, args=[]))
        if reply == -1:
            raise SagaStateError(f"saga {saga_id!r} is still running: only a finished saga "
                                 "can be deleted (terminate it first)", saga_id=saga_id)
        with self._errors(saga_id):
            pipe = self._client.pipeline(transaction=False)
            pipe.zrem(self._keys.index, saga_id)
            pipe.zrem(self._keys.active, saga_id)
            pipe.zrem(self._keys.finishing, saga_id)
            pipe.execute()
        archived = self.archive.delete(saga_id) if self.archive is not None else False
        return reply == 1 or archived

    def _drop_mark(self, saga_id: str, mark: object) -> None:
        self._drop_marks([(saga_id, mark)])

    def _drop_marks(self, marks: Sequence[tuple[str, object]]) -> None:
        """Remove each saga's marker if it is still the one read (not set again since)."""
        marks = [(saga_id, mark) for saga_id, mark in marks if mark is not None]
        if not marks:
            return

        def send() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for saga_id, mark in marks:
                _queue_evalsha(pipe, self._unmark, [self._keys.finishing],
                               [saga_id, repr(float(cast(float, mark)))])
            replies: list[Any] = pipe.execute()
            return replies

        self._loading(marks[0][0], self._unmark, send)

    def _finished(self, saga_id: str, key: str, history: object, archived: object
                  ) -> History:
        """A compacted saga's history, or an archived one's from the archive."""
        if history is not None:
            try:
                return decode_history(cast(bytes, history))
            except (ValueError, ValidationError) as exc:
                detail = f"{key} does not hold a readable saga history ({_first_line(exc)})"
                raise self._corrupt(saga_id, detail) from exc
        if self.archive is None:
            raise SagaStoreError(
                f"saga {saga_id!r} was archived ({_text(archived)}), and this process has no "
                "archive: give SagaApp(archive=...) the archive's URL to read it.",
                saga_id=saga_id)
        found = self.archive.fetch(saga_id)
        if found is None:
            raise SagaStoreError(
                f"saga {saga_id!r} is marked archived in Redis, but the archive at "
                f"{self.archive.where} does not hold it (deleted, or its retention ran out).",
                saga_id=saga_id)
        return found

    def _finished_events(self, saga_id: str) -> list[tuple[str, dict[str, Any]]] | None:
        """The events of a compacted or archived saga; None if its stream is its own."""
        key = self._keys.state(saga_id)
        with self._errors(saga_id, key=key):
            history, archived = self._client.hmget(key, [HISTORY_FIELD, ARCHIVED_FIELD])
        if history is None and archived is None:
            return None
        return self._finished(saga_id, key, history, archived).events

    def _expand(self, saga_id: str, version: int) -> None:
        """Give a compacted or archived saga its full record back before a commit."""
        key = self._keys.state(saga_id)
        with self._errors(saga_id, key=key):
            history, archived = self._client.hmget(key, [HISTORY_FIELD, ARCHIVED_FIELD])
        if history is None and archived is None:
            return  # expanded meanwhile: the commit's version check decides
        found = self._finished(saga_id, key, history, archived)
        args: list[str | bytes] = [str(version), encode_progress(found.run),
                                   encode_plan(found.run.plan)]
        for stream_id, event in found.events:
            args += [stream_id, to_json(event)]
        with self._errors(saga_id):
            self._expand_script(keys=[key, self._keys.events(saga_id)], args=args)

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
            return decode_sweep({_str(name): _str(value) for name, value in found.items()})
        except (KeyError, ValueError) as exc:
            detail = f"{key} does not hold a sweep record ({_first_line(exc)})"
            raise self._corrupt(None, detail) from exc


_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError,
                # Redis Cluster: no node reachable, a slot not served, a failover under way
                RedisClusterException, ClusterError, TryAgainError)

RECONNECT_TRIES = 3
"""How often a command is sent again over a new connection when its connection broke."""


def reconnecting() -> Retry:
    """redis-py's retry policy for the store's client: a connection that a Redis restart
    closed is replaced and the command sent again, a few times with a short backoff.

    redis-py's own default sends nothing again, so every kept connection failed its first
    command after a restart.  Timeouts are not sent again: a slow Redis is not helped by
    more load.  Sending a commit again is safe: its version check refuses a second landing,
    and the engine tells a commit that landed from a conflict (``_engine._landed``)."""
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), RECONNECT_TRIES,
                 supported_errors=(redis.ConnectionError,))


def _check_retention(retention_ms: int | None) -> int | None:
    if retention_ms is not None and retention_ms <= 0:
        raise SagaConfigError(f"retention_ms must be positive or None, not {retention_ms}")
    return retention_ms


def _check_retentions(retention: int | Mapping[str, int | None] | None
                      ) -> tuple[int | None, dict[str, int | None] | None]:
    """One retention for every outcome, or one per outcome (the rest: the default)."""
    if not isinstance(retention, Mapping):
        return _check_retention(retention), None
    outcomes = {s.value for s in TERMINAL_STATUSES}
    unknown = sorted(set(retention) - outcomes)
    if unknown:
        raise SagaConfigError(f"retention by outcome takes {sorted(outcomes)}, not {unknown}")
    return DEFAULT_RETENTION_MS, {k: _check_retention(v) for k, v in retention.items()}


def _log_deferred(saga_id: str, exc: Exception) -> None:
    import structlog

    structlog.get_logger("saga_celery").warning("saga.finish_deferred", saga_id=saga_id,
                                                error=str(exc))


_UNMARK = """
-- Drop a finished saga's marker, unless it was set again since it was read.
-- KEYS[1]  <prefix>finishing   ARGV[1] saga id   ARGV[2] the score read
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""


def _check_format(saga_id: str, data: object) -> None:
    """Raise ``SagaFormatError`` if an unreadable record says it is in a newer format.

    Looked at only once a record failed to read: what a newer release adds to a format
    is what this release cannot read, so that is where the difference shows."""
    try:
        written = json.loads(cast(str, data)).get("format", 1)
    except (TypeError, ValueError, AttributeError):
        return
    if isinstance(written, int) and written not in FORMATS and written > max(FORMATS):
        raise SagaFormatError(
            f"saga {saga_id!r} is stored in format {written}, written by a newer "
            f"saga_celery; this release reads formats {sorted(FORMATS)}. It is left "
            "untouched: run a release that reads it (README, \"Upgrading\").",
            saga_id=saga_id)


def _check_ttl(ttl_ms: int) -> None:
    if ttl_ms <= 0:
        raise ValueError(f"a lease's ttl_ms must be positive, not {ttl_ms}")


def _ignore(_: Exception) -> None:
    """redis-py's retry hook: nothing to do between tries (``exchange`` has disconnected)."""


def _queue_evalsha(pipe: Pipeline, script: Script, keys: list[str],
                   args: Sequence[str | bytes]) -> None:
    """Queue ``script``'s EVALSHA in ``pipe``, routed by its keys on a Redis Cluster too.

    As a plain command: a cluster pipeline's ``evalsha()`` refuses before redis-py 8.2, but
    the command itself is routed by its keys' slot on every version."""
    pipe.execute_command(  # type: ignore[no-untyped-call]
        "EVALSHA", script.sha, len(keys), *keys, *args)


def _timer_scores(timers: Sequence[Timer]) -> dict[str, int]:
    return {timer_member(timer): timer.due_ms for timer in timers}


def _timer_args(timers: Sequence[Timer]) -> list[str]:
    """A commit's timers as its script takes them: due time, member, due time, ..."""
    return [part for timer in timers for part in (str(timer.due_ms), timer_member(timer))]


def _encode_events(saga_id: str, events: Sequence[EventDict]) -> list[bytes]:
    try:
        return [to_json(event) for event in events]
    except PydanticSerializationError as exc:
        raise SagaStoreError(f"An event is not JSON-serializable: {exc}", saga_id=saga_id) from exc


def _wrong_type(text: str, key: str | None, prefix: str) -> str:
    """What a WRONGTYPE error says, naming the key, without pipeline noise if it can."""
    if key is not None:
        return f"{key} holds the wrong Redis type"
    ours = text[text.index("WRONGTYPE") :]
    # Our scripts name the key; Redis's own WRONGTYPE does not, but the pipeline prefix does.
    return ours if prefix in ours else text


def _stream_entries(reply: object) -> list[Any]:
    """The entries of a one-stream XREAD reply, in RESP2 (a list) or RESP3 (a dict) shape."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, Mapping) else [e for _, e in cast(Any, reply)]
    found: list[Any] = []
    for entries in streams:
        # redis-py 8 nests a stream's entries (tuples) in one more list under RESP3.
        found.extend(entries[0] if entries and isinstance(entries[0], list) else entries)
    return found


def _stored_history(saga_id: str, version: object, data: object, plan: object,
                    stream: Any) -> Stored | None:
    """A finished saga's compacted value made from its records as stored, without parsing
    them into a run (the finisher's path for every saga that ended with its progress whole);
    version 0: not a saga of a compacted format.  None where anything looks unusual: the
    full path then reads it, and names what is wrong."""
    try:
        progress = json.loads(cast(bytes, data))
        number = int(cast(bytes, version))
    except (TypeError, ValueError):
        return None
    if (not isinstance(progress, dict) or progress.get("id") != saga_id
            or not isinstance(plan, bytes) or number < 1):
        return None
    written = progress.get("format", 1)
    if not isinstance(written, int) or written not in FORMATS:
        return None
    if written < COMPACTED_FORMAT:
        return Stored(0, b"")
    events = []
    for stream_id, fields in stream:
        value = fields.get(EVENT_FIELD.encode())
        if not isinstance(value, bytes) or value[:1] != b"{" or value[-1:] != b"}":
            return None
        events.append((stream_id if isinstance(stream_id, bytes) else stream_id.encode(),
                       value))
    return Stored(number, encode_stored_history(number, cast(bytes, data), plan, events))


def _decode_entry(
    saga_id: str,
    key: str,
    entry: Any,
    corrupt: Callable[[str, str], SagaCorruptStateError],
) -> tuple[str, dict[str, Any]]:
    stream_id, fields = entry
    value = fields.get(EVENT_FIELD.encode(), fields.get(EVENT_FIELD))
    try:
        event = _event_dict(value)
    except ValueError as exc:
        raise corrupt(saga_id, f"{key} entry {_str(stream_id)} is not an event") from exc
    return _str(stream_id), event


def _event_dict(value: object) -> dict[str, Any]:
    """A stored event JSON as a dict; ValueError if it is not one."""
    if not isinstance(value, bytes | str):
        raise ValueError(f"expected JSON text, got {type(value).__name__}")
    event = json.loads(value)
    if not isinstance(event, dict):
        raise ValueError(f"expected a JSON object, got {type(event).__name__}")
    return event


def _text(value: object) -> str | None:
    return None if value is None else _str(value)


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
