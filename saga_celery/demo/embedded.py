"""An in-process Redis-protocol server for demos and tests: fakeredis served over TCP.

The saga store and Celery's Redis transport talk to Redis over the network, and a
``celery worker`` is another process, so an in-memory ``FakeRedis`` client is not enough:
the fake must listen on a socket. ``start_embedded_redis()`` runs fakeredis'
``TcpFakeServer`` (with Lua scripting through lupa) on a free loopback port in a daemon
thread::

    with start_embedded_redis() as server:
        app = Celery("demo", broker=server.url, backend=server.url)
        ...  # start `celery -A demo worker` with the URL in its environment

Everything lives in this process's memory: it is gone when the server stops.  It needs
fakeredis with Lua, from the ``saga-celery[demo]`` extra.
"""

from __future__ import annotations

import importlib.util
import threading
from types import TracebackType

from saga_celery._extras import MissingExtraError

try:
    from fakeredis import TcpFakeServer
except ImportError as exc:
    raise MissingExtraError("demo", "fakeredis", needed_by="the embedded Redis server") from exc

__all__ = ["EmbeddedRedis", "start_embedded_redis"]

_LOOPBACK = "127.0.0.1"


class EmbeddedRedis:
    """A running embedded server; stop it with ``stop()`` or by leaving its ``with`` block."""

    def __init__(self, server: TcpFakeServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        port = server.server_address[1]
        self.url = f"redis://{_LOOPBACK}:{port}/0"
        """The URL clients in any process on this machine connect to."""

    @property
    def port(self) -> int:
        """The loopback TCP port the server listens on."""
        port: int = self._server.server_address[1]
        return port

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, close every client connection and free the port (idempotent)."""
        if not self._thread.is_alive():
            return
        self._server.shutdown()  # also tells each connection's handler thread to end
        self._server.server_close()  # joins the handler threads
        self._thread.join(timeout)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EmbeddedRedis {self.url}>"


def start_embedded_redis(port: int = 0) -> EmbeddedRedis:
    """Start a Redis-protocol server on 127.0.0.1 (``port=0``: a free port) and return it.

    Raises ``MissingExtraError`` when lupa (fakeredis' Lua) is missing, because the saga
    store's atomic updates are Lua scripts and fakeredis would reject them only later, at the
    first ``EVAL``.
    """
    if importlib.util.find_spec("lupa") is None:
        raise MissingExtraError("demo", "lupa (fakeredis' Lua scripting)",
                                needed_by="the embedded Redis server")
    server = TcpFakeServer((_LOOPBACK, port))
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name=f"embedded-redis-{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    return EmbeddedRedis(server, thread)
