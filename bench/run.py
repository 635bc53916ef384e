"""Saga overhead against plain Celery chains, on one real prefork worker and a real Redis.

``python -m bench.run`` (``make bench``, options through ``BENCH_ARGS``) starts its own
``redis-server`` on a free port in 6500-6599 and one ``celery worker -c 2`` running
``bench.app``, then times, in alternating pairs, M sends at once of:

- (A)  a Celery ``chain`` of K no-op tasks with a Redis result backend, the caller waiting on
  each chain's final ``AsyncResult`` (``.get()``);
- (A') the same chain with no result backend, its last task pushing to a Redis list the
  caller ``BLPOP``s (the honest comparison: the saga keeps its own outputs);
- (A'') the chain (A) with ``acks_late`` links, acknowledged after they ran as saga tasks
  are (SPEC): the like-for-like comparison of the acknowledgement mode;
- (B)  a saga of K no-op steps, each with a no-op rollback, waited on with ``SagaHandle.wait``;
- (C)  a saga whose last step fails: K-1 rollbacks run.

Every item is timed the same way: sent, then waited on in send order with its own API, from
its send to its observed completion.  It reports wall time, items/s, latency p50/p99, Redis
commands per step (``INFO commandstats`` deltas), bytes of Redis memory per finished saga,
the rollback path, and the median ratio B/A, in ``bench/results/latest.json`` and the table
in ``bench/RESULTS.md``.  A separate instrumented worker counts round trips (never timed);
``--scale`` adds 1,000 and 10,000 sagas at once; ``--profile`` samples (B) with py-spy (CPU)
and then with pyinstrument in the pool processes (wall).  ``--smoke`` is the tiny run
``make test`` does.  Everything runs from a copy of the working tree taken at the start.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from bench.history import history_phase, scale_history_phase
from bench.measure import (
    KINDS,
    Bench,
    PrivateRedis,
    Run,
    key_bytes,
    pcts,
    read_trace,
    retention_check,
    rollback_timings,
    round_trips,
)
from bench.profile import profile_summary, pyspy_summary
from bench.report import print_summary, summarize, targets, write_outputs
from saga_celery._internals import FAST_PATHS_ENV
from tests.integration import harness
from tests.integration.harness import WorkerProcess, start_worker

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "latest.json"
DEFAULT_MD = REPO / "bench" / "RESULTS.md"


# --- the phases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    m: int
    k: int
    pairs: int
    serial: int
    count_m: int
    scale_sizes: tuple[int, ...]
    profile: bool
    profile_text: Path | None
    out: Path
    md: Path | None
    smoke: bool
    quiet: bool
    count_only: bool
    scale_finished: int = 100_000


@contextlib.contextmanager
def worker(bench: Bench, workdir: Path, env: dict[str, str]) -> Iterator[WorkerProcess]:
    """One ``celery -A bench.app worker -c 2`` (prefork), stopped warmly afterwards."""
    process = start_worker("bench.app", env=env, concurrency=2, log_dir=workdir,
                           ready_timeout=90)
    process.wait_for_children(2)
    bench.attach(process)
    try:
        yield process
    finally:
        process.stop(timeout=60)


def note(text: str) -> None:
    sys.stderr.write(f"bench: {text}\n")
    sys.stderr.flush()


def warm_up(bench: Bench, m: int) -> None:
    for kind, label in KINDS.items():
        bench.measure(kind, m, f"warm-up {label}")


def serial_phase(bench: Bench, n: int, trace_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n}
    for kind in KINDS:
        done = bench.measure_serial(kind, n)
        out[kind] = pcts([ms for ms, _ in done])
        if kind == "saga_fail":
            timings = rollback_timings([h for _, h in done], read_trace(trace_dir))
            timings.pop("_raw")
            out["rollback"] = timings
    out["ratio_saga_vs_chain_p50"] = round(out["saga"]["p50"] / out["chain"]["p50"], 3)
    return out


def timed_pairs(bench: Bench, opts: Options, trace_dir: Path) -> list[Run]:
    runs = []
    for i in range(opts.pairs):
        # The saga right after the chain it is measured against, then the order reversed
        # every other pair (saga first): drift on a noisy machine hits both sides alike.
        order = ["chain", "saga", "chain_nobackend", "chain_acks_late"]
        if i % 2:
            order.reverse()
        for kind in [*order, "saga_fail"]:
            run, items = bench.measure(kind, opts.m, f"pair {i + 1}/{opts.pairs} {KINDS[kind]}")
            if kind == "saga":
                run.extra.update(key_bytes(bench, items))
            if kind == "saga_fail":
                run.extra.update(rollback_timings(items, read_trace(trace_dir)))
            runs.append(run)
    return runs


def public_path_phase(bench: Bench, opts: Options, workdir: Path) -> dict[str, Any]:
    """Saga against chain again, on a worker with every fast path into a dependency's
    internals turned off (``SAGA_CELERY_FAST_PATHS=off``): what the library costs through
    its dependencies' front doors alone."""
    trace_dir = workdir / "trace-public"
    trace_dir.mkdir()
    env = {"BENCH_TRACE_DIR": str(trace_dir), FAST_PATHS_ENV: "off"}
    ratios = []
    with worker(bench, workdir, env):
        warm_up_kinds(bench, min(20, opts.m), ["chain", "saga"])
        for i in range(opts.pairs):
            order = ["chain", "saga"] if i % 2 == 0 else ["saga", "chain"]
            runs = {kind: bench.measure(kind, opts.m, f"public pair {i + 1}/{opts.pairs} "
                                                      f"{KINDS[kind]}")[0] for kind in order}
            ratios.append(runs["saga"].wall_s / runs["chain"].wall_s)
    return {"ratio_saga_vs_chain_public_path": round(statistics.median(ratios), 3),
            "ratio_public_path_per_pair": [round(x, 3) for x in ratios]}


