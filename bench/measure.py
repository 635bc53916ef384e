"""Measuring runs: the private Redis, sending and waiting, CPU, Redis commands and memory."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import redis

from tests.integration.harness import WorkerProcess

PORTS = range(6500, 6600)
KINDS = {
    "chain": "A: chain, result backend",
    "chain_nobackend": "A': chain, no backend",
    "chain_acks_late": "A'': chain, result backend, acks_late",
    "saga": "B: saga",
    "saga_fail": "C: failing saga",
}
Waiter = Callable[[float], Any]
"""Blocks until one sent item completes (given the seconds left); raises on a timeout."""


# --- the private Redis -----------------------------------------------------------------------


class PrivateRedis:
    """A throwaway ``redis-server`` on a free port in 6500-6599, persistence off."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc else 0

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("bench: redis-server is not installed (apt-get install redis-server)")
        for port in _free_ports():
            proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir),
                 "--logfile", str(self.workdir / f"redis-{port}.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if _answers(port, proc):
                self.port, self._proc = port, proc
                return
            proc.kill()
            proc.wait()
        raise SystemExit("bench: no redis-server could start on a port in 6500-6599")

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def _free_ports() -> Iterator[int]:
    ports = list(PORTS)
    random.shuffle(ports)
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        yield port


def _answers(port: int, proc: subprocess.Popen[bytes]) -> bool:
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                time.sleep(0.05)
        return False
    finally:
        client.close()


# --- measuring one run -----------------------------------------------------------------------


@dataclass
class Run:
    """One timed run of M items of one kind."""

    kind: str
    label: str
    m: int
    k: int
    wall_s: float
    send_s: float
    latencies_ms: list[float]
    commands: dict[str, int]
    """Server-side ``INFO commandstats`` calls during the run, by command."""
    client_commands: dict[str, int]
    """What this (the sending and waiting) process sent, by command."""
    memory_delta: int
    cpu_s: dict[str, float]
    """CPU seconds (user + system) used during the run by the worker's main process, its pool
    processes, redis-server and this process: far steadier than wall time on a busy machine."""
    client_counts: Counter[str] = field(default_factory=Counter)
    """What this process sent during the run: ``db<n>:rtt`` and ``db<n>:<COMMAND>``."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_total_s(self) -> float:
        return sum(self.cpu_s.values())

    @property
    def per_s(self) -> float:
        return self.m / self.wall_s

    @property
    def per_step(self) -> float:
        return sum(self.commands.values()) / (self.m * self.k)

    def summary(self) -> dict[str, Any]:
        worker = {c: n - self.client_commands.get(c, 0) for c, n in self.commands.items()}
        return {
            "kind": self.kind, "label": self.label, "m": self.m, "k": self.k,
            "wall_s": round(self.wall_s, 3), "send_s": round(self.send_s, 3),
            "per_s": round(self.per_s, 2),
            "p50_ms": round(percentile(self.latencies_ms, 50), 2),
            "p99_ms": round(percentile(self.latencies_ms, 99), 2),
            "redis_cmds_per_step": round(self.per_step, 2),
            "redis_cmds_per_step_worker": round(sum(worker.values()) / (self.m * self.k), 2),
            "redis_cmds_by_command": dict(sorted(self.commands.items(), key=lambda c: -c[1])),
            "cpu_ms_per_item": {part: round(1000 * t / self.m, 2)
                                for part, t in {**self.cpu_s, "total": self.cpu_total_s}.items()},
            "memory_delta_bytes": self.memory_delta,
            "memory_bytes_per_item": round(self.memory_delta / self.m),
            **self.extra,
        }


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class Progress:
    """One updating line on stderr: run name, i/M done, elapsed."""

    def __init__(self, label: str, total: int, *, quiet: bool = False) -> None:
        self.label, self.total, self.quiet = label, total, quiet
        self.start = time.perf_counter()
        self._shown = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        now = time.perf_counter()
        if self.quiet or (not force and now - self._shown < 0.2 and done < self.total):
            return
        self._shown = now
        sys.stderr.write(f"\r  {self.label:<34} {done:>6}/{self.total:<6} "
                         f"{now - self.start:7.1f} s ")
        sys.stderr.flush()

    def finish(self, note: str = "") -> None:
        self.update(self.total, force=True)
        if not self.quiet:
            sys.stderr.write(f"{note}\n")


class Bench:
    """Sends and waits on chains and sagas through ``bench.app``, measuring Redis around it."""

    def __init__(self, app: ModuleType, server: PrivateRedis, k: int, *, quiet: bool) -> None:
        self.app = app
        self.k = k
        self.quiet = quiet
        self.admin = redis.Redis.from_url(f"{server.url}/0")
        self.flushed = [redis.Redis.from_url(f"{server.url}/{db}")
                        for db in (app.SAGA_DB, app.RESULT_DB, app.DONE_DB)]
        self.done = redis.Redis.from_url(app.DONE_URL)
        self.plain = app.client_without_backend()
        self.saga = app.saga_definition(k)
        self.failing = app.failing_definition(k)
        self.run_id = uuid.uuid4().hex[:8]
        self.redis_pid = server.pid
        self.worker: WorkerProcess | None = None

    def attach(self, worker: WorkerProcess) -> None:
        """Measure this worker's CPU from now on."""
        self.worker = worker

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the worker's main and pool processes, Redis and this process."""
        main = self.worker.pid if self.worker else None
        pool = self.worker.child_pids() if self.worker else []
        return {"worker_main": _cpu_s([main] if main else []), "worker_pool": _cpu_s(pool),
                "redis": _cpu_s([self.redis_pid]), "client": time.process_time()}

    # -- the five kinds: send one item, return what waits for it

    def send(self, kind: str, i: int) -> tuple[Waiter, Any]:
        if kind in ("chain", "chain_acks_late"):
            build = (self.app.chain_with_backend if kind == "chain"
                     else self.app.chain_acks_late)
            result = build(self.k).apply_async()
            return (lambda t: result.get(timeout=t)), result
        if kind == "chain_nobackend":
            key = f"done:{self.run_id}:{i}"
            self.app.chain_without_backend(self.plain, self.k, key).apply_async()
            return (lambda t: self._blpop(key, t)), key
        handle = (self.saga if kind == "saga" else self.failing).apply_async()
        wanted = "complete" if kind == "saga" else "errored"
        return (lambda t: _checked(handle.wait(timeout=t), wanted)), handle

    def _blpop(self, key: str, timeout: float) -> None:
        if self.done.blpop([key], timeout=max(timeout, 0.01)) is None:
            raise TimeoutError(f"chain {key} did not finish in time")

    # -- runs

    def measure(self, kind: str, m: int, label: str) -> tuple[Run, list[Any]]:
        """Send M items at once, then wait on each in send order."""
        self.reset()
        before = self.server_stats()
        client_before, cpu_before = Counter(self.app.COUNTS), self.cpu()
        progress = Progress(label, m, quiet=self.quiet)
        start = time.perf_counter()
        sent: list[tuple[Waiter, Any, float]] = []
        for i in range(m):
            waiter, item = self.send(kind, i)
            sent.append((waiter, item, time.perf_counter()))
        send_s = time.perf_counter() - start
        deadline = start + 120 + m * 0.5
        latencies = []
        for waiter, _, at in sent:
            waiter(max(deadline - time.perf_counter(), 0.01))
            latencies.append((time.perf_counter() - at) * 1000)
            progress.update(len(latencies))
        wall = time.perf_counter() - start
        cpu = {part: t - cpu_before[part] for part, t in self.cpu().items()}
        client = Counter(self.app.COUNTS) - client_before
        progress.finish(f"{m / wall:8.1f}/s, {1000 * sum(cpu.values()) / m:6.1f} ms CPU each")
        after = self.server_stats()
        run = Run(kind, label, m, self.k, wall, send_s, latencies,
                  _delta(before[0], after[0]), _by_name(client), after[1] - before[1], cpu,
                  client)
        return run, [item for _, item, _ in sent]

    def measure_serial(self, kind: str, n: int) -> list[tuple[float, Any]]:
        """Send one item and wait for it, n times: latency with nothing else in the queues."""
        self.reset()
        progress = Progress(f"serial {KINDS[kind]}", n, quiet=self.quiet)
        out = []
        for i in range(n):
            start = time.perf_counter()
            waiter, item = self.send(kind, i)
            waiter(60.0)
            out.append(((time.perf_counter() - start) * 1000, item))
            progress.update(i + 1)
        progress.finish()
        return out

    def reset(self) -> None:
        """Empty saga state, results and completion lists (the broker's bindings stay)."""
        for client in self.flushed:
            client.flushdb()

    def server_stats(self) -> tuple[dict[str, int], int]:
        stats = self.admin.info("commandstats")
        calls = {name.removeprefix("cmdstat_").split("|")[0]: 0 for name in stats}
        for name, value in stats.items():
            calls[name.removeprefix("cmdstat_").split("|")[0]] += int(value["calls"])
        calls.pop("info", None)
        calls.pop("select", None)
        calls.pop("flushdb", None)
        return calls, int(self.admin.info("memory")["used_memory"])


_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _cpu_s(pids: list[int]) -> float:
    """utime + stime of these processes, from /proc (0 for one that is gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            raw = Path(f"/proc/{pid}/stat").read_text()
            fields = raw[raw.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total * _TICK_S


def _checked(state: Any, wanted: str) -> Any:
    if state.status != wanted:
        raise RuntimeError(f"saga {state.id} ended {state.status}, expected {wanted}")
    if wanted == "errored" and (state.rollback is None or state.rollback.outcome != "complete"):
        raise RuntimeError(f"saga {state.id}: rollback {state.rollback}")
    return state


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {name: n - before.get(name, 0) for name, n in after.items()}
    return {name: n for name, n in out.items() if n > 0}


def _by_name(counts: Counter[str]) -> dict[str, int]:
    """``db<n>:<COMMAND>`` counts as commandstats names them: lower case, all databases."""
    out: Counter[str] = Counter()
    for key, n in counts.items():
        name = key.split(":", 1)[1].lower()
        if name != "rtt":
            out[name] += n
    return dict(out)


# --- the rollback path (C) -------------------------------------------------------------------


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def rollback_timings(handles: list[Any], trace: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per failing saga: from its failure to the first compensation, from events and trace.

    ``path``: the failing step's final ``attempt_errored`` event to the first
    ``rollback_attempt_started`` (both event timestamps).  ``sent``: the failing body's raise
    to the first rollback message published (``after_task_publish``), both taken with
    ``time.time()`` in the worker process that ran the failing step.  ``whole``: the failure
    event to ``saga_errored``.
    """
    path, sent, event_to_sent, whole = [], [], [], []
    for handle in handles:
        events = handle.events()
        failed = [e for e in events if e["type"] == "attempt_errored"][-1]
        first = next(e for e in events if e["type"] == "rollback_attempt_started")
        ended = next(e for e in events if e["type"] == "saga_errored")
        path.append((_ts(first) - _ts(failed)) * 1000)
        whole.append((_ts(ended) - _ts(failed)) * 1000)
        marks = trace.get(handle.id, {})
        if "raise" in marks and "publish" in marks:
            sent.append((marks["publish"] - marks["raise"]) * 1000)
            event_to_sent.append((marks["publish"] - _ts(failed)) * 1000)
    return {
        "rollback_path_ms": pcts(path),
        "failure_to_compensation_sent_ms": pcts(sent),
        "failure_event_to_compensation_sent_ms": pcts(event_to_sent),
        "rollback_whole_ms": pcts(whole),
        "traced": len(sent),
        "_raw": {"path": path, "sent": sent, "event_to_sent": event_to_sent, "whole": whole},
    }


def pcts(values: Sequence[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), 2), "p99": round(percentile(values, 99), 2),
            "n": len(values)}


