"""``saga-celery demo`` (``python -m saga_celery.demo``): two orders on a real worker, one
rolled back; then a third that waits for an approval event the demo sends.

With ``SAGA_REDIS_URL`` set, the demo uses that Redis; unset, it serves an embedded
Redis-protocol server in this process (``saga_celery.demo.embedded``).  It starts
``celery -A saga_celery.demo.app worker`` (prefork, 2 processes) against it, places an order
that completes and one whose last step fails so the steps that started are rolled back,
prints both sagas and their ledger effects, and exits 0 only if both ended as they should.
The worker's log goes to a temporary file, printed only when something went wrong.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import redis
import structlog

from saga_celery import SagaState
from saga_celery._extras import MissingExtraError
from saga_celery._table import status_lines

APP_MODULE = "saga_celery.demo.app"
"""What the worker subprocess imports, by name: so it is part of the installed package."""
READY_TIMEOUT_S = 60.0
SAGA_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 200


class Worker:
    """A ``celery -A saga_celery.demo.app worker`` subprocess, leader of its process group."""

    def __init__(self, env: dict[str, str]) -> None:
        self.node = f"saga-demo-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        fd, name = tempfile.mkstemp(prefix="saga-demo-worker-", suffix=".log")
        self.log_path = Path(name)
        command = [
            sys.executable, "-m", "celery", "-A", APP_MODULE, "worker",
            "-P", "prefork", "-c", "2", "-n", self.node,
            "--without-gossip", "--without-mingle",
            # INFO, not WARNING: the "<node> ready." line is how the demo knows it can start.
            "--loglevel", "INFO",
        ]  # fmt: skip
        with os.fdopen(fd, "wb") as log_file:
            self.popen = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, process_group=0,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> str | None:
        """Wait until the worker says it is ready; return why it is not, or None."""
        marker = f"{self.node} ready."
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log():
                return None
            if self.popen.poll() is not None:
                return f"the worker exited with status {self.popen.returncode}"
            time.sleep(0.1)
        return f"the worker was not ready after {timeout:g} s"

    def stop(self) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL its whole process group."""
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.popen.wait(STOP_TIMEOUT_S)
        with suppress(ProcessLookupError):  # pool processes left behind, or a stuck main
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


def worker_env(redis_url: str, *, embedded: bool) -> dict[str, str]:
    """This process's environment for the worker (and for this process's own app)."""
    env = dict(os.environ)
    env["SAGA_REDIS_URL"] = redis_url
    if embedded:  # the embedded server is the only Redis there is
        env["SAGA_BROKER_URL"] = redis_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


def unreachable(url: str) -> str | None:
    """Why Redis at ``url`` cannot be used, or None."""
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5) as client:
            client.ping()
    except redis.RedisError as exc:
        return f"cannot reach Redis at {url} ({exc}): start it, or unset SAGA_REDIS_URL"
    return None


# --- printing -------------------------------------------------------------------------


def _effect(entry: dict[str, Any]) -> str:
    action = str(entry.get("action"))
    if "sku" in entry:
        what = f"{entry['qty']} x {entry['sku']} (reservation {entry['reservation_id']})"
    elif "amount" in entry:
        what = f"{entry['amount']} cents (charge {entry['charge_id']})"
    elif "ticket_id" in entry:
        what = f"ticket {entry['ticket_id']} (charge {entry['charge_id']})"
    else:
        what = json.dumps({k: v for k, v in entry.items() if k not in ("action", "key")})
    return f"{action:<14} {what}"


def report(state: SagaState, events: list[dict[str, Any]],
           effects: list[dict[str, Any]]) -> str:
    """A saga's state, rollback order and ledger effects as plain text."""
    lines = status_lines(state, events)
    lines.append("  ledger effects, in order:")
    lines += [f"    {_effect(e)}" for e in effects] or ["    (none)"]
    return "\n".join(lines)


def problems(ok: SagaState, failed: SagaState, approved: SagaState | None = None
             ) -> list[str]:
    """Why the demo did not go as it should (empty when it did)."""
    found = []
    if approved is not None and approved.status != "complete":
        found.append(f"saga {approved.id} should be complete, it is {approved.status}")
    if ok.status != "complete":
        found.append(f"saga {ok.id} should be complete, it is {ok.status}")
    if failed.status != "errored":
        found.append(f"saga {failed.id} should be errored, it is {failed.status}")
    outcome = None if failed.rollback is None else failed.rollback.outcome
    if outcome != "complete":
        found.append(f"saga {failed.id} should have rollback outcome complete, it has {outcome}")
    return found


# --- running --------------------------------------------------------------------------


