"""A Sentinel failover in the middle of running sagas, and what it did to them.

``measure(servers, ...)`` runs sagas of ``shop.py`` (two in three complete, one in three
fails at its last step and rolls back) on a real prefork worker whose saga state is behind
Sentinel, fails the master over once they are under way, and returns a ``Report``: which
sagas ended, and how, which acknowledged writes the new master lacks (every write the store
reported done, in the worker and in this process, is audited: ``topology_env.audit``), which
step or rollback bodies ran twice, and how long it took.  Sagas still not terminal
``SETTLE_S`` after the failover get one recovery sweep (what beat would send), and
``SWEEP_SETTLE_S`` more to end.

Two ways to fail over: ``SENTINEL FAILOVER`` (an operator's switch) promotes the replica at
once, while the old master stays a master until Sentinel reports the switch (about a
second) and demotes it (about ten); every write a client makes there in between is lost
when it resyncs as a replica.  The store's kept connections ask the sentinels once a second
(``connections.py``), which shortens that window but cannot close it.  ``kill`` (a crash)
SIGKILLs the master and starts it again two seconds later, as a supervisor would (empty:
the test servers keep no data on disk); the sentinels see it down after a second, promote
the replica, and make the restarted server its replica: writes are lost only if the
replica had not received them yet.  ``durable_replicas`` closes both: a write counts as
done only once a replica has it, so none is done while the new master has no replica.

Run it by hand for more runs than the tests do (the figures in the README)::

    SAGA_TEST_REDIS_DB=6 python -m tests.integration.failover --runs 5 [--durable 1] [--kill]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import redis

from saga_celery._store import RedisStore
from tests.integration.harness import start_worker
from tests.integration.shop_fixtures import SHOP, import_shop_copy
from tests.integration.topology_env import deployment, sentinel_state
from tests.redis_servers import SentinelServers, running, wait_until

TICKET = "shop.ticket"
TERMINAL = {"complete", "errored", "terminated"}
SETTLE_S = 30.0
"""How long after the failover the sagas get to end."""
SWEEP_SETTLE_S = 15.0
"""How long after the recovery sweep the sagas it re-sent messages for get to end."""
RESTART_AFTER_S = 2.0
"""When a killed master is started again."""


@dataclass
class Report:
    """What one failover did to the sagas running through it."""

    durable_replicas: int
    sagas: int
    how: str
    """``failover`` (SENTINEL FAILOVER) or ``kill`` (SIGKILL of the master)."""
    ended: int = 0
    stuck_before_sweep: int = 0
    """Sagas not terminal ``SETTLE_S`` after the failover."""
    swept_messages: int = 0
    """Messages the recovery sweep re-sent for them."""
    stuck: list[str] = field(default_factory=list)
    """Sagas still not terminal ``SWEEP_SETTLE_S`` after the sweep."""
    wrong_outcome: list[str] = field(default_factory=list)
    acknowledged_writes: int = 0
    lost_writes: int = 0
    """Acknowledged writes whose events the new master does not have."""
    sagas_with_lost_writes: int = 0
    steps_run_twice: int = 0
    """Step bodies that ran to the end twice: at-least-once, as after any lost reply."""
    rollbacks_run_twice: int = 0
    handed_back: int = 0
    """Messages a task handed back because the store did not answer (or did not confirm)."""
    commits_never_seen: int = 0
    in_flight_at_failover: int = 0
    promoted_after_s: float = 0.0
    old_master_out_after_s: float | None = None
    """When the old master stopped taking writes: demoted to a replica, or dead."""
    new_master_has_replica_after_s: float | None = None
    """When the old master served as the new one's replica (what ``WAIT 1`` needs)."""
    all_ended_after_s: float | None = None
    """Since the failover; after the sweep if one was needed."""

    @property
    def anomalies(self) -> int:
        """What an acknowledged write lost did: sagas stuck or ended wrong, lost writes."""
        return len(self.stuck) + len(self.wrong_outcome) + self.lost_writes


