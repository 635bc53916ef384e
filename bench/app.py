"""The benchmark's Celery app: no-op chain tasks and no-op saga steps, on one worker.

The worker runs it (``celery -A bench.app worker``) and so does ``bench.run``, which sets
the environment before importing it:

- ``BENCH_REDIS_URL``: the private Redis, without a database part.  The broker uses
  database 0, saga state 1, Celery's result backend 2, and the completion lists of the
  chains that have no result backend 3 (see the ``*_DB`` constants).
- ``BENCH_LOG``: how structlog renders the saga lifecycle events: ``json`` (the default,
  one JSON line each on stdout, as ``workers/app.py`` deploys it), ``default`` (structlog
  left unconfigured) or ``quiet`` (warnings and errors only).
- ``BENCH_RETENTION``: how long a finished saga's state is kept (the library's default,
  7 days, when unset).
- ``BENCH_TRACE_DIR``: each pool process appends to ``<dir>/trace-<pid>.log`` the moment the
  failing step raises and the moment each rollback message has been published.
- ``BENCH_COUNT_DIR``: count Redis round trips and commands per database in every process,
  and the CPU time of each task (``time.thread_time`` from ``task_prerun`` to
  ``task_postrun``), written to ``<dir>/counts-<pid>.json`` after each task and, from the
  main process, every 0.2 s.
- ``BENCH_PROFILE_DIR``: run pyinstrument in each pool process; its session is saved to
  ``<dir>/profile-<pid>.pyisession`` when the process exits (a warm shutdown).
- ``BENCH_EXPERIMENTS``: comma-separated names from ``experiments.EXPERIMENTS``: prototype
  changes to the library, patched in at import, measured against the unpatched baseline.

Chains (A) are plain Celery: ``bench.noop`` stores its result in the Redis result backend
and the caller waits on the final ``AsyncResult``.  (A'') is the same chain of
``bench.noop_late`` links, acknowledged after they ran as saga tasks are (``acks_late``).
The honest variant (A') has no result backend: ``bench.noop_quiet`` links end in
``bench.done``, which pushes to a Redis list the caller blocks on.  Sagas (B) are
``bench.step`` steps, each with a no-op rollback; the failing sagas (C) end in
``bench.fail``, which has no rollback, so K-1 rollbacks run.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any, TextIO

import redis
import structlog
from celery import Celery, chain, signals

from saga_celery import RollbackContext, SagaApp, SagaDefinition, current_step
from saga_celery._celery.acks import LateAck
from workers.logs import configure_logging

BROKER_DB = 0
SAGA_DB = 1
RESULT_DB = 2
DONE_DB = 3

BASE_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6500").rstrip("/")
BROKER_URL = f"{BASE_URL}/{BROKER_DB}"
SAGA_URL = f"{BASE_URL}/{SAGA_DB}"
RESULT_URL = f"{BASE_URL}/{RESULT_DB}"
DONE_URL = f"{BASE_URL}/{DONE_DB}"

STEP = "bench.step"
FAIL = "bench.fail"
ROLLBACK = f"{STEP}.rollback"


def _configure_logging(mode: str) -> None:
    if mode == "json":  # as workers/app.py deploys it
        configure_logging()
    elif mode == "quiet":
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    elif mode != "default":
        raise ValueError(f"BENCH_LOG must be json, default or quiet, not {mode!r}")


_configure_logging(os.environ.get("BENCH_LOG", "json"))

app = Celery("bench", broker=BROKER_URL, backend=RESULT_URL)
app.conf.update(broker_connection_retry_on_startup=True)
sagas = SagaApp(app, redis_url=SAGA_URL,
                retention=os.environ.get("BENCH_RETENTION") or "7 days",
                # bench/history.py: finished sagas archived to PostgreSQL in this worker
                archive=os.environ.get("BENCH_ARCHIVE") or None)


# --- (A) and (A'): plain Celery chains ------------------------------------------------------


@app.task(name="bench.noop")  # type: ignore[untyped-decorator]
def noop(value: Any = None) -> Any:
    """A chain link whose result goes to the result backend."""
    return value


@app.task(name="bench.noop_late", acks_late=True)  # type: ignore[untyped-decorator]
def noop_late(value: Any = None) -> Any:
    """A chain link with result backend, acknowledged after it ran (``acks_late``), as saga
    steps and rollbacks are (SPEC): a killed worker's message is then delivered again."""
    return value


