"""``python -m workers.fleet`` (``make fleet``): the deploy/ topology as local processes.

It starts a private ``redis-server`` with ``deploy/redis/redis.conf`` (AOF, ``noeviction``)
on the first free port from ``--port-base``, then the fleet of docker-compose.yml with the
same start lines: a step pool (``-Q saga.steps``), a rollback pool (``-Q saga.rollbacks``),
``celery beat`` (the recovery sweep) and Flower with basic auth on the next free port.  It
runs ``--sagas`` orders through them (some fail, so the rollback pool compensates them),
prints each outcome and where Flower is, then runs until Ctrl-C (``--headless``: stops at
once).  Every process it started is stopped on the way out, whatever happened.  Their logs
are in a temporary directory, kept (and printed in part) when something went wrong or with
``--keep-logs``.  The exit status is 0 only if every saga ended as expected, beat's sweep
ran, both pools answered the health check of deploy/ and Flower required its credentials.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from workers.processes import (
    Service,
    free_port,
    http_get,
    http_get_json,
    redis_pings,
    wait_for,
)
from workers.settings import WorkerSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
REDIS_CONF = REPO_ROOT / "deploy" / "redis" / "redis.conf"
STEPS_QUEUE = str(WorkerSettings.model_fields["steps_queue"].default)
ROLLBACKS_QUEUE = str(WorkerSettings.model_fields["rollbacks_queue"].default)
START_TIMEOUT_S = 60.0
SAGA_TIMEOUT_S = 90.0
LOG_TAIL_LINES = 60
FLOWER_USER = "admin"
RECOVERY_INTERVAL_S = 3


class Stop(Exception):
    """Ctrl-C (SIGINT), SIGTERM or SIGHUP: stop the fleet."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Scenario:
    """One kind of order the fleet places, and how it must end."""

    label: str
    params: dict[str, Any]
    status: str
    rollback: str | None


SCENARIOS = (
    Scenario("completes", {}, "complete", None),
    Scenario("charge fails once, retried", {"flaky": ["charge_payment"]}, "complete", None),
    Scenario("ticket fails: rolled back", {"fail_at": "create_ticket",
                                           "flaky": ["refund_payment"]}, "errored", "complete"),
)