def read_trace(trace_dir: Path) -> dict[str, dict[str, float]]:
    """``{saga_id: {"raise": t, "publish": first rollback publish t}}`` from every process."""
    out: dict[str, dict[str, float]] = {}
    for path in trace_dir.glob("trace-*.log"):
        for line in path.read_text().splitlines():
            kind, saga_id, at, *_ = line.split()
            marks = out.setdefault(saga_id, {})
            marks[kind] = min(marks.get(kind, float("inf")), float(at))
    return out


# --- round trips, counted in an instrumented worker ------------------------------------------


def read_counts(count_dir: Path) -> dict[str, Counter[str]]:
    """Counts by role (``child``: pool processes, ``main``: the consumer) from every process."""
    out: dict[str, Counter[str]] = {"child": Counter(), "main": Counter()}
    for path in count_dir.glob("counts-*.json"):
        with contextlib.suppress(ValueError, OSError):
            data = json.loads(path.read_text())
            out[data["role"]].update(data["counts"])
    return out


def round_trips(bench: Bench, count_dir: Path, kind: str, m: int
                ) -> tuple[dict[str, Any], list[Any]]:
    """Run M items of ``kind`` in the counting worker; round trips per step, by process."""
    before = read_counts(count_dir)
    run, items = bench.measure(kind, m, f"count {KINDS[kind]}")
    time.sleep(0.6)  # the main process writes its counts every 0.2 s
    after, client = read_counts(count_dir), run.client_counts
    steps = m * bench.k
    saga, broker = f"db{bench.app.SAGA_DB}", f"db{bench.app.BROKER_DB}"
    child, main = after["child"] - before["child"], after["main"] - before["main"]
    out: dict[str, Any] = {
        "m": m,
        "worker_store_rtt_per_step": round(child[f"{saga}:rtt"] / steps, 2),
        "worker_broker_rtt_per_step": round((child[f"{broker}:rtt"] + main[f"{broker}:rtt"])
                                            / steps, 2),
        "client_rtt_per_item": round(sum(n for key, n in client.items()
                                         if key.endswith(":rtt")) / m, 2),
        "worker_child": _by_key(child, steps),
        "worker_main": _by_key(main, steps),
        "client": _by_key(client, m),
        "server_cmds_per_step": round(run.per_step, 2),
        "task_cpu_us": _task_cpu(child),
    }
    if kind == "saga":
        # a step is two transitions (its start, its end): each a load and a commit
        out["store_rtt_per_transition"] = round(out["worker_store_rtt_per_step"] / 2, 2)
    return out, items


