"""The processes of a chaos run: a private redis-server, the worker fleet and celery beat.

Every process leads its own process group, so one ``killpg`` reaches a worker and its pool;
``Fleet.close()`` ends every process the run started, whatever state it was left in.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.integration.harness import REPO_ROOT, WorkerProcess, start_worker, worker_env

APP_MODULE = "tests.chaos.app"
PORT_RANGE = range(6700, 6800)
START_TIMEOUT_S = 30.0
FATAL = b"Unrecoverable error"
"""What Celery logs when its worker's main loop crashes; it then shuts down (or hangs)."""
WEDGED_S = 10.0


def log(message: str) -> None:
    """A progress line on stderr (stdout carries only the run's JSON summary)."""
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _redis_major() -> int:
    """redis-server's major version (0 if it cannot tell)."""
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                         check=False).stdout
    found = re.search(r"v=(\d+)\.", out)
    return int(found.group(1)) if found else 0


def _signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class RedisServer:
    """``redis-server`` with an fsync-always append-only file: a restart loses nothing.

    The file is also the run's broker history (``tests.chaos.broker``): it is never
    rewritten, so no command of the run is compacted away, and from Redis 7 on it carries a
    timestamp each second.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = 0
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on the first free port of 6700-6799 (on the same port once it has one)."""
        ports = [self.port] if self.port else [p for p in PORT_RANGE if _port_free(p)]
        for port in ports:
            self.port = port
            if self._launch():
                return
        raise RuntimeError(f"redis-server did not start (tried {ports[:5]}...); see "
                           f"{self.data_dir / 'redis.log'}")

    def _launch(self) -> bool:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                   "--dir", str(self.data_dir), "--appendonly", "yes",
                   "--appendfsync", "always", "--auto-aof-rewrite-percentage", "0",
                   "--save", "", "--daemonize", "no",
                   "--logfile", str(self.data_dir / "redis.log")]
        if _redis_major() >= 7:
            command += ["--aof-timestamp-enabled", "yes"]
        self._popen = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       process_group=0)
        if _wait(lambda: self._popen is not None and (self._popen.poll() is not None
                                                      or self._answers()), START_TIMEOUT_S):
            return self._popen.poll() is None
        self.kill()
        return False

    def _answers(self) -> bool:
        try:
            with redis.Redis(port=self.port, socket_timeout=1,
                             retry=Retry(NoBackoff(), 0)) as client:  # one try, no backoff
                return bool(client.ping())
        except redis.RedisError:
            return False

    def restart(self, *, down_s: float) -> float:
        """SIGTERM (Redis fsyncs its AOF and exits), start again ``down_s`` later.

        Returns how long Redis did not answer.
        """
        assert self._popen is not None
        down = time.monotonic()
        self._popen.send_signal(signal.SIGTERM)
        self._popen.wait(START_TIMEOUT_S)
        time.sleep(down_s)
        self.start()
        return time.monotonic() - down

    def kill(self) -> None:
        if self._popen is None or self._popen.poll() is not None:
            return
        self._popen.send_signal(signal.SIGTERM)
        try:
            self._popen.wait(10)
        except subprocess.TimeoutExpired:
            _signal_group(self._popen.pid, signal.SIGKILL)
            self._popen.wait(10)