class Fleet:
    """The processes of one local fleet; ``stop()`` ends every one it started."""

    def __init__(self, log_dir: Path, port_base: int) -> None:
        self.log_dir = log_dir
        self.port_base = port_base
        self.tag = uuid.uuid4().hex[:6]
        self.host = socket.gethostname()
        self.password = secrets.token_urlsafe(12)
        self.services: list[Service] = []
        self.redis_port = 0
        self.flower_port = 0

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    def env(self) -> dict[str, str]:
        """The settings every fleet process gets: this environment's, minus SAGA_*/FLOWER_*."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGA_", "FLOWER_"))}
        env.update(
            SAGA_REDIS_URL=self.redis_url, SAGA_IMPORTS="workers.shop",
            SAGA_STEPS_QUEUE=STEPS_QUEUE, SAGA_ROLLBACKS_QUEUE=ROLLBACKS_QUEUE,
            # Short, so a lost worker's messages come back soon; still above every retry
            # delay plus timeout of the shop's steps (checked when they are declared).
            SAGA_VISIBILITY_TIMEOUT="60", SAGA_RECOVERY_INTERVAL=str(RECOVERY_INTERVAL_S),
            SAGA_FLOWER_USER=FLOWER_USER, SAGA_FLOWER_PASSWORD=self.password,
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                     os.environ.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _start(self, name: str, command: list[str]) -> Service:
        service = Service.start(name, command, env=self.env(), cwd=REPO_ROOT,
                                log_path=self.log_dir / f"{name}.log")
        self.services.append(service)
        print(f"  {name:<10} pid {service.pid:<8} {service.display()}", flush=True)
        return service

    def _celery(self, name: str, *args: str) -> Service:
        return self._start(name, [sys.executable, "-m", "celery", "-A", "workers.app", *args])

    def start(self) -> None:
        """Redis first, then the pools, beat and Flower; return once all are ready."""
        self._start_redis()
        pools = {queue: self._worker(pool, queue) for pool, queue in
                 (("steps", STEPS_QUEUE), ("rollbacks", ROLLBACKS_QUEUE))}
        beat = self._celery("beat", "beat", "--loglevel", "INFO",
                            "--schedule", str(self.log_dir / "celerybeat-schedule"))
        self._start_flower()
        for queue, worker in pools.items():
            worker.wait_log(f"{self.node(queue)} ready.", START_TIMEOUT_S)
        beat.wait_log("beat: Starting...", START_TIMEOUT_S)

    def node(self, queue: str) -> str:
        return f"{queue.rsplit('.', maxsplit=1)[-1]}-{self.tag}@{self.host}"

    def _worker(self, name: str, queue: str) -> Service:
        return self._celery(name, "worker", "-Q", queue, "-n", self.node(queue),
                            "-P", "prefork", "-c", "2", "--loglevel", "INFO",
                            "--without-gossip", "--without-mingle")

    def _start_redis(self) -> None:
        def start(port: int) -> Service:
            self.redis_port = port
            return self._start("redis", [
                "redis-server", str(REDIS_CONF), "--port", str(port), "--bind", "127.0.0.1",
                "--dir", str(self.log_dir), "--save", "",
            ])  # fmt: skip

        _start_on_free_port(start, lambda: redis_pings(self.redis_url), self.port_base)

    def _start_flower(self) -> None:
        def start(port: int) -> Service:
            self.flower_port = port
            return self._celery("flower", "flower", "--address=127.0.0.1", f"--port={port}")

        _start_on_free_port(start, lambda: http_get(f"{self.flower_url}/healthcheck")[0] == 200,
                            self.redis_port + 1)

    def dead(self) -> list[Service]:
        return [s for s in self.services if not s.alive()]

    def stop(self) -> None:
        """Flower and beat, then the worker pools (warm shutdown), then Redis."""
        by_name = {s.name: s for s in self.services}
        for stage in (("flower", "beat"), ("steps", "rollbacks"), ("redis",)):
            Service.stop_all([by_name[n] for n in stage if n in by_name])
        left = [s for s in self.services if s.group_pids()]
        if left:
            raise RuntimeError(f"still running after stop: {left}")


def _start_on_free_port(start: Callable[[int], Service], ready: Callable[[], bool],
                        first_port: int) -> None:
    """Start a server on the first free port; again on the next if another process took it."""
    for _ in range(5):
        service = start(free_port(first_port))
        if _became_ready(service, ready):
            return
        service.stop()
        if "Address already in use" not in service.log():
            break
    raise RuntimeError(f"{service.name} did not start; see its log")


def _became_ready(service: Service, ready: Callable[[], bool]) -> bool:
    return wait_for(lambda: not service.alive() or ready(), START_TIMEOUT_S) and service.alive()


# --- what the fleet checks -------------------------------------------------------------


def run_sagas(count: int, tag: str) -> list[str]:
    """Place ``count`` orders, cycling through SCENARIOS; print each; return what went wrong."""
    from workers import shop

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(f"\nPlacing {count} orders (place-order: reserve_inventory -> charge_payment -> "
          "create_ticket):", flush=True)
    started = time.monotonic()
    runs = [(SCENARIOS[i % len(SCENARIOS)], shop.place_order.apply_async(
        saga_id=f"order-{tag}-{i + 1}", params=SCENARIOS[i % len(SCENARIOS)].params))
        for i in range(count)]
    problems = []
    for scenario, run in runs:
        try:
            state = run.wait(timeout=SAGA_TIMEOUT_S)
        except TimeoutError:
            state = run.status()
        rollback = None if state.rollback is None else state.rollback.outcome
        summary = "none" if state.rollback is None else (
            f"{rollback} ({state.rollback.completed_steps}/{state.rollback.total_steps} "
            "steps compensated)")
        ok = state.status == scenario.status and rollback == scenario.rollback
        print(f"  {'ok ' if ok else 'BAD'} {state.id:<16} {scenario.label:<28} "
              f"status={state.status:<9} rollback={summary}", flush=True)
        if not ok:
            problems.append(f"saga {state.id} ({scenario.label}) should be {scenario.status} "
                            f"with rollback {scenario.rollback}: it is {state.status}, "
                            f"rollback {rollback}")
    print(f"  {count - len(problems)}/{count} sagas ended as expected in "
          f"{time.monotonic() - started:.1f} s", flush=True)
    return problems


def check_beat(fleet: Fleet) -> list[str]:
    """Beat sent the recovery sweep and the rollback pool ran it."""
    by_name = {s.name: s for s in fleet.services}
    beat, rollbacks = by_name["beat"], by_name["rollbacks"]
    timeout = 4 * RECOVERY_INTERVAL_S + 10
    ran = wait_for(lambda: "Sending due task saga_celery.recover" in beat.log()
                   and "Task saga_celery.recover[" in rollbacks.log(), timeout)
    if not ran:
        return [f"beat's recovery sweep did not run on the rollback pool within {timeout} s"]
    print(f"\nBeat: saga_celery.recover sent every {RECOVERY_INTERVAL_S} s, run by the "
          "rollback pool.", flush=True)
    return []


def check_probes(fleet: Fleet) -> list[str]:
    """Each pool answers the health check of deploy/ (``celery inspect ping`` to its node)."""
    problems = []
    for queue in (STEPS_QUEUE, ROLLBACKS_QUEUE):
        command = [sys.executable, "-m", "celery", "-A", "workers.app", "inspect", "ping",
                   "-d", fleet.node(queue), "--timeout", "10"]
        done = subprocess.run(command, cwd=REPO_ROOT, env=fleet.env(), capture_output=True,
                              text=True, timeout=60, check=False)
        if done.returncode != 0:
            problems.append(f"health check of {fleet.node(queue)} failed: {done.stdout}"
                            f"{done.stderr}")
    if not problems:
        print("Health checks (celery -A workers.app inspect ping -d <node>): both pools "
              "answered.", flush=True)
    return problems


def check_flower(fleet: Fleet, saga_id: str) -> list[str]:
    """Flower refuses anonymous requests, sees both pools and finds a saga's tasks."""
    auth = (FLOWER_USER, fleet.password)
    problems = []
    anonymous, _ = http_get(f"{fleet.flower_url}/api/workers")
    if anonymous != 401:
        problems.append(f"Flower answered an anonymous request with {anonymous}, not 401")
    nodes = [fleet.node(q) for q in (STEPS_QUEUE, ROLLBACKS_QUEUE)]
    workers_url = f"{fleet.flower_url}/api/workers?refresh=1"
    if not wait_for(lambda: all(n in http_get_json(workers_url, auth) for n in nodes), 20):
        problems.append(f"Flower does not list both worker pools {nodes}")
    query = f"kwargs:saga_id={saga_id}"
    tasks: dict[str, Any] = {}

    def found() -> bool:
        nonlocal tasks
        tasks = http_get_json(f"{fleet.flower_url}/api/tasks?search={urllib.parse.quote(query)}",
                          auth)
        return len(tasks) > 0

    wait_for(found, 10)
    print(f"\nFlower: {fleet.flower_url}  (user {FLOWER_USER}, password {fleet.password})\n"
          f"  search {query!r}: {len(tasks)} tasks of that saga "
          f"({', '.join(sorted({str(t.get('name')) for t in tasks.values()}))})", flush=True)
    return problems