def warm_up_kinds(bench: Bench, m: int, kinds: list[str]) -> None:
    for kind in kinds:
        bench.measure(kind, m, f"warm-up {KINDS[kind]}")


def count_phase(bench: Bench, opts: Options, workdir: Path) -> dict[str, Any]:
    count_dir = workdir / "counts"
    count_dir.mkdir()
    env = {"BENCH_COUNT_DIR": str(count_dir), "BENCH_RETENTION": "3 seconds"}
    out: dict[str, Any] = {}
    with worker(bench, workdir, env):
        warm_up(bench, min(10, opts.count_m))
        for kind in KINDS:
            out[kind], items = round_trips(bench, count_dir, kind, opts.count_m)
            if kind == "saga":
                out["retention_check"] = retention_check(bench, items, 3.0)
    return out


def scale_phase(bench: Bench, opts: Options, workdir: Path) -> list[dict[str, Any]]:
    out = []
    with worker(bench, workdir, {}):
        bench.measure("saga", 20, "warm-up saga")
        for size in opts.scale_sizes:
            run, items = bench.measure("saga", size, f"scale {size} sagas at once")
            run.extra.update(key_bytes(bench, items))
            out.append(run.summary())
    return out


def profile_phase(bench: Bench, opts: Options, workdir: Path) -> dict[str, Any]:
    """(B) twice: under py-spy (CPU samples), then with pyinstrument in the pool (wall)."""
    out: dict[str, Any] = {}
    pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if pyspy is None:
        out["cpu"] = {"error": "py-spy is not installed (pip install py-spy)"}
    else:
        raw = workdir / "pyspy.raw"
        with worker(bench, workdir, {}) as process:
            bench.measure("saga", 20, "warm-up saga")
            with _sampling(pyspy, process.pid, raw):
                run, _ = bench.measure("saga", opts.m, "profile saga (py-spy)")
        out["cpu"] = {**pyspy_summary(raw), "sagas_per_s": round(run.per_s, 2)}
        if opts.profile_text is not None:  # the raw stacks, for a flame graph
            shutil.copy(raw, opts.profile_text.with_suffix(".pyspy.txt"))
    try:
        import pyinstrument  # noqa: F401 - only to know it is there for the worker
    except ImportError:
        out["wall"] = {"error": "pyinstrument is not installed (pip install pyinstrument)"}
        return out
    profile_dir = workdir / "profile"
    profile_dir.mkdir()
    with worker(bench, workdir, {"BENCH_PROFILE_DIR": str(profile_dir)}):
        bench.measure("saga", 20, "warm-up saga")
        run, _ = bench.measure("saga", opts.m, "profile saga (pyinstrument)")
    out["wall"] = {**profile_summary(profile_dir, opts.profile_text),
                   "sagas_per_s": round(run.per_s, 2)}
    return out