def environment(servers: SentinelServers, redis_url: str, durable: int) -> dict[str, str]:
    """The shop's settings for one run: state behind Sentinel, its own prefix and queues,
    ledger, audit and broker on the ordinary Redis."""
    tag = f"fo-{uuid.uuid4().hex[:6]}"
    return deployment(redis_url, tag, SAGA_TEST_DURABLE_REPLICAS=str(durable),
                      SAGA_TEST_AUDIT_KEY=f"audit:{tag}",
                      **sentinel_state([s.address for s in servers.sentinels],
                                       servers.master_name))


def measure(servers: SentinelServers, redis_url: str, *, durable: int, sagas: int = 24,
            kill: bool = False, log_dir: Path) -> Report:
    """Run ``sagas`` sagas through one failover (``kill``: of a crashed master); see the
    module."""
    env = environment(servers, redis_url, durable)
    shop = import_shop_copy(env, env["SAGA_TEST_AUDIT_KEY"].replace(":", "_").replace("-", "_"))
    report = Report(durable_replicas=durable, sagas=sagas, how="kill" if kill else "failover")
    with start_worker(SHOP, env=env, concurrency=4, log_dir=log_dir) as worker:
        expected = _submit(shop, sagas)
        wait_until(lambda: _steps_done(shop, expected) >= sagas, 30, "sagas under way")
        report.in_flight_at_failover = sum(
            1 for status in _statuses(servers, shop, expected).values()
            if status not in TERMINAL)
        old_master = servers.master_port()
        started = time.monotonic()
        if kill:
            killed = servers.master_server()
            killed.kill()
        else:
            servers.failover()
        wait_until(lambda: servers.master_port() != old_master, 30, "a new master")
        report.promoted_after_s = round(time.monotonic() - started, 2)
        if kill:
            time.sleep(max(0.0, started + RESTART_AFTER_S - time.monotonic()))
            killed.start()
        _settle(servers, shop, expected, old_master, started, report, SETTLE_S)
        if report.all_ended_after_s is None:
            report.stuck_before_sweep = sum(
                1 for status in _statuses(servers, shop, expected).values()
                if status not in TERMINAL)
            report.swept_messages = shop.sagas.recover(grace=0)
            _settle(servers, shop, expected, old_master, started, report,
                    time.monotonic() - started + SWEEP_SETTLE_S)
        log = worker.log()
    _evaluate(servers, shop, expected, env["SAGA_TEST_AUDIT_KEY"], report)
    report.handed_back = log.count("saga.message_handed_back")
    report.commits_never_seen = log.count("saga.commit_never_seen")
    return report


def _submit(shop: ModuleType, count: int) -> dict[str, str]:
    """Start ``count`` sagas; return the status each should end with."""
    expected = {}
    for i in range(count):
        saga_id = f"fo-{uuid.uuid4().hex[:10]}"
        fails = i % 3 == 2
        params = {"fail": {TICKET: "nonretryable", "shop.charge": "sleep:0.3"}} if fails \
            else {"fail": {"shop.charge": "sleep:0.3"}}
        shop.order.apply_async(saga_id=saga_id, params=params)
        expected[saga_id] = "errored" if fails else "complete"
    return expected


def _ledger(shop: ModuleType, saga_id: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in shop.ledger.lrange(shop.ledger_key(saga_id), 0, -1)]


def _steps_done(shop: ModuleType, expected: dict[str, str]) -> int:
    return sum(1 for saga_id in expected for e in _ledger(shop, saga_id)
               if e["kind"] == "step_done")


def _settle(servers: SentinelServers, shop: ModuleType, expected: dict[str, str],
            old_master: int, started: float, report: Report, within_s: float) -> None:
    """Wait until the old master no longer takes writes and every saga is terminal on the
    new master, or ``within_s`` after the failover."""
    deadline = started + within_s
    while time.monotonic() < deadline:
        role = servers.role(old_master)
        if report.old_master_out_after_s is None and role != "master":
            report.old_master_out_after_s = round(time.monotonic() - started, 2)
        if report.new_master_has_replica_after_s is None and role == "slave":
            report.new_master_has_replica_after_s = round(time.monotonic() - started, 2)
        if report.old_master_out_after_s is not None and all(
                status in TERMINAL for status in _statuses(servers, shop, expected).values()):
            report.all_ended_after_s = round(time.monotonic() - started, 2)
            return
        time.sleep(0.25)


