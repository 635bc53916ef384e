"""``RedisIO``: the saga store's client, its round trips and its errors.

What every part of ``RedisStore`` sends goes through here: one script as one command on
this thread's kept connection (``connections.py``), a pipeline whose first command is a
script, NOSCRIPT handled by loading the script and sending again, the durability's WAIT,
and redis-py's errors turned into ``SagaStoreError``s that say what to do.  Saga records are
parsed here too (``_parse_state``), as the live and the finished-saga parts both read them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar, cast

import redis
from pydantic import ValidationError
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import ClusterError, RedisClusterException, TryAgainError
from redis.retry import Retry

from saga_celery._core.model import FORMATS, Plan, SagaProgress, SagaRun
from saga_celery._errors import (
    SagaConfigError,
    SagaCorruptStateError,
    SagaError,
    SagaFormatError,
    SagaStoreError,
    SagaStoreUnavailableError,
)
from saga_celery._store import scripts
from saga_celery._store.connections import ThreadConnections, exchange, pack, pack_args
from saga_celery._store.durability import Durability
from saga_celery._store.encoding import with_plan
from saga_celery._store.journal import replay
from saga_celery._store.keys import DEFAULT_PREFIX, EVENT_FIELD, KeySpace
from saga_celery._store.topology import StoreClient, check_client, describe, socket_timeout_of

_PLAN_CACHE_SIZE = 256
T = TypeVar("T")

_FIX_CORRUPT = (
    "The key under the saga prefix was not written by this version of saga_celery: "
    "delete it, or give saga_celery a key prefix of its own."
)


class RedisIO:
    """The client of a ``RedisStore`` and how it talks to Redis (see the module)."""

    def __init__(self, client: StoreClient, *, prefix: str = DEFAULT_PREFIX,
                 durability: Durability | None = None) -> None:
        self._client = check_client(client)
        try:
            self._keys = KeySpace(prefix)
        except ValueError as exc:
            raise SagaConfigError(str(exc)) from exc
        self._where = describe(client)
        self._durability = Durability.check(durability, client)
        self._plans: dict[bytes | str, Plan] = {}
        self._raw = isinstance(client, redis.Redis)
        # A kept connection per thread on one Redis or a Sentinel master, never on Cluster.
        self._connections = ThreadConnections(
            client.connection_pool if isinstance(client, redis.Redis) else None)
        self._heads: dict[tuple[str, int], bytes] = {}
        self._timeout = socket_timeout_of(client)
        # The scripts of a live saga (``scripts.py``); ``FinishedSagas`` registers its own.
        self._create = client.register_script(scripts.CREATE)
        self._commit = client.register_script(scripts.COMMIT)
        self._renew = client.register_script(scripts.RENEW_LEASE)
        self._release = client.register_script(scripts.RELEASE_LEASE)
        self._claim = client.register_script(scripts.CLAIM_TIMERS)

    @property
    def prefix(self) -> str:
        return self._keys.prefix

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
            detail = f"{key} does not hold a readable saga record ({first_line(exc)})"
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

def _ignore(_: Exception) -> None:
    """redis-py's retry hook: nothing to do between tries (``exchange`` has disconnected)."""

def queue_evalsha(pipe: Pipeline, script: Script, keys: list[str],
                   args: Sequence[str | bytes]) -> None:
    """Queue ``script``'s EVALSHA in ``pipe``, routed by its keys on a Redis Cluster too.

    As a plain command: a cluster pipeline's ``evalsha()`` refuses before redis-py 8.2, but
    the command itself is routed by its keys' slot on every version."""
    pipe.execute_command(  # type: ignore[no-untyped-call]
        "EVALSHA", script.sha, len(keys), *keys, *args)

def _wrong_type(text: str, key: str | None, prefix: str) -> str:
    """What a WRONGTYPE error says, naming the key, without pipeline noise if it can."""
    if key is not None:
        return f"{key} holds the wrong Redis type"
    ours = text[text.index("WRONGTYPE") :]
    # Our scripts name the key; Redis's own WRONGTYPE does not, but the pipeline prefix does.
    return ours if prefix in ours else text

def decode_entry(
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
        raise corrupt(saga_id, f"{key} entry {as_str(stream_id)} is not an event") from exc
    return as_str(stream_id), event


def _event_dict(value: object) -> dict[str, Any]:
    """A stored event JSON as a dict; ValueError if it is not one."""
    if not isinstance(value, bytes | str):
        raise ValueError(f"expected JSON text, got {type(value).__name__}")
    event = json.loads(value)
    if not isinstance(event, dict):
        raise ValueError(f"expected a JSON object, got {type(event).__name__}")
    return event

def as_text(value: object) -> str | None:
    return None if value is None else as_str(value)


def as_str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