@app.task(name="bench.noop_quiet", ignore_result=True)  # type: ignore[untyped-decorator]
def noop_quiet(value: Any = None) -> Any:
    """A chain link that stores no result."""
    return value


@app.task(name="bench.done", ignore_result=True)  # type: ignore[untyped-decorator]
def done(value: Any, key: str) -> None:
    """The last link of a chain without result backend: tells the caller it finished."""
    _done_client().rpush(key, json.dumps(value))


@cache
def _done_client() -> redis.Redis:
    return redis.Redis.from_url(DONE_URL)


def chain_with_backend(k: int) -> Any:
    """(A) K no-op links; the caller waits on the last one's ``AsyncResult``."""
    return chain(noop.s(0), *[noop.s() for _ in range(k - 1)])


def chain_acks_late(k: int) -> Any:
    """(A'') K ``acks_late`` no-op links; the caller waits on the last one's ``AsyncResult``."""
    return chain(noop_late.s(0), *[noop_late.s() for _ in range(k - 1)])


def client_without_backend() -> Celery:
    """A producer app with no result backend, so sending a chain subscribes to nothing."""
    client = Celery("bench-plain", broker=BROKER_URL, set_as_current=False)
    client.conf.broker_connection_retry_on_startup = True
    return client


def chain_without_backend(client: Celery, k: int, key: str) -> Any:
    """(A') K-1 no-op links and ``bench.done``, which pushes to ``key`` in ``DONE_DB``."""
    links = [client.signature("bench.noop_quiet", args=(0,))]
    links += [client.signature("bench.noop_quiet") for _ in range(k - 2)]
    links.append(client.signature("bench.done", kwargs={"key": key}))
    return chain(*links, app=client)


# --- (B) and (C): sagas -----------------------------------------------------------------------


@sagas.step(name=STEP)
def step(value: Any = None) -> Any:
    """A no-op saga step."""
    return value


@step.rollback
def undo_step(ctx: RollbackContext) -> None:
    """A no-op rollback."""


@sagas.step(name=FAIL, retries={"limit": 0})
def fail(value: Any = None) -> Any:
    """The last step of a failing saga: one attempt, no rollback of its own."""
    trace("raise", current_step().saga_id)
    raise RuntimeError("the last step fails on purpose")


def saga_definition(k: int) -> SagaDefinition:
    """(B) K no-op steps passing their output on, as the chain's links do."""
    return sagas.saga(f"bench-k{k}", [step.s(0), *[step.s() for _ in range(k - 1)]])


def failing_definition(k: int) -> SagaDefinition:
    """(C) K-1 no-op steps, then ``bench.fail``: K-1 rollbacks run."""
    return sagas.saga(f"bench-fail-k{k}", [step.s(0), *[step.s() for _ in range(k - 2)],
                                           fail.s()])


# --- tracing the rollback path (BENCH_TRACE_DIR) ----------------------------------------------

TRACE_DIR = os.environ.get("BENCH_TRACE_DIR") or None
_trace_file: tuple[int, TextIO] | None = None


def trace(kind: str, saga_id: str, *fields: str) -> None:
    """Append ``<kind> <saga_id> <epoch s> <fields...>`` to this process's trace file."""
    global _trace_file
    if TRACE_DIR is None:
        return
    now = time.time()
    if _trace_file is None or _trace_file[0] != os.getpid():
        path = Path(TRACE_DIR) / f"trace-{os.getpid()}.log"
        _trace_file = (os.getpid(), path.open("a", buffering=1, encoding="utf-8"))
    _trace_file[1].write(" ".join([kind, saga_id, f"{now:.6f}", *fields]) + "\n")


