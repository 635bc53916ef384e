"""``Wire``, the store's own reply reader, fed bytes over a socket pair: RESP3 push frames.

Under RESP3 (redis-py 8's default) Redis may send a push frame at any time between replies:
a client-tracking invalidation, a maintenance notification of a managed Redis.  The reader
hands each one to redis-py's own push handling and returns the replies it was asked for.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from redis.connection import Connection

from saga_celery._store.wire import Wire

pytestmark = pytest.mark.timeout(10)

INVALIDATE = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$5\r\nsaga1\r\n"


@pytest.fixture
def pair() -> Iterator[tuple[Wire, socket.socket]]:
    """A ``Wire`` on a RESP3 redis-py connection whose socket is one end of a pair; the
    other end plays Redis."""
    ours, redis_end = socket.socketpair()
    ours.settimeout(5)
    conn = Connection(protocol=3)
    conn._sock = ours
    yield Wire(conn), redis_end
    ours.close()
    redis_end.close()


def test_a_push_frame_before_the_reply_is_skipped(pair: tuple[Wire, socket.socket]) -> None:
    """A push frame that arrives before the reply is read past: the reply comes back."""
    wire, redis_end = pair
    redis_end.sendall(INVALIDATE + b"+OK\r\n")

    assert wire.read(1) == [b"OK"]


def test_push_frames_among_replies_are_skipped(pair: tuple[Wire, socket.socket]) -> None:
    """Push frames between the replies of one exchange leave the replies in their order."""
    wire, redis_end = pair
    redis_end.sendall(b":1\r\n" + INVALIDATE + INVALIDATE + b"*2\r\n$1\r\na\r\n_\r\n")

    assert wire.read(2) == [1, [b"a", None]]


def test_a_push_frame_split_over_two_reads_is_read_whole(
    pair: tuple[Wire, socket.socket],
) -> None:
    """A push frame whose first half arrives with a reply and whose rest comes later is read
    whole, so the next exchange reads its own reply."""
    wire, redis_end = pair
    redis_end.sendall(b"+OK\r\n" + INVALIDATE[:20])
    later = threading.Timer(0.05, redis_end.sendall, [INVALIDATE[20:]])
    later.start()
    try:
        assert wire.read(1) == [b"OK"]
    finally:
        later.join()
    redis_end.sendall(b":7\r\n")

    assert wire.read(1) == [7]


def test_a_push_frame_goes_to_redis_pys_push_handler(pair: tuple[Wire, socket.socket]) -> None:
    """An invalidation push reaches the handler set on redis-py's parser, as it would if
    redis-py read it."""
    wire, redis_end = pair
    seen: list[Any] = []
    wire.conn._parser.set_invalidation_push_handler(seen.append)
    redis_end.sendall(INVALIDATE + b":3\r\n")

    assert wire.read(1) == [3]
    assert seen == [[b"invalidate", [b"saga1"]]]


def test_a_verbatim_string_reads_as_its_text(pair: tuple[Wire, socket.socket]) -> None:
    """A RESP3 verbatim string reads as its text, without the format prefix."""
    wire, redis_end = pair
    redis_end.sendall(b"=9\r\ntxt:hello\r\n")

    assert wire.read(1) == [b"hello"]


def test_a_reply_nobody_asked_for_drops_the_connection(pair: tuple[Wire, socket.socket]) -> None:
    """Bytes after the replies that are not a push frame mean the connection is out of step:
    the replies asked for come back and the connection is closed, to be opened afresh."""
    wire, redis_end = pair
    redis_end.sendall(b"+OK\r\n+EXTRA\r\n")

    assert wire.read(1) == [b"OK"]
    assert wire.conn._sock is None
