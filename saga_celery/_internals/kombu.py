"""Every private name of kombu that saga_celery uses: one fast path, on kombu's Redis transport.

``kombu.own_ack``: a saga task that returned normally acknowledges its own message from the
process that ran it (``QoS._remove_from_indices``: the ``ZREM``/``HDEL`` kombu's ack sends),
and the worker's main process then only forgets the message in memory (``virtual.QoS.ack``
past the Redis override, ``Message._state``): the round trip of the ack leaves the one
process that feeds every pool process.  Public path: the main process acknowledges, as
Celery does (``_celery/acks.py``).

The probe reads kombu's classes, never a live object, so every process of a worker (the
main process and each pool process) reaches the same answer: the main process forgets a
message only where its task acknowledged it.  What it is worth, and the fast paths measured
and dropped (a kept Redis client, the ack riding in the publishing pipeline):
``bench/RESULTS.md``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from typing import Any

from kombu.message import Message
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual

from saga_celery._internals import fall_back, fast_paths_allowed

OWN_ACK = "kombu.own_ack"


def _decide(fast_path: str, problem: Callable[[], str | None]) -> bool:
    """Whether ``fast_path`` is on: allowed, and its internals as expected (else one warning)."""
    if not fast_paths_allowed():
        return False
    try:
        found = problem()
    except Exception as exc:  # an internal of a shape the probe cannot even read
        found = f"probe failed: {exc!r}"
    return True if found is None else fall_back(fast_path, found)


def _names(function: Any) -> tuple[str, ...]:
    """The global and attribute names ``function``'s own code refers to."""
    code = getattr(inspect.unwrap(function), "__code__", None)
    return tuple(code.co_names) if code is not None else ()


def _missing(function: Any, *names: str) -> str | None:
    """The first of ``names`` that ``function``'s code does not refer to, if any."""
    return next((n for n in names if n not in _names(function)), None)


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