def _statuses(servers: SentinelServers, shop: ModuleType, expected: dict[str, str]
              ) -> dict[str, str]:
    """Each saga's status as the current master holds it ("missing" if it has none)."""
    with redis.Redis(port=servers.master_port(), socket_timeout=5) as client:
        store = RedisStore(client, prefix=shop.PREFIX)
        found = {}
        for saga_id in expected:
            snapshot = store.load(saga_id)
            found[saga_id] = "missing" if snapshot is None else snapshot.run.status.value
        return found


def _evaluate(servers: SentinelServers, shop: ModuleType, expected: dict[str, str],
              audit_key: str, report: Report) -> None:
    statuses = _statuses(servers, shop, expected)
    report.ended = sum(1 for status in statuses.values() if status in TERMINAL)
    report.stuck = sorted(i for i, status in statuses.items() if status not in TERMINAL)
    report.wrong_outcome = sorted(i for i, status in statuses.items()
                                  if status in TERMINAL and status != expected[i])
    with redis.Redis(port=servers.master_port(), socket_timeout=5) as client:
        store = RedisStore(client, prefix=shop.PREFIX)
        stored = {saga_id: {event["event_id"] for _, event in store.read_events(saga_id)}
                  for saga_id in expected}
    audited = [json.loads(a) for a in shop.ledger.lrange(audit_key, 0, -1)]
    report.acknowledged_writes = len(audited)
    lost = [(saga_id, ids) for saga_id, _, ids in audited
            if saga_id in stored and not set(ids) <= stored[saga_id]]
    report.lost_writes = len(lost)
    report.sagas_with_lost_writes = len({saga_id for saga_id, _ in lost})
    for saga_id in expected:
        entries = _ledger(shop, saga_id)
        report.steps_run_twice += _twice(entries, "step_done")
        report.rollbacks_run_twice += _twice(entries, "rollback_done")


def _twice(entries: list[dict[str, Any]], kind: str) -> int:
    """How many steps of one saga have more than one ``kind`` entry in its ledger."""
    done = Counter(e["step"] for e in entries if e["kind"] == kind)
    return sum(1 for count in done.values() if count > 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--durable", type=int, default=0, help="durable_replicas")
    parser.add_argument("--sagas", type=int, default=24)
    parser.add_argument("--kill", action="store_true", help="SIGKILL the master instead")
    options = parser.parse_args()
    db = int(os.environ.get("SAGA_TEST_REDIS_DB", "9"))
    redis_url = f"redis://127.0.0.1:6379/{db}"
    reports = []
    for run in range(options.runs):
        with tempfile.TemporaryDirectory(prefix="failover-") as tmp, \
                running(lambda tmp=tmp: SentinelServers(Path(tmp))) as servers:
            report = measure(servers, redis_url, durable=options.durable,
                             sagas=options.sagas, kill=options.kill, log_dir=Path(tmp))
        reports.append(report)
        print(json.dumps({"run": run + 1, **asdict(report)}), flush=True)
    summary = {"runs": len(reports), "durable_replicas": options.durable,
               "how": "kill" if options.kill else "failover",
               "runs_with_anomalies": sum(1 for r in reports if r.anomalies),
               **{name: sum(getattr(r, name) for r in reports)
                  for name in ("sagas", "acknowledged_writes", "lost_writes",
                               "sagas_with_lost_writes", "steps_run_twice",
                               "rollbacks_run_twice", "handed_back")},
               "stuck_before_sweep": sum(r.stuck_before_sweep for r in reports),
               "stuck": sum(len(r.stuck) for r in reports),
               "wrong_outcome": sum(len(r.wrong_outcome) for r in reports)}
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
