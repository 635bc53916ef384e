"""Instructions per task under callgrind: the benchmark's figure that machine noise cannot move.

``python -m bench.instructions`` (``make bench-instructions``) starts a private
``redis-server`` and, for (A) a chain link with the Redis result backend and (B) a saga step
(each with a no-op rollback), runs under valgrind's callgrind a process that sends M items,
then executes every task message of them the way a prefork pool process does
(``celery.app.trace.trace_task``: the task, its result or saga commits, publishing the next
message) and counts the user-space instructions of that execution only: sending and a
warm-up pass are not counted.  A saga step whose previous step ran in the other pool process
has to load the saga first: ``--miss`` (default 0.6, the benchmark's measured loads per step)
is the share of steps that start with an empty state cache.

On this shared VM wall and CPU times of the same code drift by 10-25 % between runs; the
instruction count of the same code differs by under 0.5 %.  It leaves out the kernel (system
calls, the loopback network) and Redis's own work, which the timed benchmark includes.
``--tree`` measures another checkout (a ``git worktree`` of an older commit) for before and
after figures.  valgrind must be installed (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KINDS = {"chain": "chain link (result backend)", "saga": "saga step"}


def measure(tree: Path, kind: str, m: int, miss: float, redis_url: str, workdir: Path) -> int:
    """Instructions per task of ``kind`` in ``tree``, from one callgrind run."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("bench.instructions: valgrind is not installed "
                         "(apt-get install valgrind)")
    env = dict(os.environ, PYTHONPATH=str(tree), BENCH_REDIS_URL=redis_url,
               BENCH_LOG=os.environ.get("BENCH_LOG", "json"))
    out = workdir / f"callgrind-{kind}.out"
    done = subprocess.run(
        [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         # this file by path: ``bench`` and ``saga_celery`` then come from ``tree``
         sys.executable, __file__, "--child", kind, "--m", str(m),
         "--miss", str(miss)],
        cwd=tree, env=env, capture_output=True, text=True, check=False)
    tasks = re.search(r"^TASKS (\d+)$", done.stdout, re.M)
    collected = re.findall(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or tasks is None or not collected:
        raise SystemExit(f"bench.instructions: the {kind} run failed:\n{done.stderr[-3000:]}")
    return int(collected[-1]) // int(tasks.group(1))


def child(kind: str, m: int, miss: float) -> None:
    """Under callgrind: send M items, run their tasks once uncounted, then M more counted."""
    from celery.app.trace import trace_task

    import bench.app as bench_app
    from saga_celery._celery import timeouts
    from saga_celery._celery.control import CONTROL_KEY

    # As in a prefork pool process, where Celery's time limits apply and a saga body is
    # called as it is (the signal the worker sends there, worker_process_init, is not sent
    # here; without this each step would arm and disarm a SIGALRM timer instead).
    timeouts._in_pool_child = True

    app = bench_app.app
    queue = "saga.steps" if kind == "saga" else "celery"
    draw = random.Random(7).random

    def one_pass(counted: bool) -> int:
        for _ in range(m):
            if kind == "saga":
                bench_app.saga_definition(5).apply_async()
            else:
                bench_app.chain_with_backend(5).apply_async()
        if counted:
            _callgrind("on")
        ran = 0
        with app.connection_for_read() as conn:
            messages = conn.SimpleQueue(queue, no_ack=True)
            while True:
                try:
                    message = messages.get(timeout=0.5)
                except messages.Empty:
                    break
                headers = message.headers
                args, kwargs, embed = message.decode()
                if kind == "saga" and draw() < miss:  # as if the other process ran the last
                    saga_id = kwargs[CONTROL_KEY]["saga_id"]
                    bench_app.sagas._engine._cache.pop(saga_id, None)
                # ``properties`` as Celery's Request passes them: a saga task finds its
                # delivery tag there and sends its own late ack (``_celery/acks.py``).
                request = {**headers, **embed, "delivery_info": message.delivery_info,
                           "properties": message.properties,
                           "hostname": "bench@instructions", "args": args, "kwargs": kwargs,
                           "is_eager": False}
                trace_task(app.tasks[headers["task"]], headers["id"], args, kwargs, request,
                           app=app)
                ran += 1
        if counted:
            _callgrind("off")
        return ran

    one_pass(counted=False)
    sys.stdout.write(f"TASKS {one_pass(counted=True)}\n")


def _callgrind(state: str) -> None:
    subprocess.run(["callgrind_control", "-i", state, str(os.getpid())],
                   capture_output=True, check=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=40, help="items per pass (default 40)")
    parser.add_argument("--miss", type=float, default=0.6,
                        help="share of saga steps that load the saga first (default 0.6)")
    parser.add_argument("--tree", type=Path, default=REPO,
                        help="checkout to measure (default: this one)")
    parser.add_argument("--kinds", default="chain,saga", help="what to measure (chain,saga)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--child", choices=sorted(KINDS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.m, args.miss)
        return 0
    from bench.measure import PrivateRedis

    report: dict[str, Any] = {"tree": str(args.tree), "m": args.m, "miss": args.miss}
    with tempfile.TemporaryDirectory(prefix="saga-instr-") as tmp:
        server = PrivateRedis(Path(tmp))
        server.start()
        try:
            for kind in args.kinds.split(","):
                report[kind] = measure(args.tree.resolve(), kind, args.m, args.miss,
                                       server.url, Path(tmp))
                sys.stdout.write(f"{KINDS[kind]:28s} {report[kind]:>12,} instructions\n")
        finally:
            server.stop()
    if "chain" in report and "saga" in report:
        ratio = report["ratio_saga_vs_chain"] = round(report["saga"] / report["chain"], 3)
        sys.stdout.write(f"{'ratio saga step / chain link':28s} {ratio:>12}\n")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
