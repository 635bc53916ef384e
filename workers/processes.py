"""Child processes for ``workers.fleet``: started in their own group, probed, always stoppable.

Each ``Service`` leads a process group (a Celery worker's pool processes join it), so
stopping it can reach every process it forked, and its terminal's Ctrl-C reaches only the
fleet, which then stops the services in order.  On Linux a service also gets SIGTERM if the
fleet itself dies without stopping it.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import redis

STOP_TIMEOUT_S = 20.0
_PR_SET_PDEATHSIG = 1


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def free_port(start: int, span: int = 100) -> int:
    """The first port from ``start`` (within ``span``) nothing listens on at 127.0.0.1."""
    for port in range(start, start + span):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + span - 1}")


def redis_pings(url: str) -> bool:
    """Whether a Redis answers PING at ``url``."""
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def http_get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    """The HTTP status and body of a GET (status 0 when nothing answers)."""
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def http_get_json(url: str, auth: tuple[str, str]) -> dict[str, Any]:
    """The JSON object a GET returns, or {} for anything else."""
    status, body = http_get(url, auth)
    try:
        data = json.loads(body) if status == 200 else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the fleet's thread that started it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``, from /proc (Linux)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


class Service:
    """One started process (and the process group it leads), its output in ``log_path``."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path

    @classmethod
    def start(cls, name: str, command: Sequence[str], *, env: dict[str, str], cwd: Path,
              log_path: Path) -> Service:
        """Start ``command`` in a new process group, stdout and stderr to ``log_path``."""
        # preexec_fn is unsafe only with threads running; the fleet starts every service
        # before it imports anything that starts one.
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                list(command), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, process_group=0, preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        return cls(name, popen, log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def display(self) -> str:
        """The command line as an operator would type it (``celery``, not ``python -m``)."""
        args = [str(a) for a in self.popen.args]  # type: ignore[union-attr]
        if args[:3] == [sys.executable, "-m", "celery"]:
            args = ["celery", *args[3:]]
        return shlex.join(args)

    def wait_log(self, marker: str, timeout: float) -> None:
        """Return once ``marker`` is in the log; RuntimeError if the process exits first."""
        if not wait_for(lambda: marker in self.log() or not self.alive(), timeout):
            raise RuntimeError(f"{self.name} did not log {marker!r} within {timeout:g} s")
        if marker not in self.log():
            raise RuntimeError(f"{self.name} exited with status {self.returncode} before "
                               f"logging {marker!r}")

    def group_pids(self) -> list[int]:
        return group_members(self.pid)

    def stop(self) -> None:
        Service.stop_all([self])

    @staticmethod
    def stop_all(services: Sequence[Service], timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every service at once (a worker's warm shutdown), then SIGKILL the groups."""
        for service in services:
            if service.alive():
                with suppress(ProcessLookupError):
                    service.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for service in services:
            with suppress(subprocess.TimeoutExpired):
                service.popen.wait(max(0.0, deadline - time.monotonic()))
        for service in services:
            # Still running, or pool processes left behind by a main process that exited.
            if service.alive() or service.group_pids():
                with suppress(ProcessLookupError):
                    os.killpg(service.pid, signal.SIGKILL)
            service.popen.wait()
        wait_for(lambda: not any(s.group_pids() for s in services), 10)

    def __repr__(self) -> str:
        return f"<Service {self.name} pid={self.pid} rc={self.returncode}>"
