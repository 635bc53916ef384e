"""History at scale (SPEC section 11): what a finished saga costs Redis once it ended, what
archiving it to PostgreSQL costs, and, with ``--scale``, many finished sagas at once.

- ``bytes_per_saga_retained``: ``MEMORY USAGE`` of every key of a finished saga once the
  finisher compacted it (target <= 2,048 B), and ``bytes_per_saga_retained_archive`` once it
  archived it and left a tombstone (target <= 512 B);
- ``archive_ms_p50`` / ``_p99``: from the saga's end (``ended_at``) to its row in the archive
  (``archived_at``, PostgreSQL's clock, on the same machine);
- ``ratio_saga_vs_chain_archive``: the saga/chain wall-time ratio (result-backend chains, as
  the main ratio) with the archive on, median of the pairs (target <= 1.05);
- ``--scale``: ``history_scale``, ``--scale-finished`` sagas (100,000 by default) run to
  their end with the archive on, Redis ``used_memory`` before and after, the archive's row
  count, and how long ``list`` on the archive takes (first page, by status, by name, deep).

The archive lives in a database of its own, ``saga_celery_bench_<hex>`` on
``$BENCH_PG_URL`` (default ``postgresql://postgres@127.0.0.1:5432``), dropped at the end.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from bench.measure import Bench, pcts

if TYPE_CHECKING:
    from bench.run import Options

PG_SERVER = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")
FINISH_TIMEOUT_S = 300.0


def history_phase(bench: Bench, opts: Options, workdir: Path) -> dict[str, Any]:
    """The retained bytes without and with the archive, archive latency, and the ratio."""
    from bench.run import note, warm_up_kinds, worker

    out: dict[str, Any] = {}
    with worker(bench, workdir, {}):
        warm_up_kinds(bench, min(20, opts.m), ["saga"])
        _, items = bench.measure("saga", opts.m, "history: sagas, compacted when they end")
        wait_finished(bench)
        out["bytes_per_saga_retained"] = retained_bytes(bench, items)
    note("history: the same with the PostgreSQL archive on")
    with archive_db() as url, archived(bench, url), worker(bench, workdir,
                                                           {"BENCH_ARCHIVE": url}):
        warm_up_kinds(bench, min(20, opts.m), ["chain", "saga"])
        ratios, saga_items = [], []
        for i in range(opts.pairs):
            order = ["chain", "saga"] if i % 2 == 0 else ["saga", "chain"]
            runs = {}
            for kind in order:
                run, items = bench.measure(kind, opts.m, f"archive pair {i + 1}/{opts.pairs} "
                                                         f"{kind}")
                runs[kind] = run
                if kind == "saga":
                    wait_finished(bench)  # inside the pair: its archiving is not left over
                    saga_items = items
            ratios.append(runs["saga"].wall_s / runs["chain"].wall_s)
        out["ratio_saga_vs_chain_archive"] = round(statistics.median(ratios), 3)
        out["ratio_archive_per_pair"] = [round(x, 3) for x in ratios]
        out["bytes_per_saga_retained_archive"] = retained_bytes(bench, saga_items)
        latency = archive_ms(url, [h.id for h in saga_items])
        out["archive_ms_p50"] = latency["p50"]
        out["archive_ms"] = latency
    return out


def scale_history_phase(bench: Bench, opts: Options, workdir: Path) -> dict[str, Any]:
    """``opts.scale_finished`` sagas run to their end with the archive on, in batches."""
    from bench.run import note, warm_up_kinds, worker

    total, batch = opts.scale_finished, 1000
    with archive_db() as url, archived(bench, url) as archive, worker(
            bench, workdir, {"BENCH_ARCHIVE": url}):
        warm_up_kinds(bench, 20, ["saga"])
        wait_finished(bench)
        bench.reset()
        rows_before = archive.count()  # the warm-up's
        client = redis.Redis.from_url(bench.app.SAGA_URL)
        before = int(client.info("memory")["used_memory"])
        started, done = time.perf_counter(), 0
        while done < total:
            size = min(batch, total - done)
            handles = [bench.saga.apply_async() for _ in range(size)]
            for handle in handles:
                handle.wait(timeout=600)
            done += size
            note(f"history scale: {done} of {total} sagas finished")
        wall = time.perf_counter() - started
        wait_finished(bench)
        after = int(client.info("memory")["used_memory"])
        rows = archive.count() - rows_before
        out = {"sagas": total, "wall_s": round(wall, 1), "sagas_per_s": round(total / wall, 1),
               "used_memory_before": before, "used_memory_after": after,
               "used_memory_bytes_per_saga": round((after - before) / total),
               "redis_keys": int(client.dbsize()), "archive_rows": rows,
               "list_ms": list_latency(archive)}
        client.close()
    return out


# --- the measures --------------------------------------------------------------------------


def wait_finished(bench: Bench, timeout: float = FINISH_TIMEOUT_S) -> None:
    """Until the worker's finisher has compacted or archived every ended saga."""
    from saga_celery._store.keys import KeySpace

    key = KeySpace(bench.app.sagas._store.prefix).finishing
    client = redis.Redis.from_url(bench.app.SAGA_URL)
    deadline = time.monotonic() + timeout
    try:
        while client.zcard(key):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{client.zcard(key)} ended sagas still not finished "
                                   f"after {timeout} s")
            time.sleep(0.05)
    finally:
        client.close()


