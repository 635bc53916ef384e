"""A TCP proxy in front of Redis for tests that tamper with what travels between the two."""

from __future__ import annotations

import socket
import threading
from contextlib import suppress


class TcpProxy:
    """Listens on a free local port and connects each client to ``host:port``.

    ``connected`` (a subclass's) relays the pair of sockets as it likes, in its own threads.
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        for sock in [self.listener, *self._sockets]:
            with suppress(OSError):
                sock.close()

    def connected(self, client: socket.socket, server: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        with suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
                self._sockets += [client, server]
                self.connected(client, server)