def run_orders() -> list[str]:
    """Place the two orders and print them; return what went wrong."""
    from saga_celery.demo.app import shop

    # This process's own saga events would interleave JSON lines with the demo's output.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print("Placing two orders (reserve_inventory -> charge_payment -> create_ticket): one "
          "completes;\nin the other, create_ticket fails on every attempt and refund_payment "
          "fails once, so the saga rolls back.", flush=True)
    tag = uuid.uuid4().hex[:6]
    ok_run = shop.place_order.apply_async(saga_id=f"order-{tag}-ok", params={})
    failing_run = shop.place_order.apply_async(
        saga_id=f"order-{tag}-fails",
        params={"fail_at": "create_ticket", "flaky": ["refund_payment"]},
    )
    states = []
    for label, run in (("an order that completes", ok_run),
                       ("an order whose create_ticket fails, so it rolls back", failing_run)):
        try:
            state = run.wait(timeout=SAGA_TIMEOUT_S)
        except TimeoutError as exc:
            return [str(exc)]
        states.append(state)
        text = report(state, run.events(), shop.ledger.entries(state.id))
        print(f"\n== {label}\n{text}", flush=True)
    approved = run_approved_order(shop, tag)
    print()
    if isinstance(approved, str):
        return [approved]
    ok, failed = states
    return problems(ok, failed, approved)


def run_approved_order(shop: Any, tag: str) -> SagaState | str:
    """A saga that waits for an approval event, which the demo then sends; its final state,
    or what went wrong."""
    from saga_celery.demo.shop import APPROVAL

    print("\nPlacing an order that waits for a manager's approval (wait_for_event) before "
          "anything runs.", flush=True)
    run = shop.approved_order.apply_async(saga_id=f"order-{tag}-approved", params={})
    deadline = time.monotonic() + SAGA_TIMEOUT_S
    while run.status().step("manager-approval").status != "running":
        if time.monotonic() > deadline:
            return f"saga {run.id} never began waiting for its approval"
        time.sleep(0.05)
    print(f"  {run.id} is waiting for {APPROVAL!r}; the demo sends it now: "
          f"run.send_event({APPROVAL!r}, {{'by': 'demo-manager'}})", flush=True)
    run.send_event(APPROVAL, {"by": "demo-manager"}, event_id=f"approval-{tag}")
    try:
        state: SagaState = run.wait(timeout=SAGA_TIMEOUT_S)
    except TimeoutError as exc:
        return str(exc)
    text = report(state, run.events(), shop.ledger.entries(state.id))
    print(f"\n== an order approved by an event\n{text}", flush=True)
    return state


def demo(redis_url: str, *, embedded: bool) -> int:
    """Start a worker on ``redis_url``, run the orders, stop the worker; the exit status."""
    env = worker_env(redis_url, embedded=embedded)
    os.environ.update(env)  # this process imports the demo's app with the same settings
    worker = Worker(env)
    print(f"Started worker {worker.node} (celery -A {APP_MODULE} worker, prefork, "
          "2 processes)", flush=True)
    failed: list[str] = []
    try:
        problem = worker.wait_ready(READY_TIMEOUT_S)
        failed = [problem] if problem else run_orders()
    except Exception:
        failed = [traceback.format_exc()]
    finally:
        worker.stop()
    if failed:
        tail = worker.log().splitlines()[-LOG_TAIL_LINES:]
        print("\n".join(["", f"--- worker log ({worker.log_path}), last lines:", *tail,
                         "--- end of worker log"]), file=sys.stderr)
        print("\nDEMO FAILED:\n" + "\n".join(f"  - {p}" for p in failed), file=sys.stderr)
        return 1
    worker.log_path.unlink(missing_ok=True)
    return 0


class CannotStart(RuntimeError):
    """The demo has no Redis to run on (the message says why and what to do)."""


def _on_redis(url: str) -> int:
    print(f"Using Redis at {url} (SAGA_REDIS_URL)", flush=True)
    problem = unreachable(url)
    if problem is not None:
        raise CannotStart(problem)
    return demo(url, embedded=False)


def _on_embedded() -> int:
    try:
        from saga_celery.demo.embedded import start_embedded_redis

        server = start_embedded_redis()
    except MissingExtraError as exc:
        raise CannotStart(f"{exc} (or set SAGA_REDIS_URL to a Redis of your own)") from exc
    with server:
        print(f"SAGA_REDIS_URL is not set: using an embedded Redis server at {server.url}",
              flush=True)
        return demo(server.url, embedded=True)


def main() -> int:
    """Run the demo on ``$SAGA_REDIS_URL``, or on an embedded server; the exit status."""
    started = time.monotonic()
    url = os.environ.get("SAGA_REDIS_URL") or None
    try:
        status = _on_embedded() if url is None else _on_redis(url)
    except CannotStart as exc:
        # flushed: under `saga-celery demo` the line must be out before click exits (click
        # 8.1's test runner reads only what reached its buffer)
        print(f"DEMO FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    verdict = "passed" if status == 0 else "FAILED"
    print(f"demo {verdict} in {time.monotonic() - started:.1f} s")
    return status
