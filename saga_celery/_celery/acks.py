"""The late ack of a saga task, sent by the process that ran it, on kombu's Redis transport.

Saga tasks are ``acks_late`` (SPEC): their message is acknowledged once it ran.  Celery does
that in the worker's main process, after the pool process returned: on kombu's Redis
transport a blocking round trip (a MULTI/ZREM/HDEL/EXEC pipeline) in the one process that
feeds every pool process, between a pool process coming free and being given its next task
(what that costs: ``bench/RESULTS.md``).

So a saga task that returns normally acknowledges its own message, in the process that ran
it, once the step's next messages are published: the two commands kombu's ack sends, in a
pipeline of their own.  The main process then only forgets the message in memory, which
frees its prefetch slot as Celery's ack does.
A task that raises, retries or is lost leaves its message to the main process, as before.

This holds where both sides can tell it holds, from the app's configuration and kombu's
classes alone: kombu's own Redis channel, read from and published to on one broker (the ack
must reach the Redis the message came from), and kombu's internals as expected (the fast
path ``kombu.own_ack`` of ``saga_celery._internals.kombu``, which holds every private name
of kombu this takes).  Anywhere else the main process acknowledges, as Celery does.

An ack that did not reach Redis leaves the message in kombu's unacked set; kombu delivers it
again after the visibility timeout, and the engine drops it as a duplicate of a finished
attempt.  A task acked here whose end was then never recorded (its process killed between
the two) has a lease that lapses: the recovery sweep sends its attempt again, as it would
had the message been redelivered.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import structlog
from celery import Celery
from kombu.transport import redis as kombu_redis

from saga_celery._internals import kombu as kombu_internals
from saga_celery._store.connections import ThreadConnections, exchange, pack

log = structlog.get_logger("saga_celery")


class LateAck:
    """The acknowledgement a saga task owes its own message, until it is sent."""

    __slots__ = ("pending", "tag")

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.pending = True


def acks_in_task(app: Celery) -> bool:
    """Whether saga tasks of ``app`` acknowledge their own messages (see the module)."""
    if not kombu_internals.own_ack():
        return False
    conf = app.conf
    read = conf.broker_read_url or conf.broker_url
    write = conf.broker_write_url or conf.broker_url
    if read != write:
        return False
    connection = app.connection_for_write()  # not connected: only its transport is read
    try:
        return getattr(connection.transport, "Channel", None) is kombu_redis.Channel
    finally:
        connection.release()


def late_ack(request: Any) -> LateAck | None:
    """The ack a running task owes, if its message has a delivery tag (not an eager call)."""
    properties = getattr(request, "properties", None) or {}
    tag = properties.get("delivery_tag")
    return LateAck(tag) if is_tag(tag) else None


def is_tag(tag: object) -> TypeGuard[str]:
    """Whether ``tag`` is a delivery tag of kombu's Redis transport (a uuid string)."""
    return isinstance(tag, str) and bool(tag)


def is_redis_channel(channel: object) -> bool:
    """Whether ``channel`` is kombu's own Redis channel (not Sentinel's or a subclass)."""
    return type(channel) is kombu_redis.Channel


class _Commands:
    """Stands in for the pipeline kombu's ack fills (``pipe.zrem(...).hdel(...)``): keeps
    each command, packed, for one write on a kept connection."""

    __slots__ = ("packed",)

    def __init__(self) -> None:
        self.packed: list[bytes] = []

    def __getattr__(self, command: str) -> Any:
        def add(*args: Any) -> _Commands:
            self.packed.append(pack(command.upper(), *(str(a) for a in args)))
            return self
        return add


def send_ack(channel: Any, ack: LateAck, connections: ThreadConnections | None) -> None:
    """Send ``ack`` (the commands of kombu's own ``QoS.ack``) to the Redis of ``channel``:
    written on ``connections``' kept connection to it, or, where kombu prefixes its keys
    itself (``global_keyprefix``), in a pipeline of kombu's client.  A failure is logged:
    the message comes back, and is dropped as a duplicate."""
    ack.pending = False
    try:
        prefixed = bool(getattr(channel, "global_keyprefix", None))
        if connections is None or prefixed:
            with channel.conn_or_acquire() as client, \
                    client.pipeline(transaction=False) as pipe:
                kombu_internals.queue_ack(channel, pipe, ack.tag)
                pipe.execute()
            return
        commands = _Commands()
        kombu_internals.queue_ack(channel, commands, ack.tag)
        replies = exchange(connections.get(), b"".join(commands.packed), len(commands.packed))
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed
    except Exception as exc:
        log.warning("saga.ack_not_sent", delivery_tag=ack.tag, error=repr(exc))
