"""The chaos thread of a run: kills, stops and restarts things while sagas are in flight."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable

import redis

from tests.chaos.check import ChaosEvent
from tests.chaos.procs import Fleet, RedisServer, log


class Chaos(threading.Thread):
    """Kills, stops and restarts things while the driver submits sagas.

    One-off events (and, with ``max_kills``, the kills) are planned at shares of the sagas
    submitted; the driver holds submissions back while an event is overdue, so every event
    lands while sagas are in flight.  Without ``max_kills``, kills come every
    ``kill_every`` seconds on average for as long as sagas are being submitted.
    """

    LAG = 0.1
    """How far (as a share of all sagas) submissions may run ahead of an overdue event."""

    def __init__(self, fleet: Fleet, server: RedisServer, ledger: redis.Redis,
                 progress: Callable[[], float], rng: random.Random, *, kill_every: float,
                 max_kills: int | None, stop_s: float, redis_down_s: float) -> None:
        super().__init__(name="chaos", daemon=True)
        self.fleet, self.server, self.ledger = fleet, server, ledger
        self.progress, self.rng = progress, rng
        self.kill_every, self.stop_s, self.redis_down_s = kill_every, stop_s, redis_down_s
        self.timed_kills = max_kills is None
        kills = max_kills or 0
        planned_kills = [(0.1 + 0.7 * i / max(kills - 1, 1), "kill") for i in range(kills)]
        self.plan = sorted([(0.3, "sigstop"), (0.55, "redis_restart"), *planned_kills])
        """(share of sagas submitted, event), soonest first; an event leaves once done."""
        self.halted = threading.Event()
        self.events: list[ChaosEvent] = []
        self.error: BaseException | None = None
        self.counts = {"worker_kills": 0, "child_kills": 0, "redis_restarts": 0,
                       "sigstops": 0}
        self.redis_unavailable_s = 0.0
        self.sigstop_mid_body = False

    @property
    def kills(self) -> int:
        return self.counts["worker_kills"] + self.counts["child_kills"]

    def allows(self, share: float) -> bool:
        """May the saga at ``share`` of the run be submitted (no event is overdue)?"""
        plan = list(self.plan)
        return not plan or plan[0][0] > share - self.LAG

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by the driver, which then stops the run
            self.error = exc

    def _loop(self) -> None:
        next_kill = time.monotonic() + self._interval()
        while not self.halted.wait(0.1):
            for reason in self.fleet.revive():
                log(f"supervisor: {reason}; restarted")
            if self.plan and self.progress() >= self.plan[0][0]:
                kind = self.plan[0][1]
                {"kill": self._kill, "sigstop": self._sigstop,
                 "redis_restart": self._restart_redis}[kind]()
                self.plan.pop(0)
                next_kill = time.monotonic() + self._interval()
            elif self.timed_kills and time.monotonic() >= next_kill:
                self._kill()
                next_kill = time.monotonic() + self._interval()

    def _interval(self) -> float:
        return self.kill_every * self.rng.uniform(0.5, 1.5)

    def _note(self, kind: str, detail: str, worker: str = "") -> None:
        self.events.append(ChaosEvent(t=time.time(), kind=kind, detail=detail, worker=worker))
        log(f"{kind}: {detail}")

    def _kill(self) -> None:
        running = self.fleet.running()
        if not running:
            return
        # the 2nd of every 3 kills: a short run's two kills are one of each
        if self.kills % 3 == 1 and self._kill_child(running):
            return
        slot = self.rng.choice(running)
        self._note("kill", f"SIGKILL worker {slot} (main process and pool)",
                   worker=self.fleet.log_name(slot))
        self.fleet.kill_worker(slot)
        self.counts["worker_kills"] += 1
        started = time.monotonic()
        self.fleet.start(slot)
        log(f"worker {slot} restarted in {time.monotonic() - started:.1f} s")

    def _kill_child(self, running: list[int]) -> bool:
        """SIGKILL one pool process of a worker that has one (a worker that crashed by itself
        may have none left); False if none was killed."""
        slots = [slot for slot in running if self.fleet.child_pids(slot)]
        if not slots:
            return False
        slot = self.rng.choice(slots)
        at = time.time()
        if self.fleet.kill_child(slot) is None:
            return False
        self.events.append(ChaosEvent(t=at, kind="kill",
                                      detail=f"SIGKILL one pool process of worker {slot}"))
        log(f"kill: SIGKILL one pool process of worker {slot}")
        self.counts["child_kills"] += 1
        return True

    def _busy_slot(self) -> int | None:
        """A running worker whose pool process is inside a step body right now."""
        try:
            bodies = self.ledger.hgetall("chaos:running")
        except redis.RedisError:
            return None
        busy = {int(pid) for pid, raw in bodies.items()
                if json.loads(raw)["kind"] == "step" and time.time() - json.loads(raw)["t"] < 1}
        for slot in self.fleet.running():
            if busy & set(self.fleet.child_pids(slot)):
                return slot
        return None

    def _sigstop(self) -> None:
        deadline = time.monotonic() + 10
        slot = self._busy_slot()
        while slot is None and time.monotonic() < deadline and not self.halted.is_set():
            time.sleep(0.05)
            slot = self._busy_slot()
        self.sigstop_mid_body = slot is not None
        if slot is None:
            running = self.fleet.running()
            if not running:
                return
            slot = self.rng.choice(running)
        self._note("sigstop", f"SIGSTOP worker {slot} for {self.stop_s:g} s "
                              f"({'inside' if self.sigstop_mid_body else 'maybe outside'} a "
                              "step body)")
        pgid = self.fleet.pause(slot)
        self.halted.wait(self.stop_s)
        if pgid is not None:
            self.fleet.resume(pgid)
        self.counts["sigstops"] += 1
        log(f"SIGCONT worker {slot}")

    def _restart_redis(self) -> None:
        self._note("redis_restart", f"SIGTERM redis-server :{self.server.port}, start it "
                                    f"again {self.redis_down_s:g} s later")
        self.redis_unavailable_s = self.server.restart(down_s=self.redis_down_s)
        self.counts["redis_restarts"] += 1
        log(f"redis back after {self.redis_unavailable_s:.1f} s")