def retained_bytes(bench: Bench, handles: list[Any]) -> int | None:
    """Mean ``MEMORY USAGE`` over every key of a sample of finished sagas (all their keys:
    the state hash, what is left of the event stream, leases)."""
    client = redis.Redis.from_url(bench.app.SAGA_URL)
    prefix = bench.app.sagas._store.prefix
    sample = handles[:: max(1, len(handles) // 20)][:20]
    sizes = []
    try:
        for handle in sample:
            keys = list(client.scan_iter(match=f"{prefix}{{{handle.id}}}*", count=100))
            sizes.append(sum(int(client.memory_usage(k, samples=0) or 0) for k in keys))
    finally:
        client.close()
    return round(statistics.mean(sizes)) if sizes else None


def archive_ms(url: str, ids: list[str]) -> dict[str, float]:
    """From each saga's end to its archiving, in ms."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM archived_at - ended_at) * 1000 FROM saga_celery_sagas "
            "WHERE id = ANY(%s)", (ids,)).fetchall()
    return pcts([float(ms) for (ms,) in rows]) if rows else {"p50": -1.0, "p99": -1.0}


def list_latency(archive: Any, calls: int = 20) -> dict[str, float]:
    """p50 ms of ``list`` on the archive: the newest page, by status, by name, and a page
    deep in the history (after the cursor of the middle row)."""
    from datetime import UTC, datetime

    def timed(**kwargs: Any) -> float:
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            archive.page(limit=20, **kwargs)
            times.append((time.perf_counter() - start) * 1000)
        return round(statistics.median(times), 2)

    newest = archive.page(limit=1).sagas
    middle: dict[str, Any] = {}
    if newest:
        total = archive.count()
        page = archive.page(limit=max(1, total // 2))
        if page.next is not None:
            middle = {"after": page.next}
    return {"newest": timed(), "by_status": timed(status="complete"),
            "by_name": timed(name=newest[0].name if newest else "none"),
            "deep": timed(**middle) if middle else timed(ended_before=datetime.now(UTC))}


# --- the archive -------------------------------------------------------------------------


@contextlib.contextmanager
def archive_db() -> Iterator[str]:
    """A database ``saga_celery_bench_<hex>`` for the archive, dropped afterwards."""
    import psycopg

    name = f"saga_celery_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True,
                             connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def archived(bench: Bench, url: str) -> Iterator[Any]:
    """This (the waiting) process reads the archive too while the block runs: a saga the
    worker archived is read from it."""
    from saga_celery._store.archive import PostgresArchive

    store = bench.app.sagas._store
    archive = PostgresArchive(url)
    store.archive = archive
    try:
        yield archive
    finally:
        store.archive = None
        archive.close()