def _on_published(sender: Any = None, body: Any = None, **_: Any) -> None:
    """After a rollback message reached the broker: when, for which saga and step."""
    if not str(sender).endswith(".rollback") or not isinstance(body, list | tuple):
        return
    control = body[1].get("__saga__") if len(body) > 1 and isinstance(body[1], dict) else None
    if isinstance(control, dict):
        trace("publish", str(control["saga_id"]), str(control["key"]), str(control["attempt"]))


if TRACE_DIR is not None:
    signals.after_task_publish.connect(_on_published, weak=False)


# --- counting Redis round trips and commands (BENCH_COUNT_DIR) --------------------------------

COUNTS: Counter[str] = Counter()
"""``db<n>:rtt`` (requests written: one per command or pipeline) and ``db<n>:<COMMAND>``."""
_counting = False


def _command_names(payload: bytes) -> list[str]:
    """The names of the commands in a RESP payload, as Redis will read them."""
    names, pos = [], 0
    while payload.startswith(b"*", pos):
        end = payload.index(b"\r\n", pos)
        count, pos = int(payload[pos + 1:end]), end + 2
        for i in range(count):
            end = payload.index(b"\r\n", pos)
            size, pos = int(payload[pos + 1:end]), end + 2
            if i == 0:
                names.append(payload[pos:pos + size].decode().upper())
            pos += size + 2
    return names


def install_counters() -> None:
    """Count, per database, what every redis-py connection of this process sends.

    Every way of sending (a command, a pipeline, the saga store's packed commands) ends in
    ``send_packed_command``: one write, one round trip; the commands are read from the bytes.
    """
    global _counting
    if _counting:
        return
    _counting = True
    from redis.connection import AbstractConnection

    send_packed = AbstractConnection.send_packed_command

    def counted_send_packed(self: Any, command: Any, check_health: bool = True) -> Any:
        COUNTS[f"db{self.db}:rtt"] += 1
        chunks = [command] if isinstance(command, bytes | str) else list(command)
        payload = b"".join(c.encode() if isinstance(c, str) else bytes(c) for c in chunks)
        for name in _command_names(payload):
            COUNTS[f"db{self.db}:{name}"] += 1
        return send_packed(self, chunks, check_health)  # type: ignore[no-untyped-call]

    AbstractConnection.send_packed_command = counted_send_packed  # type: ignore[method-assign]


COUNT_DIR = os.environ.get("BENCH_COUNT_DIR") or None
_role = "main"


def dump_counts() -> None:
    """Write this process's counts, atomically, for ``bench.run`` to read at any time."""
    if COUNT_DIR is None:
        return
    path = Path(COUNT_DIR) / f"counts-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"role": _role, "counts": dict(COUNTS)}))
    os.replace(tmp, path)


def _dump_every(interval_s: float) -> Callable[..., None]:
    def start(**_: Any) -> None:
        def loop() -> None:
            while True:
                time.sleep(interval_s)
                dump_counts()

        threading.Thread(target=loop, name="bench-counts", daemon=True).start()

    return start


def _child_started(**_: Any) -> None:
    global _role
    _role = "child"


_task_started: dict[str, int] = {}


def _task_prerun(task_id: str = "", **_: Any) -> None:
    _task_started[task_id] = time.thread_time_ns()


def _task_postrun(task_id: str = "", sender: Any = None, **_: Any) -> None:
    """CPU time of this thread while the task ran (library and body, not Celery's tracer)."""
    started = _task_started.pop(task_id, None)
    if started is not None:
        name = getattr(sender, "name", str(sender))
        COUNTS[f"cpu_ns:{name}"] += time.thread_time_ns() - started
        COUNTS[f"tasks:{name}"] += 1
    dump_counts()


