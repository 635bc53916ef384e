"""One thread's kept Redis connection, written and read without redis-py's per-command layers.

A saga step makes two or three round trips to the saga store, each one command (or two)
with a small reply.  Through redis-py's connection API each round trip cost about 100k
instructions of Python around the socket calls: checking health, formatting the host for
a possible error, the RESP parser's buffer classes.  Here redis-py still connects (TCP or
TLS or a Unix socket, AUTH, SELECT, CLIENT SETINFO), sends, checks an idle connection's
health, and its retry policy decides whether a failed exchange is sent again; this module
only packs the commands and parses the replies (RESP2, or the RESP3 redis-py 8 asks for by
default) from the connection's socket.  A RESP3 push frame (a client-tracking invalidation, a
managed Redis's maintenance notice) may come before, among or after the replies: it is read
whole and handed to redis-py's push handlers, as redis-py's own parser would.

Only redis-py's own socket connections take this path (``Wire.fits``); any other
(fakeredis' in-memory connections, a client's custom connection class) goes through
redis-py's ``send_packed_command`` and ``read_response``.

``ThreadWires`` keeps one such connection per thread, taken from the client's pool, and
gives it back to the pool when the thread ends: no connection outlives its thread.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import weakref
from typing import Any

import redis
from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection

_SOCKET_CONNECTIONS = (Connection, SSLConnection, UnixDomainSocketConnection)
_READ_SIZE = 65536


class Wire:
    """Sends packed commands on ``conn`` and reads their replies; errors come back as values.

    Any failure (a timeout, a dropped connection, an interruption such as a time limit
    mid-read) disconnects, so no reply is ever left unread for the next exchange, and
    raises redis-py's ``ConnectionError`` or ``TimeoutError`` as its own connection would.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.direct = self.fits(conn)
        self._buf = bytearray()
        self._pos = 0

    @staticmethod
    def fits(conn: Any) -> bool:
        """Whether ``conn`` is a plain socket connection of redis-py's (RESP2 or RESP3)."""
        return type(conn) in _SOCKET_CONNECTIONS

    def exchange(self, payload: bytes, replies: int) -> list[Any]:
        """Write ``payload`` (``replies`` packed commands) and read their replies."""
        self.send(payload)
        return self.read(replies)

    def send(self, payload: bytes) -> None:
        """Write ``payload``; ``read`` its replies before the next ``send``.

        redis-py connects if it must, checks an idle connection's health and sends (and
        disconnects if that fails).
        """
        self.conn.send_packed_command([payload])

    def read(self, replies: int) -> list[Any]:
        """The replies of the ``replies`` commands of the last ``send``."""
        conn = self.conn
        if not self.direct:
            return self._through_redis_py(replies)
        try:
            self._reset()
            out = [self._reply() for _ in range(replies)]
            if self._pos < len(self._buf):
                self._drain()
        except BaseException as exc:
            # Interrupted (a time limit, a lost connection): replies may be left unread on
            # a connection that is kept for the next exchange, so start it afresh.
            self._reset()
            conn.disconnect()
            if isinstance(exc, socket.timeout):
                raise redis.TimeoutError(f"Timeout reading from {conn._host_error()}") from exc
            if isinstance(exc, OSError):
                raise redis.ConnectionError(
                    f"Error while reading from {conn._host_error()}: {exc}") from exc
            raise
        if conn.health_check_interval:
            conn.next_health_check = time.monotonic() + conn.health_check_interval
        return out

    def _through_redis_py(self, replies: int) -> list[Any]:
        conn = self.conn
        try:
            out: list[Any] = []
            for _ in range(replies):
                try:
                    out.append(conn.read_response())
                except redis.ResponseError as exc:
                    out.append(exc)
            return out
        except BaseException:
            conn.disconnect()
            raise

    def _reset(self) -> None:
        self._buf.clear()
        self._pos = 0

    def _fill(self) -> None:
        chunk = self.conn._sock.recv(_READ_SIZE)
        if not chunk:
            raise redis.ConnectionError("Connection closed by server.")
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += chunk

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n", self._pos)) < 0:
            self._fill()
        line = bytes(self._buf[self._pos:end])
        self._pos = end + 2
        return line

    def _bulk(self, size: int) -> bytes:
        while len(self._buf) - self._pos < size + 2:
            self._fill()
        data = bytes(self._buf[self._pos:self._pos + size])
        self._pos += size + 2
        return data

    def _reply(self, line: bytes | None = None) -> Any:
        """The next reply; ``line``, given, is its first line, already read."""
        if line is None:
            line = self._line()
        kind = line[:1]
        if kind == b":":
            return int(line[1:])
        if kind == b"$":
            size = int(line[1:])
            return None if size < 0 else self._bulk(size)
        if kind == b"*":
            count = int(line[1:])
            return None if count < 0 else [self._reply() for _ in range(count)]
        if kind == b"_":  # RESP3 null
            return None
        if kind == b"+":
            return line[1:]
        if kind == b"-":
            error = self.conn._parser.parse_error(line[1:].decode(errors="replace"))
            if isinstance(error, redis.ConnectionError):
                raise error  # as redis-py does: LOADING (a restarted Redis reading its data)
            return error
        return self._resp3(kind, line)

    def _resp3(self, kind: bytes, line: bytes) -> Any:
        """A reply of a type only RESP3 has (null aside), headed by ``line``."""
        if kind == b"#":
            return line[1:] == b"t"
        if kind in (b",", b"("):
            return float(line[1:]) if kind == b"," else int(line[1:])
        if kind in (b"%", b"~"):
            count = int(line[1:])
            items = [self._reply() for _ in range(count * 2 if kind == b"%" else count)]
            return dict(zip(items[::2], items[1::2], strict=True)) if kind == b"%" else items
        if kind == b"=":  # verbatim string: "txt:" or "mkd:", then the text
            return self._bulk(int(line[1:]))[4:]
        if kind == b">":
            return self._past_pushes(line)
        raise redis.exceptions.InvalidResponse(f"Protocol error, got {line[:40]!r}")

    def _past_pushes(self, line: bytes) -> Any:
        """The reply after the RESP3 push frame that ``line`` heads (and any that follow).

        Redis sends a push (a client-tracking invalidation, a managed Redis's maintenance
        notice) whenever it likes, between replies: it is never the reply asked for.
        """
        while line[:1] == b">":
            self._push(line)
            line = self._line()
        return self._reply(line)

    def _push(self, line: bytes) -> None:
        """Read the push frame ``line`` heads and hand it to redis-py's push handling, which
        dispatches it as if redis-py had read it (its handlers are set on the parser)."""
        frame = [self._reply() for _ in range(int(line[1:]))]
        handle = getattr(self.conn._parser, "handle_push_response", None)
        if handle is not None:
            handle(frame)

    def _drain(self) -> None:
        """Read the push frames that came in after the replies, to their last byte.

        A frame only partly read would be lost at the next ``read``, and its rest taken for
        a reply.  Redis writes a frame whole, so the rest is on its way.
        """
        while self._pos < len(self._buf):
            line = self._line()
            if line[:1] != b">":  # a reply nobody asked for: trust this connection no more
                self._reset()
                self.conn.disconnect()
                return
            self._push(line)


class ThreadWires:
    """One kept ``Wire`` per thread (and per process) on connections of ``pool``.

    Checking a connection out of redis-py's pool and back costs more Python than the round
    trip itself, so a thread keeps its own.  It goes back to the pool when the thread ends
    (a thread-per-request web app, the threads pool's deadline timers) or when this object
    is dropped; a forked process takes a new one (the pool resets itself there).
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._local = threading.local()

    def get(self) -> Wire:
        """This thread's ``Wire``, taken from the pool on first use."""
        kept: _Kept | None = getattr(self._local, "kept", None)
        if kept is None or kept.pid != os.getpid():
            kept = self._local.kept = _Kept(self._pool)
        return kept.wire


class _Kept:
    """A thread's connection, given back to its pool once nothing holds this any more.

    Only the thread's ``threading.local`` holds it, so it goes when the thread ends.
    """

    __slots__ = ("__weakref__", "pid", "wire")

    def __init__(self, pool: Any) -> None:
        self.pid = os.getpid()
        conn = pool.get_connection()
        self.wire = Wire(conn)
        # The finalizer holds the connection and only a weak reference to the pool: neither
        # holds this object, which would keep it alive.
        weakref.finalize(self, _give_back, weakref.ref(pool), conn).atexit = False


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
