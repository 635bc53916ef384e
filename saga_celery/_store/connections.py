"""One kept Redis connection per thread, spoken to through redis-py's connection API.

A saga step makes two or three round trips to the saga store, each one command (or two)
with a small reply.  Checking a connection out of redis-py's pool and back for each costs
more Python than the round trip itself, so each thread keeps one connection
(``ThreadConnections``) and ``exchange`` writes its commands in one write and reads their
replies.  redis-py does the rest: it connects (TCP, TLS or a Unix socket, AUTH, SELECT,
HELLO), checks an idle connection's health, parses the replies (with hiredis, a dependency
of this library, when it is installed), hands RESP3 push frames (a client-tracking
invalidation, a managed Redis's maintenance notice) to its push handlers, and drops a
connection whose reply was not read to the end.

A kept connection goes back to the pool when its thread ends (a thread-per-request web
app, the threads pool's deadline timers) or when its ``ThreadConnections`` is dropped: no
connection outlives its thread.  A forked process takes a new one.

Behind Sentinel a kept connection asks the sentinels, at most once a second, whether its
server is still the master, and reconnects when it is not.  After ``SENTINEL FAILOVER``
the old master stays a master for some seconds, until Sentinel demotes it: without that
question, a kept connection would go on writing there, and the writes would be lost.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any

import redis
from redis.sentinel import SentinelConnectionPool, SentinelManagedConnection

MASTER_CHECK_S = 1.0
"""How often, at most, a kept connection to a Sentinel-managed master asks the sentinels
whether its server is still the master."""


def exchange(conn: Any, payload: bytes, replies: int) -> list[Any]:
    """Write ``payload`` (``replies`` packed commands) on ``conn`` and read their replies;
    a command's error comes back as its reply.

    Any failure, or an interruption such as a time limit between two replies, disconnects,
    so no reply is ever left unread for the next exchange.
    """
    try:
        if isinstance(conn, SentinelManagedConnection):
            # Only its connect() asks the sentinels where the master is, as the pool's
            # checkout would; send_packed_command reconnects to the address it had.
            conn.connect()  # type: ignore[no-untyped-call]
        conn.send_packed_command([payload])
        return [_reply(conn) for _ in range(replies)]
    except BaseException:
        conn.disconnect()
        raise


def _reply(conn: Any) -> Any:
    try:
        return conn.read_response()
    except redis.ResponseError as exc:
        return exc


class ThreadConnections:
    """One kept connection of ``pool`` per thread (and per process).

    It goes back to the pool when the thread ends or when this object is dropped; a forked
    process takes a new one (the pool resets itself there).
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._local = threading.local()
        self._sentinel = isinstance(pool, SentinelConnectionPool)

    def get(self) -> Any:
        """This thread's connection, taken from the pool on first use."""
        kept: _Kept | None = getattr(self._local, "kept", None)
        if kept is None or kept.pid != os.getpid():
            kept = self._local.kept = _Kept(self._pool)
        elif self._sentinel:
            _follow_master(self._pool, kept)
        return kept.conn


def _follow_master(pool: SentinelConnectionPool, kept: _Kept) -> None:
    """Disconnect ``kept`` if the sentinels name another master than its server (at most
    every ``MASTER_CHECK_S``): the next command connects to the one they name."""
    now = time.monotonic()
    if now < kept.next_check:
        return
    kept.next_check = now + MASTER_CHECK_S
    try:
        master = pool.get_master_address()  # type: ignore[no-untyped-call]
    except redis.ConnectionError:  # no sentinel answers: keep the connection for now
        return
    if (kept.conn.host, kept.conn.port) != tuple(master):
        kept.conn.disconnect()


class _Kept:
    """A thread's connection, given back to its pool once nothing holds this any more.

    Only the thread's ``threading.local`` holds it, so it goes when the thread ends.
    """

    __slots__ = ("__weakref__", "conn", "next_check", "pid")

    def __init__(self, pool: Any) -> None:
        self.pid = os.getpid()
        self.conn = pool.get_connection()
        self.next_check = time.monotonic() + MASTER_CHECK_S
        # The finalizer holds the connection and only a weak reference to the pool: neither
        # holds this object, which would keep it alive.
        weakref.finalize(self, _give_back, weakref.ref(pool), self.conn).atexit = False


def _give_back(pool_ref: weakref.ref[Any], conn: Any) -> None:
    """Return ``conn`` to its pool, or close it if the pool is gone."""
    pool = pool_ref()
    if pool is None:
        conn.disconnect()
    else:
        pool.release(conn)  # a connection of the parent, in a forked child: left alone


def pack(*args: str | bytes) -> bytes:
    """One command in RESP, the protocol Redis reads."""
    return b"*%d\r\n%b" % (len(args), pack_args(*args))


def pack_args(*args: str | bytes) -> bytes:
    """The arguments of a command in RESP, without the count that heads the command."""
    parts = []
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)
