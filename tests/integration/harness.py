"""Real ``celery worker`` subprocesses for integration tests.

``start_worker("tests.integration.plain_app", env={...})`` runs
``<this python> -m celery -A <module> worker ...`` in its own process group, with the repo root
on ``PYTHONPATH``, logs to a file, and returns once the worker logs ``<hostname> ready.``.
The returned ``WorkerProcess`` can kill one prefork child (a worker losing a process), kill the
whole group (a machine losing the worker) or stop it politely.

Processes are read from ``/proc`` (Linux only, no psutil). A killed orphan may stay a zombie
until PID 1 reaps it; zombies run no code, so every check here ignores them.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Protocol

from celery import Celery

REPO_ROOT = Path(__file__).resolve().parents[2]


class WorkerStartError(RuntimeError):
    """The worker exited, or did not log that it was ready, in time (the message has its log)."""


class _ProcInfo:
    __slots__ = ("pgrp", "pid", "ppid", "state")

    def __init__(self, pid: int, state: str, ppid: int, pgrp: int) -> None:
        self.pid, self.state, self.ppid, self.pgrp = pid, state, ppid, pgrp


def _read_proc(pid: int) -> _ProcInfo | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name sits in parentheses and may contain spaces or ')': split after the last.
    fields = raw[raw.rindex(")") + 2 :].split()
    return _ProcInfo(pid, fields[0], int(fields[1]), int(fields[2]))


def _live_processes() -> Iterator[_ProcInfo]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _read_proc(int(entry))
            if info is not None and info.state not in ("Z", "X"):
                yield info


def is_alive(pid: int) -> bool:
    """Whether ``pid`` is a process that can still run (not gone, not a zombie)."""
    info = _read_proc(pid)
    return info is not None and info.state not in ("Z", "X")


def wait_until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true (return True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class WorkerProcess:
    """One running ``celery worker`` subprocess, leader of its own process group."""

    def __init__(self, popen: subprocess.Popen[bytes], hostname: str, log_path: Path) -> None:
        self._popen = popen
        self.hostname = hostname
        """The worker's node name, expanded (``name@host``)."""
        self.log_path = log_path
        """The file the worker's stdout and stderr go to; kept after the worker stops."""

    @property
    def pid(self) -> int:
        """The worker's main process id (also its process group id)."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The main process's exit status, ``None`` while it runs."""
        return self._popen.poll()

    def log(self) -> str:
        """Everything the worker has logged so far."""
        return self.log_path.read_text(errors="replace")

    def child_pids(self) -> list[int]:
        """The live pool processes (prefork children of the main process), sorted."""
        return sorted(p.pid for p in _live_processes() if p.ppid == self.pid)

    def group_pids(self) -> list[int]:
        """Every live process in the worker's process group, main process included."""
        return sorted(p.pid for p in _live_processes() if p.pgrp == self.pid)

    def wait_for_children(
        self, count: int, *, exclude: Iterable[int] = (), timeout: float = 30
    ) -> list[int]:
        """Wait until at least ``count`` pool processes not in ``exclude`` run; return them."""
        excluded = set(exclude)
        found: list[int] = []

        def enough() -> bool:
            found[:] = [pid for pid in self.child_pids() if pid not in excluded]
            return len(found) >= count

        if not wait_until(enough, timeout=timeout):
            raise TimeoutError(
                f"{self.hostname}: {len(found)} of {count} pool processes after {timeout}s "
                f"(excluding {sorted(excluded)})\n{self.log()}"
            )
        return found

    def kill_child(self) -> int:
        """SIGKILL one pool process, as the OOM killer would; return its pid."""
        children = self.child_pids()
        if not children:
            raise RuntimeError(f"{self.hostname} has no pool process to kill")
        victim = children[0]
        os.kill(victim, signal.SIGKILL)
        return victim

    def kill(self, timeout: float = 10) -> None:
        """SIGKILL the whole process group (main process and pool) and wait until none runs."""
        with suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self._popen.wait(timeout)
        if not wait_until(lambda: not self.group_pids(), timeout=timeout):
            raise RuntimeError(f"{self.hostname}: still running after SIGKILL: {self.group_pids()}")

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL the group if not gone in ``timeout``."""
        if self._popen.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout)
        if self._popen.poll() is None or self.group_pids():
            self.kill()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.hostname} pid={self.pid} rc={self.returncode}>"


class WorkerFactory(Protocol):
    """The ``worker_factory`` fixture: ``start_worker`` whose workers stop at teardown."""

    def __call__(
        self,
        app_module: str,
        *,
        env: dict[str, str] | None = None,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: list[str] | None = None,
        hostname: str | None = None,
        extra_args: list[str] | None = None,
        ready_timeout: float = 60,
    ) -> WorkerProcess: ...


def worker_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the repo root first on ``PYTHONPATH``, then overrides."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides or {})
    return env


def _node_name(hostname: str | None) -> str:
    if hostname is None:
        return f"harness-{uuid.uuid4().hex[:10]}@{socket.gethostname()}"
    from celery.utils.nodenames import host_format

    expanded: str = host_format(hostname)
    return expanded


def start_worker(
    app_module: str,
    *,
    env: dict[str, str] | None = None,
    pool: str = "prefork",
    concurrency: int = 2,
    queues: list[str] | None = None,
    hostname: str | None = None,
    extra_args: list[str] | None = None,
    ready_timeout: float = 60,
    log_dir: Path | None = None,
) -> WorkerProcess:
    """Start ``celery -A app_module worker`` and return it once it logs that it is ready.

    ``hostname`` defaults to a unique ``harness-<hex>@<host>``; ``log_dir`` to the system
    temp dir. Raises ``WorkerStartError`` (with the log) if the worker exits or is not ready
    within ``ready_timeout`` seconds; it is killed first.
    """
    node = _node_name(hostname)
    command = [
        sys.executable, "-m", "celery", "-A", app_module, "worker",
        "-P", pool, "-c", str(concurrency), "-n", node,
        "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    if queues:
        command += ["-Q", ",".join(queues)]
    command += extra_args or []
    fd, log_name = tempfile.mkstemp(prefix=f"{node.split('@')[0]}-", suffix=".log", dir=log_dir)
    with os.fdopen(fd, "wb") as log_file:
        popen = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=worker_env(env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    worker = WorkerProcess(popen, node, Path(log_name))
    _wait_ready(worker, ready_timeout)
    return worker


def _wait_ready(worker: WorkerProcess, timeout: float) -> None:
    marker = f"{worker.hostname} ready."
    ready = wait_until(
        lambda: worker.returncode is not None or marker in worker.log(), timeout=timeout
    )
    if ready and worker.returncode is None:
        return
    reason = (
        f"exited with status {worker.returncode}" if ready else f"was not ready after {timeout}s"
    )
    worker.kill()
    raise WorkerStartError(f"worker {worker.hostname} {reason}; its log:\n{worker.log()}")


@contextmanager
def celery_client(redis_url: str) -> Iterator[Celery]:
    """A producer-side Celery app with broker and result backend at ``redis_url``.

    A test drops its results (``del result``) inside the block: collected, a result
    unsubscribes from its channel, which Celery 5.6 does on a connection it opens again for
    it.  Collected after ``app.close()``, that connection is left open for pytest to report
    as an unclosed socket in whatever later test the garbage collector runs."""
    app = Celery("harness-client", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = True
    try:
        yield app
    finally:
        gc.collect()  # results in reference cycles: unsubscribed while the app is open
        app.close()


def import_copy(origin: str, name: str, env: dict[str, str]) -> ModuleType:
    """Import the module file ``origin`` again as ``name``, with ``env`` set only while it
    loads: a test's own client of a worker started with the same ``env``."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        spec = importlib.util.spec_from_file_location(name, origin)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return module
