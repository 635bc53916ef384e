"""Private Redis servers for the topology tests: a 3-master Redis Cluster, and a Sentinel
setup of one master, one replica and three sentinels.

Every server is a ``redis-server`` (a sentinel is ``redis-server <conf> --sentinel``) started
on a free loopback port (cluster nodes in 7100-7199, Sentinel setups in 7200-7299) with its
config, data and log in a temporary directory, leading its own process group, and stopped by
its process id.  No persistence: a test's servers live only as long as its module.

``redis_server_missing()`` says why the servers cannot start (no ``redis-server``); a test
then fails when ``$CI`` is set, and is skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Protocol, TypeVar

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

CLUSTER_PORTS = range(7100, 7200)
SENTINEL_PORTS = range(7200, 7300)
START_TIMEOUT_S = 30.0
SLOTS = 16384


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require_redis_server() -> None:
    """Fail (under CI) or skip the test when ``redis-server`` is not installed."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (Debian: apt-get install redis-server)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


class Servers(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=Servers)


@contextmanager
def running(make: Callable[[], S]) -> Iterator[S]:
    """The servers ``make()`` describes, started, and stopped when the block ends; fails
    (under CI) or skips the test first if ``redis-server`` is missing."""
    require_redis_server()
    servers = make()
    servers.start()
    try:
        yield servers
    finally:
        servers.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms; ``TimeoutError`` naming ``what`` if it stays false."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:g} s")
        time.sleep(0.05)


def free_ports(count: int, span: Iterable[int]) -> list[int]:
    """``count`` loopback ports of ``span`` that nothing listens on now."""
    found = []
    for port in span:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError(f"fewer than {count} free ports in {span}")