class Fleet:
    """The worker slots and beat of one run; the chaos loop kills and restarts workers."""

    def __init__(self, redis_url: str, log_dir: Path, *, workers: int, concurrency: int
                 ) -> None:
        self.env = {"CHAOS_REDIS_URL": redis_url}
        self.log_dir = log_dir
        self.concurrency = concurrency
        self.slots: list[WorkerProcess | None] = [None] * workers
        self.generation = [0] * workers
        self.started: list[WorkerProcess] = []
        """Every worker ever started, so ``close()`` can make sure none is left."""
        self.stopped: set[int] = set()
        """pgids currently SIGSTOPped."""
        self.lock = threading.Lock()
        self.revived: list[str] = []
        """Every restart of a worker that died or wedged by itself (not a chaos kill)."""
        self._scanned: dict[int, int] = {}
        self._fatal: dict[int, float] = {}
        self.beat: subprocess.Popen[bytes] | None = None

    # --- workers ---------------------------------------------------------------------

    def start_all(self) -> None:
        for slot in range(len(self.slots)):
            self.start(slot)

    def start(self, slot: int) -> WorkerProcess:
        self.generation[slot] += 1
        host = socket.gethostname()
        worker = start_worker(APP_MODULE, env=self.env, concurrency=self.concurrency,
                              hostname=f"chaos{slot}g{self.generation[slot]}@{host}",
                              log_dir=self.log_dir, ready_timeout=120)
        with self.lock:
            self.slots[slot] = worker
            self.started.append(worker)
        return worker

    def running(self) -> list[int]:
        """Slots whose worker runs and is not stopped."""
        with self.lock:
            return [i for i, w in enumerate(self.slots)
                    if w is not None and w.returncode is None and w.pid not in self.stopped]

    def log_name(self, slot: int) -> str:
        """The name of the slot's current worker log (``WorkerLogs`` calls workers by it)."""
        with self.lock:
            worker = self.slots[slot]
        return worker.log_path.stem if worker is not None else ""

    def kill_worker(self, slot: int) -> None:
        """SIGKILL the whole worker (main process and pool), as a lost machine would."""
        with self.lock:
            worker = self.slots[slot]
            self.slots[slot] = None
        if worker is not None:
            worker.kill()

    def kill_child(self, slot: int) -> int | None:
        """SIGKILL one pool process (the OOM killer); the worker forks a new one."""
        with self.lock:
            worker = self.slots[slot]
        if worker is None:
            return None
        try:
            return worker.kill_child()
        except RuntimeError:
            return None

    def pause(self, slot: int) -> int | None:
        """SIGSTOP a worker's whole process group; returns its pgid."""
        with self.lock:
            worker = self.slots[slot]
            if worker is None:
                return None
            self.stopped.add(worker.pid)
        _signal_group(worker.pid, signal.SIGSTOP)
        return worker.pid

    def resume(self, pgid: int) -> None:
        _signal_group(pgid, signal.SIGCONT)
        with self.lock:
            self.stopped.discard(pgid)

    def revive(self) -> list[str]:
        """Restart workers that died or wedged on their own, as a supervisor would.

        A worker whose main process exited is restarted; so is one that logged Celery's
        ``Unrecoverable error`` and is still there ``WEDGED_S`` later (its warm shutdown
        hung).  Returns what was revived, for the run's report.
        """
        revived = []
        for slot, worker in enumerate(list(self.slots)):
            if worker is None or worker.pid in self.stopped:
                continue
            if worker.returncode is not None:
                reason = f"worker {slot} exited with status {worker.returncode}"
            elif self._wedged(worker):
                reason = f"worker {slot} wedged after an unrecoverable error"
            else:
                continue
            with self.lock:
                if self.slots[slot] is not worker:
                    continue
                self.slots[slot] = None
            worker.kill()
            self.start(slot)
            revived.append(reason)
        self.revived += revived
        return revived

    def _wedged(self, worker: WorkerProcess) -> bool:
        seen = self._fatal.get(worker.pid)
        if seen is None:
            offset = self._scanned.get(worker.pid, 0)
            with open(worker.log_path, "rb") as log:
                log.seek(offset)
                chunk = log.read()
            # keep a line's worth of overlap so a marker split across reads is still found
            self._scanned[worker.pid] = offset + max(len(chunk) - len(FATAL), 0)
            if FATAL in chunk:
                self._fatal[worker.pid] = seen = time.monotonic()
        return seen is not None and time.monotonic() - seen > WEDGED_S

    def child_pids(self, slot: int) -> list[int]:
        with self.lock:
            worker = self.slots[slot]
        return worker.child_pids() if worker is not None else []

    def ensure_all(self) -> None:
        """Every slot has a running, not stopped worker (after the chaos loop ends)."""
        for pgid in list(self.stopped):
            self.resume(pgid)
        for slot, worker in enumerate(list(self.slots)):
            if worker is None or worker.returncode is not None:
                self.start(slot)

    # --- beat ------------------------------------------------------------------------

    def start_beat(self) -> None:
        """``celery beat``: it sends the recovery sweep (``saga_celery.recover``) on schedule."""
        command = [sys.executable, "-m", "celery", "-A", APP_MODULE, "beat",
                   "--loglevel", "INFO", "-s", str(self.log_dir / "beat-schedule"),
                   "--pidfile", str(self.log_dir / "beat.pid")]
        with open(self.log_dir / "beat.log", "wb") as log:
            self.beat = subprocess.Popen(command, cwd=REPO_ROOT, env=worker_env(self.env),
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, process_group=0)

    # --- the end ---------------------------------------------------------------------

    def stop_workers(self) -> None:
        """Warm shutdown of every worker (SIGKILL for one that does not stop in time)."""
        for pgid in list(self.stopped):
            self.resume(pgid)
        with self.lock:
            workers = [w for w in self.slots if w is not None]
            self.slots = [None] * len(self.slots)
        for worker in workers:
            worker.stop(timeout=15)
        for worker in self.started:
            if worker.group_pids():
                worker.kill()

    def close(self) -> None:
        """End every process the fleet started: workers (even stopped ones) and beat."""
        self.stop_workers()
        if self.beat is not None and self.beat.poll() is None:
            _signal_group(self.beat.pid, signal.SIGTERM)
            try:
                self.beat.wait(10)
            except subprocess.TimeoutExpired:
                _signal_group(self.beat.pid, signal.SIGKILL)
                self.beat.wait(10)

    def logs(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.log"))