def _by_key(counts: Counter[str], per: int) -> dict[str, float]:
    return {key: round(n / per, 2) for key, n in sorted(counts.items())
            if n > 0 and not key.startswith(("cpu_ns:", "tasks:"))}


def _task_cpu(counts: Counter[str]) -> dict[str, float]:
    """Mean CPU microseconds per task run, by task name, in the pool processes."""
    out = {}
    for key, n in counts.items():
        if key.startswith("tasks:") and n > 0:
            name = key.removeprefix("tasks:")
            out[name] = round(counts[f"cpu_ns:{name}"] / n / 1000, 1)
    return dict(sorted(out.items()))


def retention_check(bench: Bench, handles: list[Any], retention_s: float) -> dict[str, Any]:
    """Finished sagas' keys carry the retention as a TTL and are gone once it passes."""
    from saga_celery._store.keys import KeySpace

    keys = KeySpace(bench.app.sagas._store.prefix)
    client = redis.Redis.from_url(bench.app.SAGA_URL)
    names = [name for h in handles for name in (keys.state(h.id), keys.events(h.id))]
    ttls = [int(client.pttl(name)) for name in names]
    time.sleep(retention_s + 0.5)
    left = sum(int(client.exists(name)) for name in names)
    live = [t for t in ttls if t >= 0]
    return {"retention_s": retention_s, "keys": len(names),
            "with_ttl": len(live), "already_expired": ttls.count(-2),
            "without_ttl": ttls.count(-1), "max_pttl_ms": max(live, default=None),
            "keys_left_after": left}


def key_bytes(bench: Bench, handles: list[Any]) -> dict[str, Any]:
    """``MEMORY USAGE`` of a sample of finished sagas' keys (state hash and event stream)."""
    from saga_celery._store.keys import KeySpace

    keys = KeySpace(bench.app.sagas._store.prefix)
    client = redis.Redis.from_url(bench.app.SAGA_URL)
    sample = handles[:: max(1, len(handles) // 20)][:20]
    sizes = [sum(int(client.memory_usage(name, samples=0) or 0)
                 for name in (keys.state(h.id), keys.events(h.id))) for h in sample]
    return {"key_bytes_per_saga": round(statistics.mean(sizes)) if sizes else None}