# --- running ---------------------------------------------------------------------------


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def _wait_for_ctrl_c(fleet: Fleet) -> list[str]:
    print(f"\nThe fleet is running (logs in {fleet.log_dir}); Flower is at {fleet.flower_url}. "
          "Press Ctrl-C to stop it.", flush=True)
    while True:
        time.sleep(1)
        dead = fleet.dead()
        if dead:
            return [f"{s.name} exited with status {s.returncode}" for s in dead]


def run(args: argparse.Namespace, log_dir: Path) -> list[str]:
    """Start the fleet, check it, wait (unless headless), and always stop it."""
    fleet = Fleet(log_dir, args.port_base)
    problems: list[str] = []
    try:
        print(f"Starting the fleet (logs in {log_dir}):", flush=True)
        fleet.start()
        os.environ.update(fleet.env())  # this process places the orders with the same settings
        problems += run_sagas(args.sagas, fleet.tag)
        problems += check_beat(fleet)
        problems += check_probes(fleet)
        problems += check_flower(fleet, f"order-{fleet.tag}-{min(3, args.sagas)}")
        if not args.headless:
            problems += _wait_for_ctrl_c(fleet)
    except (KeyboardInterrupt, Stop) as exc:
        print(f"\n{str(exc) or 'SIGINT'}: stopping the fleet", flush=True)
    except Exception as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        for signum in STOP_SIGNALS:  # a second Ctrl-C must not cut the stopping short
            signal.signal(signum, signal.SIG_IGN)
        try:
            fleet.stop()
            print(f"Stopped all {len(fleet.services)} processes the fleet started.", flush=True)
        except RuntimeError as exc:
            problems.append(str(exc))
    if problems:
        _print_logs(fleet)
    return problems


def _print_logs(fleet: Fleet) -> None:
    for service in fleet.services:
        tail = service.log().splitlines()[-LOG_TAIL_LINES:]
        print(f"\n--- {service.name} log ({service.log_path}), last lines:", *tail,
              f"--- end of {service.name} log", sep="\n", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers.fleet", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--headless", action="store_true",
                        help="stop after the sagas instead of waiting for Ctrl-C")
    parser.add_argument("--sagas", type=int, default=6, help="orders to place (default 6)")
    parser.add_argument("--port-base", type=int, default=6400,
                        help="Redis gets the first free port from here, Flower the next")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the log directory even when everything went well")
    args = parser.parse_args(argv)
    if args.sagas < 1:
        parser.error("--sagas must be at least 1")
    if not 1024 <= args.port_base <= 65000:
        parser.error("--port-base must be between 1024 and 65000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("redis-server") is None:
        print("FLEET FAILED: redis-server is not on PATH (apt-get install redis-server, or "
              "brew install redis)", file=sys.stderr)
        return 1
    # SIGINT too: a shell starts a background job with SIGINT ignored.
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stop)
    log_dir = Path(tempfile.mkdtemp(prefix="saga-fleet-"))
    problems = run(args, log_dir)
    if problems:
        print("\nFLEET FAILED:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        print(f"logs kept in {log_dir}", file=sys.stderr)
        return 1
    if args.keep_logs:
        print(f"logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    print("fleet passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