class Server:
    """One ``redis-server`` process with a config file of its own."""

    def __init__(self, name: str, port: int, directory: Path, config: list[str],
                 *, sentinel: bool = False) -> None:
        self.name, self.port, self.dir = name, port, directory / name
        self.dir.mkdir(parents=True)
        lines = [f"port {port}", "bind 127.0.0.1", f"dir {self.dir}", "daemonize no",
                 f"logfile {self.dir / 'redis.log'}", *config]
        if not sentinel:
            lines += ['save ""', "appendonly no"]
        self.config = self.dir / "redis.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.sentinel = sentinel
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        command = ["redis-server", str(self.config)] + (["--sentinel"] if self.sentinel else [])
        self._popen = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       process_group=0)

    def wait_ready(self) -> None:
        wait_until(self._answers, START_TIMEOUT_S, f"{self.name} on {self.address} answers")

    def _answers(self) -> bool:
        if self._popen is not None and self._popen.poll() is not None:
            log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self._popen.returncode}:\n{log}")
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def client(self, **options: object) -> redis.Redis:
        """A client of this server alone, sending each command once."""
        return redis.Redis(port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0),
                           **options)  # type: ignore[arg-type]

    def kill(self) -> None:
        """SIGKILL, as a machine lost at once."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still there after 10 s."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self._popen is None or self._popen.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.kill(self._popen.pid, sig)
        try:
            self._popen.wait(10)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self._popen.pid, signal.SIGKILL)
            self._popen.wait(10)


def start_all(servers: list[Server]) -> None:
    """Start every server, then wait until each answers; stop them all if one does not."""
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
    except BaseException:
        stop_all(servers)
        raise


def stop_all(servers: Iterable[Server]) -> None:
    for server in servers:
        server.stop()


class ClusterServers:
    """Three masters sharing the 16384 slots, no replicas: formed by hand (``CLUSTER
    ADDSLOTSRANGE`` and ``CLUSTER MEET``), so ``redis-cli`` is not needed."""

    def __init__(self, directory: Path) -> None:
        ports = free_ports(3, CLUSTER_PORTS)
        # A node down leaves the others serving their slots, however long it stays down.
        config = ["cluster-enabled yes", "cluster-config-file nodes.conf",
                  "cluster-node-timeout 5000", "cluster-require-full-coverage no"]
        self.nodes = [Server(f"node{port}", port, directory, config) for port in ports]

    @property
    def url(self) -> str:
        """The URL of one node: where a cluster client starts."""
        return f"redis://{self.nodes[0].address}/0"

    def start(self) -> None:
        start_all(self.nodes)
        try:
            self._form()
        except BaseException:
            self.stop()
            raise

    def _form(self) -> None:
        share = SLOTS // len(self.nodes)
        for i, node in enumerate(self.nodes):
            last = SLOTS - 1 if i == len(self.nodes) - 1 else (i + 1) * share - 1
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        with self.nodes[0].client() as first:
            for node in self.nodes[1:]:
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        wait_until(self._formed, START_TIMEOUT_S, "the cluster's nodes agree on every slot")

    def _formed(self) -> bool:
        for node in self.nodes:
            with node.client(decode_responses=True) as client:
                info = client.execute_command("CLUSTER", "INFO")
                text = info if isinstance(info, str) else str(info)
                if "cluster_state:ok" not in text or "cluster_known_nodes:3" not in text:
                    return False
        return True

    def stop(self) -> None:
        stop_all(self.nodes)


class SentinelServers:
    """A master, its replica and three sentinels watching them as ``master_name``.

    Both data servers sync without delay (diskless, no wait), so the old master, demoted by
    a failover, soon serves as the new master's replica."""

    master_name = "sagas"

    def __init__(self, directory: Path) -> None:
        master, replica, *sentinels = free_ports(5, SENTINEL_PORTS)
        data = ["repl-diskless-sync yes", "repl-diskless-sync-delay 0"]
        self.master = Server("master", master, directory, data)
        self.replica = Server("replica", replica, directory,
                              [*data, f"replicaof 127.0.0.1 {master}"])
        watch = [f"sentinel monitor {self.master_name} 127.0.0.1 {master} 2",
                 f"sentinel down-after-milliseconds {self.master_name} 1000",
                 f"sentinel failover-timeout {self.master_name} 5000"]
        self.sentinels = [Server(f"sentinel{port}", port, directory, watch, sentinel=True)
                          for port in sentinels]
        self.data = [self.master, self.replica]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.sentinels]

    def start(self) -> None:
        start_all(self.data)
        try:
            # The sentinels learn of the replica from the master's INFO: one that asked
            # before the replica attached would only hear of it ten seconds later.
            wait_until(self._replica_attached, START_TIMEOUT_S, "the replica is in sync")
            start_all(self.sentinels)
            wait_until(self.settled, START_TIMEOUT_S,
                       "the sentinels know each other and a synced replica")
        except BaseException:
            self.stop()
            raise

    def _replica_attached(self) -> bool:
        with self.replica.client(decode_responses=True) as client:
            return bool(client.execute_command("ROLE")[3] == "connected")

    def master_port(self) -> int:
        """The port of the master, as the first sentinel names it."""
        with self.sentinels[0].client(decode_responses=True) as sentinel:
            _, port = sentinel.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(port)

    def master_server(self) -> Server:
        """The data server the sentinels name master."""
        port = self.master_port()
        return next(s for s in self.data if s.port == port)

    def settled(self) -> bool:
        """Every sentinel sees the others, and the master's one replica in sync, and the
        data servers' own roles agree with what the sentinels say."""
        master = self.master_port()
        for sentinel in self.sentinels:
            with sentinel.client(decode_responses=True) as client:
                if client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                          self.master_name)[1] != str(master):
                    return False
                if len(client.execute_command("SENTINEL", "SENTINELS", self.master_name)) != 2:
                    return False
                replicas = [_pairs(r) for r in client.execute_command(
                    "SENTINEL", "REPLICAS", self.master_name)]
                if not any(r.get("flags") == "slave" and r.get("master-link-status") == "ok"
                           for r in replicas):
                    return False
        return all(self.role(server.port) == ("master" if server.port == master else "slave")
                   for server in self.data)

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: promote the replica now, as an operator would."""
        with self.sentinels[0].client() as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", self.master_name)

    def role(self, port: int) -> str:
        """``master`` or ``slave``, as the data server on ``port`` says; ``down`` if it
        does not answer."""
        server = next(s for s in self.data if s.port == port)
        try:
            with server.client(decode_responses=True) as client:
                return str(client.execute_command("ROLE")[0])
        except redis.RedisError:
            return "down"

    def stop(self) -> None:
        stop_all([*self.sentinels, *self.data])


def _pairs(flat: object) -> dict[str, str]:
    """A sentinel's flat ``[key, value, ...]`` list (RESP2) or map (RESP3) as a dict."""
    if isinstance(flat, dict):
        return {str(k): str(v) for k, v in flat.items()}
    items = list(flat) if isinstance(flat, list) else []
    return dict(zip(map(str, items[::2]), map(str, items[1::2]), strict=True))