if COUNT_DIR is not None:
    install_counters()
    signals.worker_process_init.connect(_child_started, weak=False)
    signals.task_prerun.connect(_task_prerun, weak=False)
    signals.task_postrun.connect(_task_postrun, weak=False)
    signals.worker_ready.connect(_dump_every(0.2), weak=False)


# --- profiling the pool processes (BENCH_PROFILE_DIR) -----------------------------------------

PROFILE_DIR = os.environ.get("BENCH_PROFILE_DIR") or None
_profiler: Any = None


def _start_profiler(**_: Any) -> None:
    global _profiler
    from pyinstrument import Profiler

    _profiler = Profiler(interval=0.0005)
    _profiler.start()


def _save_profile(**_: Any) -> None:
    if _profiler is None:
        return
    session = _profiler.stop()
    session.save(str(Path(PROFILE_DIR or ".") / f"profile-{os.getpid()}.pyisession"))


if PROFILE_DIR is not None:
    signals.worker_process_init.connect(_start_profiler, weak=False)
    signals.worker_process_shutdown.connect(_save_profile, weak=False)


# --- prototype library changes (BENCH_EXPERIMENTS) --------------------------------------------

def _dispatch_ignore_result(_: SagaApp) -> None:
    """Send saga messages with ``ignore_result=True``: a caller whose app has a result
    backend then stops subscribing to (and unsubscribing from) a result channel per saga."""
    from saga_celery._celery import dispatch

    options = dispatch.Message.options

    def without_result(self: Any) -> dict[str, Any]:
        return {**options(self), "ignore_result": True}

    dispatch.Message.options = without_result  # type: ignore[method-assign]


def _chain_extra_round_trip(_: SagaApp) -> None:
    """Not a library change, a probe: each chain link with result backend makes one more
    blocking Redis round trip (a PING to the result database), to learn how much one round
    trip on a task's path costs the wall time of a run."""
    run = noop.run

    def with_ping(value: Any = None) -> Any:
        app.backend.client.ping()
        return run(value)

    noop.run = with_ping


def _saga_no_time_limits(saga_app: SagaApp) -> None:
    """A probe, not a change to keep: saga tasks without Celery's per-task time limits, to
    learn what the pool's timer bookkeeping costs the worker's main process per task."""
    from saga_celery._celery.tasks import SagaTask

    for task in list(saga_app.app.tasks.values()):
        if isinstance(task, SagaTask):
            task.time_limit = task.soft_time_limit = None


def _saga_no_ack(_: SagaApp) -> None:
    """A probe, not a change to keep: saga tasks never send their own late ack (the main
    process still forgets the message), to learn what the ack's round trip costs a run."""
    from saga_celery._celery.dispatch import Dispatcher

    def no_ack(self: Dispatcher, ack: LateAck | None) -> None:
        if ack is not None:
            ack.pending = False

    Dispatcher._ack = no_ack  # type: ignore[method-assign]


def _saga_no_compaction(_: SagaApp) -> None:
    """A probe, not a change to keep: finished sagas are not compacted, to learn what the
    finisher thread costs the pool processes while steps run."""
    from saga_celery._store import redis as store_redis

    store_redis.compacts = lambda run: False  # type: ignore[attr-defined]


EXPERIMENTS: dict[str, Callable[[SagaApp], None]] = {
    "saga_no_ack": _saga_no_ack,
    "saga_no_compaction": _saga_no_compaction,
    "saga_no_time_limits": _saga_no_time_limits,
    "dispatch_ignore_result": _dispatch_ignore_result,
    "chain_extra_round_trip": _chain_extra_round_trip,
}
"""Prototype library changes by name, each a patch applied to this process at import."""


def apply_experiments(names: Iterable[str]) -> None:
    for name in names:
        if name not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
        EXPERIMENTS[name](sagas)


apply_experiments(n.strip() for n in os.environ.get("BENCH_EXPERIMENTS", "").split(",")
                  if n.strip())