@contextlib.contextmanager
def _sampling(pyspy: str, pid: int, raw: Path) -> Iterator[None]:
    """py-spy on the worker and its pool processes, idle time excluded, while the block runs."""
    sampler = subprocess.Popen(
        [pyspy, "record", "--pid", str(pid), "--subprocesses", "--rate", "250", "--nonblocking",
         "--format", "raw", "--output", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attaching to three processes
    try:
        yield
    finally:
        sampler.send_signal(signal.SIGINT)
        try:
            sampler.wait(30)
        except subprocess.TimeoutExpired:
            sampler.kill()
            sampler.wait()


def count_only(opts: Options, server: PrivateRedis, workdir: Path) -> dict[str, Any]:
    """Just the instrumented worker: round trips and CPU per task, no timed pairs."""
    os.environ["BENCH_REDIS_URL"] = server.url
    app = importlib.import_module("bench.app")
    app.install_counters()
    _log_client_to(workdir / "client-events.log")
    bench = Bench(app, server, opts.k, quiet=opts.quiet)
    return {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": _config(opts), "machine": machine_info(server),
            "round_trips": count_phase(bench, opts, workdir)}


def run_all(opts: Options, server: PrivateRedis, workdir: Path) -> dict[str, Any]:
    os.environ["BENCH_REDIS_URL"] = server.url
    app = importlib.import_module("bench.app")
    app.install_counters()
    _log_client_to(workdir / "client-events.log")
    bench = Bench(app, server, opts.k, quiet=opts.quiet)
    report: dict[str, Any] = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                              "config": _config(opts), "machine": machine_info(server)}
    trace_dir = workdir / "trace"
    trace_dir.mkdir()
    started = time.perf_counter()
    with worker(bench, workdir, {"BENCH_TRACE_DIR": str(trace_dir)}):
        note(f"worker up; warming up, then {opts.pairs} pairs of M={opts.m}, K={opts.k}")
        warm_up(bench, min(20, opts.m))
        serial = serial_phase(bench, opts.serial, trace_dir)
        runs = timed_pairs(bench, opts, trace_dir)
    report.update(summarize(runs))
    report["serial"] = serial
    note("saga against chain with every fast path off")
    report.update(public_path_phase(bench, opts, workdir))
    note("counting round trips in an instrumented worker")
    report["round_trips"] = count_phase(bench, opts, workdir)
    saga_rt = report["round_trips"]["saga"]
    report["store_rtt_per_transition"] = saga_rt["store_rtt_per_transition"]
    report["retention_check"] = report["round_trips"].pop("retention_check")
    report["task_cpu_us"] = task_cpu(report["round_trips"])
    note("history: finished sagas compacted, then archived to PostgreSQL")
    report.update(_history(_guarded(history_phase, bench, opts, workdir)))
    if opts.scale_sizes:
        note(f"scale: {', '.join(map(str, opts.scale_sizes))} sagas at once")
        report["scale"] = _guarded(scale_phase, bench, opts, workdir)
        note(f"scale: {opts.scale_finished} finished sagas with the archive on")
        report["history_scale"] = _guarded(scale_history_phase, bench, opts, workdir)
    if opts.profile:
        note("profiling the pool processes during (B)")
        report["profile"] = _guarded(profile_phase, bench, opts, workdir)
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    report["bench_s"] = round(time.perf_counter() - started, 1)
    report["targets"] = targets(report)
    return report


def task_cpu(rt: dict[str, Any]) -> dict[str, Any]:
    """CPU per task inside the pool (instrumented worker), and the saga step / chain link ratio.

    A ratio of two figures taken minutes apart in the same processes: it moves far less
    with the machine's load than either figure does.
    """
    step = rt["saga"]["task_cpu_us"].get("bench.step", 0.0)
    link = rt["chain_nobackend"]["task_cpu_us"].get("bench.noop_quiet", 0.0)
    backed = rt["chain"]["task_cpu_us"].get("bench.noop", 0.0)
    return {"saga_step": step, "chain_link": backed, "chain_link_no_backend": link,
            "rollback": rt["saga_fail"]["task_cpu_us"].get("bench.step.rollback", 0.0),
            "ratio_step_vs_link": round(step / backed, 3) if backed else None,
            "ratio_step_vs_link_no_backend": round(step / link, 3) if link else None}


def _guarded(phase: Callable[[Bench, Options, Path], Any], bench: Bench, opts: Options,
             workdir: Path) -> Any:
    """An optional phase that fails is reported as such; the figures before it are kept."""
    try:
        return phase(bench, opts, workdir)
    except Exception as exc:  # report it, keep the rest of the results
        note(f"{phase.__name__} failed: {exc!r}")
        return {"error": f"{type(exc).__name__}: {exc}"}


HISTORY_FIGURES = ("bytes_per_saga_retained", "bytes_per_saga_retained_archive",
                   "archive_ms_p50", "ratio_saga_vs_chain_archive")


def _history(found: dict[str, Any]) -> dict[str, Any]:
    """The history phase's figures; each None, with the error, if the phase failed (no
    PostgreSQL, for one)."""
    if "error" in found:
        return {**dict.fromkeys(HISTORY_FIGURES), "history_error": found["error"]}
    return found


def _log_client_to(path: Path) -> None:
    """This process's saga events go to a file (as the worker's do), not the terminal."""
    import structlog

    if os.environ.get("BENCH_LOG", "json") == "json":
        structlog.configure(logger_factory=structlog.BytesLoggerFactory(path.open("wb")))


def _library_revision() -> dict[str, Any]:
    """The commit the library is at, and whether ``saga_celery/`` has uncommitted changes."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip()

    module = sys.modules.get("saga_celery")
    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "saga_celery_dirty": bool(git("status", "--porcelain", "--", "saga_celery")),
            "imported_from": getattr(module, "__file__", None)}


def _config(opts: Options) -> dict[str, Any]:
    return {"m": opts.m, "k": opts.k, "pairs": opts.pairs, "serial": opts.serial,
            "count_m": opts.count_m, "scale_sizes": list(opts.scale_sizes),
            "concurrency": 2, "pool": "prefork", "smoke": opts.smoke,
            "log": os.environ.get("BENCH_LOG", "json"),
            "experiments": os.environ.get("BENCH_EXPERIMENTS", ""),
            "library": _library_revision()}


def machine_info(server: PrivateRedis) -> dict[str, Any]:
    import celery
    import kombu
    import pydantic

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = redis.Redis.from_url(server.url).info("server")
    return {
        "cpu_count": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
        "python": platform.python_version(), "celery": celery.__version__,
        "kombu": kombu.__version__, "redis_py": redis.__version__,
        "pydantic": pydantic.VERSION, "redis_server": info.get("redis_version"),
        "loadavg_start": list(os.getloadavg()),
    }


# --- the command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=300, help="items per run (default 300)")
    parser.add_argument("--k", type=int, default=5, help="steps per saga/chain (default 5)")
    parser.add_argument("--pairs", type=int, default=5, help="timed A/A'/A''/B/C rounds (5)")
    parser.add_argument("--serial", type=int, default=30,
                        help="items of each kind run one at a time for unloaded latency (30)")
    parser.add_argument("--count-m", type=int, default=100,
                        help="items per kind in the round-trip counting worker (100)")
    parser.add_argument("--scale", action="store_true",
                        help="also run 1,000 and 10,000 sagas at once (minutes)")
    parser.add_argument("--scale-finished", type=int, default=100_000,
                        help="with --scale: finished sagas kept with the archive on (100000)")
    parser.add_argument("--scale-sizes", default="1000,10000",
                        help="sizes for --scale (default 1000,10000)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile (B): py-spy (CPU), then pyinstrument (wall)")
    parser.add_argument("--profile-text", type=Path, default=None,
                        help="write pyinstrument's full call tree here")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON results (default {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--md", default=None,
                        help=f"results markdown to update, or 'none' (default "
                             f"{DEFAULT_MD.relative_to(REPO)}; none with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny run that only checks the bench works (M=20, 1 pair)")
    parser.add_argument("--experiments", default="",
                        help="prototype library changes to patch in (see bench.app)")
    parser.add_argument("--log", choices=["json", "default", "quiet"], default="json",
                        help="how the worker renders saga lifecycle events (json)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--count-only", action="store_true",
                        help="only the instrumented worker (round trips, CPU per task): for "
                             "comparing library versions")
    args = parser.parse_args(argv)
    return _options(args)


def _options(args: argparse.Namespace) -> Options:
    if args.k < 2 or args.m < 1 or args.pairs < 1:
        raise SystemExit("bench: need --k >= 2, --m >= 1 and --pairs >= 1")
    if args.smoke:
        args.m, args.pairs, args.serial, args.count_m = min(args.m, 20), 1, 5, 10
    os.environ["BENCH_LOG"] = args.log
    if args.experiments:
        os.environ["BENCH_EXPERIMENTS"] = args.experiments
    smoke_out = Path(tempfile.gettempdir()) / "saga-bench-smoke.json"
    out = args.out or (smoke_out if args.smoke else DEFAULT_OUT)
    md_default = None if args.smoke else DEFAULT_MD
    md = md_default if args.md is None else (None if args.md == "none" else Path(args.md))
    sizes = tuple(int(s) for s in args.scale_sizes.split(",") if s) if args.scale else ()
    return Options(m=args.m, k=args.k, pairs=args.pairs, serial=max(args.serial, 1),
                   count_m=max(args.count_m, 1), scale_sizes=sizes, profile=args.profile,
                   profile_text=args.profile_text, out=out, md=md, smoke=args.smoke,
                   quiet=args.quiet, count_only=args.count_only,
                   scale_finished=max(args.scale_finished, 1))


_NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "venv", "*.egg-info", "__pycache__",
                                     ".hypothesis", ".mypy_cache", ".ruff_cache",
                                     ".pytest_cache", "node_modules")


def pin_library(dest: Path) -> None:
    """Run everything from a copy of the working tree taken now.

    Other people commit to ``saga_celery/`` while a bench runs for minutes; a worker started
    later from the live tree could write records the caller (or the previous worker) cannot
    read.  The caller imports ``saga_celery`` from the copy, and the workers start in it (the
    harness runs them from ``REPO_ROOT``, with it first on ``PYTHONPATH``).
    """
    shutil.copytree(REPO, dest, ignore=_NOT_COPIED)
    sys.path.insert(0, str(dest))
    harness.REPO_ROOT = dest


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="saga-bench-") as tmp:
        workdir = Path(tmp)
        pin_library(workdir / "tree")
        server = PrivateRedis(workdir)
        server.start()
        note(f"private redis-server on port {server.port}; worker logs in {workdir}")
        try:
            if opts.count_only:
                report = count_only(opts, server, workdir)
            else:
                report = run_all(opts, server, workdir)
        finally:
            server.stop()
    if opts.count_only:
        opts.out.write_text(json.dumps(report, indent=2) + "\n")
        sys.stdout.write(json.dumps({k: v.get("task_cpu_us") for k, v in
                                     report["round_trips"].items()}, indent=1) + "\n")
        return 0
    write_outputs(report, opts.out, opts.md)
    print_summary(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
