"""Every private name of kombu that saga_celery uses: three fast paths on its Redis transport.

- ``kombu.kept_client``: kombu's Redis channel builds a new ``redis.Redis`` client for every
  message it publishes (``Channel.conn_or_acquire`` calls ``Channel._create_client``).  The
  dispatcher's own channels keep one instead, on the channel's own connection pool, so
  connections, reconnects and redis-py's retries are as kombu's.  Public path: kombu's.
- ``kombu.own_ack``: a saga task that returned normally acknowledges its own message from
  the process that ran it (``QoS._remove_from_indices``: the ``ZREM``/``HDEL`` kombu's ack
  sends), and the worker's main process then only forgets the message in memory
  (``virtual.QoS.ack`` past the Redis override, ``Message._state``).  Public path: the main
  process acknowledges, as Celery does (``_celery/acks.py``).
- ``kombu.ack_in_batch``: that ack rides in the pipeline of kombu's ``Producer.batch()``
  that publishes the task's next messages (``_ProducerBatch.state.session.pipeline``), one
  round trip for both.  Public path: the ack goes in a pipeline of its own.

Each probe reads kombu's classes, never a live object, so every process of a worker (the
main process and each pool process) reaches the same answer: the main process forgets a
message only where its task acknowledged it.  What each saves: ``bench/RESULTS.md``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import nullcontext
from functools import cache
from typing import Any

from kombu import messaging
from kombu.message import Message
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual

from saga_celery._internals import fall_back, fast_paths_allowed

KEPT_CLIENT = "kombu.kept_client"
OWN_ACK = "kombu.own_ack"
ACK_IN_BATCH = "kombu.ack_in_batch"

_KEPT = "_saga_kept_client"
"""Where a channel holds its kept client (in the channel's own ``__dict__``)."""


def _decide(fast_path: str, problem: Callable[[], str | None]) -> bool:
    """Whether ``fast_path`` is on: allowed, and its internals as expected (else one warning)."""
    if not fast_paths_allowed():
        return False
    found = problem()
    return True if found is None else fall_back(fast_path, found)


def _names(function: Any) -> tuple[str, ...]:
    """The global and attribute names ``function``'s own code refers to."""
    code = getattr(inspect.unwrap(function), "__code__", None)
    return tuple(code.co_names) if code is not None else ()


def _missing(function: Any, *names: str) -> str | None:
    """The first of ``names`` that ``function``'s code does not refer to, if any."""
    return next((n for n in names if n not in _names(function)), None)


# --- kombu.kept_client ----------------------------------------------------------------------


@cache
def kept_client() -> bool:
    """Probe: the dispatcher's channels may keep one Redis client (``keep_client``)."""
    return _decide(KEPT_CLIENT, _kept_client_problem)


def _kept_client_problem() -> str | None:
    channel = kombu_redis.Channel
    if not callable(getattr(channel, "_create_client", None)):
        return "kombu's Redis Channel has no _create_client()"
    if _missing(channel.conn_or_acquire, "_create_client"):
        return "Channel.conn_or_acquire() no longer builds its client with _create_client()"
    if _missing(channel._put, "conn_or_acquire"):
        return "Channel._put() no longer takes its client from conn_or_acquire()"
    return None


def keep_client(channel: Any) -> None:
    """Make ``channel`` (kombu's own Redis channel) publish through one kept Redis client.

    The kept client is built as kombu builds each one (``_create_client``), on the channel's
    connection pool.  Any other channel (Sentinel's, a subclass) is left as it is, and so
    are the app's own producers: only the dispatcher's channels get here.
    """
    if type(channel) is not kombu_redis.Channel or _KEPT in vars(channel) or not kept_client():
        return
    kept = channel._create_client()

    def conn_or_acquire(client: Any = None) -> nullcontext[Any]:
        return nullcontext(client or kept)

    channel.conn_or_acquire = conn_or_acquire
    setattr(channel, _KEPT, kept)


def keeps_client(channel: object) -> bool:
    """Whether ``channel`` publishes through a kept client."""
    return _KEPT in getattr(channel, "__dict__", {})


# --- kombu.own_ack --------------------------------------------------------------------------


@cache
def own_ack() -> bool:
    """Probe: a task may acknowledge its own message, and the main process forget it."""
    return _decide(OWN_ACK, _own_ack_problem)


def _own_ack_problem() -> str | None:
    remove = getattr(kombu_redis.QoS, "_remove_from_indices", None)
    if remove is None or list(inspect.signature(remove).parameters) != [
            "self", "delivery_tag", "pipe"]:
        return "kombu's Redis QoS has no _remove_from_indices(delivery_tag, pipe)"
    if _missing(kombu_redis.QoS.ack, "_remove_from_indices", "super"):
        return "QoS.ack() is no longer _remove_from_indices() then the in-memory ack"
    if _missing(virtual.QoS.ack, "_quick_ack"):
        return "virtual QoS.ack() no longer only marks the message acknowledged in memory"
    if "_state" not in Message.__slots__ or _missing(Message.acknowledged.fget, "_state"):
        return "kombu's Message no longer keeps its acknowledgement in _state"
    return None


def queue_ack(channel: Any, pipe: Any, delivery_tag: str) -> None:
    """Add to ``pipe`` the commands with which kombu's Redis ``QoS.ack`` acknowledges."""
    channel.qos._remove_from_indices(delivery_tag, pipe)


def forget(message: Any) -> None:
    """Acknowledge ``message`` in the consumer's memory only: its task already did in Redis."""
    virtual.QoS.ack(message.channel.qos, message.delivery_tag)
    message._state = "ACK"


# --- kombu.ack_in_batch ---------------------------------------------------------------------


@cache
def ack_in_batch() -> bool:
    """Probe: commands may be added to the pipeline of a ``Producer.batch()``."""
    return _decide(ACK_IN_BATCH, _ack_in_batch_problem)


def _ack_in_batch_problem() -> str | None:
    batch = getattr(messaging, "_ProducerBatch", None)
    state = getattr(messaging, "_ProducerBatchState", None)
    session = getattr(kombu_redis, "PublishBatch", None)
    if batch is None or state is None or session is None:
        return "kombu has no Producer.batch() of the shape 5.7 introduced"
    if (_missing(batch.__enter__, "state") or _missing(state._get_session, "session")
            or _missing(session.__init__, "pipeline") or _missing(session.flush, "pipeline")):
        return "Producer.batch() no longer keeps its Redis pipeline where 5.7 did"
    return None


def batch_pipeline(batch: object) -> Any | None:
    """The Redis pipeline the active ``batch`` executes when it ends; None when this fast
    path is off, nothing was published in the batch yet, or kombu publishes at once (a
    transport or configuration that cannot batch)."""
    if not ack_in_batch():
        return None
    session = getattr(getattr(batch, "state", None), "session", None)
    if not isinstance(session, kombu_redis.PublishBatch):
        return None
    return getattr(session, "pipeline", None)
