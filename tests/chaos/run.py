"""``python -m tests.chaos.run`` (``make chaos``): sagas on real workers while chaos strikes.

It starts a private ``redis-server`` (AOF, ``appendfsync always``: a restart loses nothing)
on a free port in 6700-6799 in a temporary directory, ``--workers`` prefork workers of
``tests.chaos.app`` and ``celery beat``, which sends the recovery sweep
(``saga_celery.recover``) every 2 seconds, as a production deployment would.  With
``--no-beat`` there is no beat and so no sweep at all (no worker runs ``-B``, and only beat
sends the sweep ``SagaApp`` schedules): every saga must then end by redeliveries alone, as
SPEC section 1 requires ("liveness does not depend on beat").  Then it
submits ``--sagas`` sagas of mixed shapes (succeed; fail at a random step, retried or
not; a parallel stage; steps that fail once; rollbacks that fail once), keeping at most
``--window`` in flight, while a chaos thread (``tests.chaos.chaos``):

- SIGKILLs a random worker every ``--kill-every`` seconds (on average) and restarts it;
  one kill in three (the 2nd, 5th, ...) takes one pool process instead of the whole worker;
- SIGSTOPs a worker that is running a step body, once, for ``--stop-s`` seconds (longer
  than the 4-second step timeout plus Celery's 2-second hard-limit grace), then SIGCONTs it;
- restarts Redis once: SIGTERM, ``--redis-down-s`` seconds down, then the same port and
  directory;
- acts as the workers' supervisor: a worker that exits, or wedges after Celery logged
  ``Unrecoverable error``, is restarted (``worker_crashes``; Celery's own crashes when its
  broker goes away, not chaos kills).

``--short`` (``make test``): 100 sagas and 2 kills (a whole worker, then a pool process), at
planned points, besides the SIGSTOP and the Redis restart.  Once every saga is submitted,
chaos stops and the run waits for every saga to end (at most ``--drain-timeout`` seconds:
180 by default, 60 with ``--no-beat``), stops the workers, and checks every saga against its
state and the ledger (``tests.chaos.check``).  It prints one JSON summary on stdout
(progress goes to stderr) and exits 1 on any violation, duplicate effect, lost or stalled
saga, or (``--no-beat``) a sweep that ran after all; with beat, also on a saga stalled in the
broker window (the sweep is there to re-send those).

Summary figures:

- ``beat``: whether beat ran; ``sweeps_run``: recovery sweeps the workers received (0
  without beat, or the run fails).
- ``lost_sagas``: sagas not terminal when the drain ended, or with no state at all (each is
  also a ``lost: ...`` violation, as before), except those stalled in the broker window;
  ``stalled``: those of them that have a state and are not terminal (a library bug), and
  ``stalled_samples`` what each was waiting for (``tests.chaos.stalled``: outbox entries,
  open attempts, leases, last events, its worker log lines; ``tests.chaos.broker``: each of
  its messages' life in the broker, replayed from Redis's append-only file;
  ``broker_window``: why the broker window does not explain it).  ``chaos.json`` in the
  logs directory has every saga not terminal.
- ``stalled_in_broker_window``: sagas not terminal only because kombu's Redis transport lost
  what they wait for (``tests.chaos.window``): it takes a message off its queue (BRPOP)
  before it records it as unacked, so a consumer that dies or loses its connection in
  between (a SIGKILLed worker, a crashed main process, Redis shutting down with the reply in
  flight) loses the message, and only a periodic check can find it: with beat the recovery
  sweep re-sends it, without beat nothing does.  Counted only when the AOF shows, for every
  message the saga waits for, its latest message taken and never recorded, acked nor
  restored, and a consumer ended within a second or two of that take; not in ``stalled``,
  ``lost_sagas`` or ``violations``, and allowed without beat.  ``broker_window_samples``
  gives per saga, per awaited message: the message, its life, the AOF second and command
  of the take (and how many commands later Redis shut down, if it did), the worker that
  took it (or the workers it can have been) and what ended it, when.
  ``messages_lost_in_broker_window``: every saga message the AOF shows taken and never
  recorded, needed or not; ``messages_lost_in_broker_window_resent_by_sweep``: those whose
  attempt the recovery sweep re-sent (``saga.recovered``; with beat, each one a saga needed).
- ``max_recovery_s``: for every chaos event (the moment a kill, the SIGSTOP or the Redis
  shutdown began) and every saga in flight then, the time from the event to the saga's next
  progress (a lifecycle event in its Redis stream, not counting attempts recorded as failed
  by a timeout or a lost worker: those are the damage); the largest over the run.
  ``recovery_by_event`` has, per kind of event, the count of (event, saga) pairs and their
  median, p99 and max; ``max_recovery_at`` names the saga and the event of the maximum;
  ``max_gap_s`` is the longest any saga went without progress, whatever the cause.
- ``bodies_run`` / ``bodies_run_twice``: step and rollback bodies started, and attempts whose
  body started more than once (redelivered after its worker died, or re-sent by recovery).
- ``effects_applied`` / ``effects_deduplicated``: effects in the ledger, and the times a
  body reached an effect already applied under its idempotency key (allowed);
  ``duplicate_effects``: a (kind, step, count) with more than one effect (never allowed).
- ``recovery_resends`` / ``sagas_recovered``: times the recovery sweep re-sent a saga's
  messages (``saga.recovered``), and how many distinct sagas that was.

Every process it started is stopped on the way out, whatever happened; logs are kept (and
their directory printed) when the run fails or with ``--keep-logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import redis
from kombu.exceptions import OperationalError

from saga_celery import SagaError, SagaStateError
from tests.chaos.chaos import Chaos
from tests.chaos.check import Planned
from tests.chaos.procs import Fleet, RedisServer, log
from tests.chaos.report import evaluate
from tests.integration.harness import WorkerStartError

EVENT_TIMINGS = ("early", "twice", "late", "never")
"""When the run sends a waiting saga its event (``never``: it times out)."""
TRANSIENT = (SagaError, redis.RedisError, OperationalError, OSError)
"""What a call may raise while Redis restarts: try again later."""
POLL_S = 0.3
DRAIN_TIMEOUT_S = 180.0
NO_BEAT_DRAIN_TIMEOUT_S = 60.0
"""Without the sweep, once chaos stops nothing should wait longer than one redelivery of a
dead worker's message (the app's visibility timeout plus kombu's restore interval) and a
lapsed lease after it: a saga still running this long after has stalled, not lagged."""


# --- what to run ---------------------------------------------------------------------------


def plan_sagas(shapes: dict[str, Any], count: int, rng: random.Random, tag: str
               ) -> list[Planned]:
    """``count`` sagas: 40 % succeed, 60 % fail at a random step; flaky steps and rollbacks."""
    planned = []
    for i in range(count):
        shape = rng.choice(sorted(shapes))
        specs = [spec for stage in shapes[shape].plan.stages for spec in stage
                 if spec.wait is None]  # a waiting stage runs no body to fail
        keys = [spec.key for spec in specs]
        params: dict[str, Any] = {}
        if rng.random() < 0.6:
            params["fail"] = rng.choice(keys)
            params["nonretryable"] = rng.random() < 0.3
            undoable = [spec.key for spec in specs if spec.rollback_task is not None]
            if rng.random() < 0.6:
                params["rollback_flaky"] = rng.sample(undoable, k=rng.randint(1, 2))
        if rng.random() < 0.25:
            params["flaky"] = [rng.choice([k for k in keys if k != params.get("fail")])]
        if any(spec.wait is not None and spec.wait.event_type
               for stage in shapes[shape].plan.stages for spec in stage):
            params["event"] = rng.choice(EVENT_TIMINGS)
        planned.append(Planned(saga_id=f"chaos-{tag}-{i:05d}", shape=shape, params=params))
    return planned


# --- submitting and waiting ----------------------------------------------------------------


class Driver:
    """Submits the planned sagas, at most ``window`` in flight, and sees them end."""

    def __init__(self, chaos_app: ModuleType, planned: list[Planned], window: int) -> None:
        self.app = chaos_app
        self.rng = random.Random(len(planned))
        self.events: dict[str, tuple[float, int]] = {}
        """Saga id -> (when to send its event, how many copies)."""
        self.total = len(planned)
        self.pending = deque(planned)
        self.window = window
        self.inflight: dict[str, float] = {}
        self.submitted = 0
        self.finished = 0
        self._last_report = 0.0
        self._last_end = time.monotonic()
        self._failing = False

    def progress(self) -> float:
        return self.submitted / self.total

    def stalled(self, seconds: float) -> bool:
        """No saga has ended for ``seconds`` while some are in flight: stop submitting."""
        if not self.inflight or time.monotonic() - self._last_end < seconds:
            return False
        log(f"no saga ended for {seconds:g} s: giving up on the {len(self.pending)} not "
            "submitted yet")
        self.pending.clear()
        return True

    def submit(self, gate: Callable[[int], bool]) -> None:
        """Start sagas until the window is full (or the gate holds the next one back)."""
        while self.pending and len(self.inflight) < self.window and gate(self.submitted):
            planned = self.pending[0]
            try:
                self.app.SAGAS[planned.shape].apply_async(saga_id=planned.saga_id,
                                                          params=planned.params)
            except TRANSIENT as exc:  # the same id and params again later is safe
                if not self._failing:
                    log(f"submit {planned.saga_id} failed ({type(exc).__name__}); retrying")
                self._failing = True
                return
            self._failing = False
            self.pending.popleft()
            self.inflight[planned.saga_id] = time.monotonic()
            self.submitted += 1
            timing = planned.params.get("event")
            if timing in ("early", "twice", "late"):
                delay = self.rng.uniform(0.5, 3.0) if timing == "late" else 0.0
                self.events[planned.saga_id] = (time.monotonic() + delay,
                                                2 if timing == "twice" else 1)
        self.send_events()

    def send_events(self) -> None:
        """Send the events that are due (``Planned.params["event"]``), once each; an
        ``early`` or ``twice`` one right after the start, a ``late`` one up to 3 s after."""
        now = time.monotonic()
        for saga_id, (due, copies) in list(self.events.items()):
            if due > now:
                continue
            try:
                for _ in range(copies):  # twice: the same event_id, counted once
                    self.app.sagas.run(saga_id).send_event(
                        self.app.EVENT, {"approved": saga_id}, event_id=f"ev-{saga_id}")
            except SagaStateError:
                pass  # it ended first (failed before its wait): the event is refused
            except TRANSIENT:
                continue  # try again next poll
            del self.events[saga_id]

    def poll(self) -> None:
        """Send the events that are due; forget the sagas that have ended."""
        self.send_events()
        for saga_id in list(self.inflight):
            try:
                snapshot = self.app.sagas._store.load(saga_id)
            except TRANSIENT:
                return
            if snapshot is not None and snapshot.run.is_terminal:
                del self.inflight[saga_id]
                self.finished += 1
                self._last_end = time.monotonic()
        if time.monotonic() - self._last_report > 10:
            self._last_report = time.monotonic()
            log(f"{self.submitted}/{self.total} submitted, {self.finished} ended, "
                f"{len(self.inflight)} in flight")


# --- the run -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sagas", type=int, default=None, help="default 1000 (--short: 100)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes per worker")
    parser.add_argument("--kill-every", type=float, default=5.0,
                        help="mean seconds between kills, without --max-kills (default 5)")
    parser.add_argument("--max-kills", type=int, default=None, help="default none (--short: 2)")
    parser.add_argument("--stop-s", type=float, default=10.0, help="how long the SIGSTOP lasts")
    parser.add_argument("--redis-down-s", type=float, default=5.0,
                        help="how long Redis stays down when it restarts")
    parser.add_argument("--window", type=int, default=24, help="sagas in flight at most")
    parser.add_argument("--drain-timeout", type=float, default=None,
                        help=f"seconds the sagas in flight get to end once chaos stops; "
                             f"default {DRAIN_TIMEOUT_S:g} ({NO_BEAT_DRAIN_TIMEOUT_S:g} with "
                             "--no-beat)")
    parser.add_argument("--no-beat", dest="beat", action="store_false",
                        help="start no celery beat, so the recovery sweep never runs: every "
                             "saga must end by redeliveries alone")
    parser.add_argument("--short", action="store_true",
                        help="about 100 sagas and 2 kills, plus the SIGSTOP and Redis restart")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    args.sagas = args.sagas or (100 if args.short else 1000)
    if args.short and args.max_kills is None:
        args.max_kills = 2
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    if args.drain_timeout is None:
        args.drain_timeout = DRAIN_TIMEOUT_S if args.beat else NO_BEAT_DRAIN_TIMEOUT_S
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _submit_all(driver: Driver, chaos: Chaos, args: argparse.Namespace) -> None:
    """Submit every saga while chaos strikes; then stop the chaos."""
    chaos.start()
    while driver.pending and not driver.stalled(args.drain_timeout):
        if chaos.error is not None:
            raise RuntimeError("the chaos thread failed") from chaos.error
        driver.submit(lambda n: chaos.allows(n / args.sagas))
        driver.poll()
        time.sleep(POLL_S)
    chaos.halted.set()
    chaos.join()
    log(f"{driver.submitted} of {args.sagas} submitted; chaos over ({chaos.kills} kills); "
        "draining")


def _drain(driver: Driver, fleet: Fleet, timeout: float) -> None:
    """Wait for the sagas in flight to end, every worker up; then stop the workers."""
    fleet.ensure_all()
    deadline = time.monotonic() + timeout
    while driver.inflight and time.monotonic() < deadline:
        for reason in fleet.revive():
            log(f"supervisor: {reason}; restarted")
        driver.poll()
        time.sleep(POLL_S)
    time.sleep(2)  # a late duplicate delivery would land now, before the ledger is read
    fleet.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="saga-chaos-"))
    server = RedisServer(work)
    fleet: Fleet | None = None
    chaos: Chaos | None = None
    passed = False
    started, wall_start = time.monotonic(), time.time()
    try:
        server.start()
        os.environ["CHAOS_REDIS_URL"] = server.url
        from tests.chaos import app as chaos_app  # reads CHAOS_REDIS_URL when imported

        log(f"seed {args.seed}; redis-server at {server.url}; logs in {work}")
        rng = random.Random(args.seed)
        fleet = Fleet(server.url, work, workers=args.workers, concurrency=args.concurrency)
        fleet.start_all()
        if args.beat:
            fleet.start_beat()
        planned = plan_sagas(chaos_app.SAGAS, args.sagas, rng, str(args.seed))
        driver = Driver(chaos_app, planned, args.window)
        chaos = Chaos(fleet, server, chaos_app.ledger, driver.progress, rng,
                      kill_every=args.kill_every, max_kills=args.max_kills, stop_s=args.stop_s,
                      redis_down_s=args.redis_down_s)
        _submit_all(driver, chaos, args)
        _drain(driver, fleet, args.drain_timeout)
        summary, stalled = evaluate(chaos_app, planned[:driver.submitted], chaos, fleet,
                                    wall_start, server.data_dir)
        summary |= {"not_submitted": args.sagas - driver.submitted,
                    "duration_s": round(time.monotonic() - started, 1), "seed": args.seed,
                    "beat": args.beat, "drain_timeout_s": args.drain_timeout,
                    "workers": args.workers, "concurrency": args.concurrency}
        print(json.dumps(summary, indent=2), flush=True)
        (work / "chaos.json").write_text(json.dumps(
            {"summary": summary, "stalled": stalled, "events": [vars(e) for e in chaos.events]},
            indent=2))
        passed = not (summary["violations"] or summary["duplicate_effects"]
                      or summary["lost_sagas"] or summary["stalled"] or summary["not_submitted"]
                      or (not args.beat and summary["sweeps_run"])
                      # the sweep exists for these: with beat, one left is the sweep's failure
                      or (args.beat and summary["stalled_in_broker_window"]))
        return 0 if passed else 1
    except WorkerStartError as exc:
        log(f"a worker did not start: {exc}")
        return 2
    finally:
        if chaos is not None:
            chaos.halted.set()
            chaos.join(timeout=60)
        if fleet is not None:
            fleet.close()
        server.kill()
        if passed and not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"logs kept in {work}")


if __name__ == "__main__":
    sys.exit(main())
