"""``workers``: the deployable app's settings; and ``saga-celery demo`` end to end, run from
outside the repository (the demo ships in the library: ``saga_celery.demo``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import REPO_ROOT

DEMO_TIMEOUT_S = 120

_SETTINGS_PROBE = """
import json
from workers.app import WorkerSettings, app, sagas, settings

route = app.amqp.router.route
conf = app.conf
print(json.dumps({
    "main": app.main,
    "redis_url": settings.redis_url,
    "broker_url": conf.broker_url,
    "imports": list(settings.imports),
    "queues": sorted(q.name for q in conf.task_queues),
    "step_queue": route({}, "shop.reserve_inventory", (), {})["queue"].name,
    "rollback_queue": route({}, "shop.refund_payment", (), {})["queue"].name,
    "visibility_timeout": conf.broker_transport_options["visibility_timeout"],
    "prefetch": conf.worker_prefetch_multiplier,
    "serializers": [conf.task_serializer, conf.result_serializer, conf.accept_content],
    "events": [conf.worker_send_task_events, conf.task_send_sent_event],
    "retry_on_startup": conf.broker_connection_retry_on_startup,
    "default_broker": WorkerSettings.from_env({"SAGA_REDIS_URL": "redis://h:1/2"}).broker_url,
}))
"""


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                      env.get("PYTHONPATH", "")]))
    return {**env, **overrides}


def _demo_env(**overrides: str) -> dict[str, str]:
    """The environment without SAGA_* settings, and without the repository on the path."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}, **overrides}


def _run_demo(command: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=DEMO_TIMEOUT_S, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return done.stdout


def _row(step: str, start: int, forward: str, attempts: str, rollback: str,
         rollback_attempts: str) -> re.Pattern[str]:
    cells = [step, str(start), forward, attempts, rollback, rollback_attempts]
    return re.compile(r"^\s+" + r"\s+".join(re.escape(c) for c in cells) + r"$", re.MULTILINE)


def _assert_both_sagas_shown(output: str) -> None:
    assert re.search(r"saga order-\w+-ok \(place-order\): status=complete  output=\{.*\}  "
                     r"rollback=none", output)
    assert re.search(r"saga order-\w+-fails \(place-order\): status=errored  "
                     r"error=DemoFailure in shop\.create_ticket: .*  "
                     r"rollback=complete \(3/3 steps compensated\)", output)
    rows = [
        _row("shop.reserve_inventory", 1, "complete", "1 (ok)", "-", "-"),
        _row("shop.create_ticket", 3, "complete", "1 (ok)", "-", "-"),
        _row("shop.reserve_inventory", 1, "complete", "1 (ok)", "complete", "1 (ok)"),
        _row("shop.charge_payment", 2, "complete", "1 (ok)", "complete", "2 (failed, ok)"),
        _row("shop.create_ticket", 3, "errored", "2 (failed, failed)", "complete", "1 (ok)"),
    ]
    for row in rows:
        assert row.search(output), row.pattern
    assert ("rolled back in reverse start order: shop.create_ticket -> shop.charge_payment "
            "-> shop.reserve_inventory") in output
    failing = output[output.index("-fails (place-order)"):output.index("waits for a manager")]
    actions = re.findall(r"^ {4}(reserved|charged|ticket_opened|refunded|released)\b",
                         failing, re.MULTILINE)
    assert actions == ["reserved", "charged", "refunded", "released"]
    assert re.search(r"order-\w+-approved is waiting for 'approval'; the demo sends it now",
                     output)
    assert re.search(r"saga order-\w+-approved \(approved-order\): status=complete", output)
    assert "demo passed" in output


def test_worker_app_reads_its_settings_from_the_environment() -> None:
    """Importing workers.app configures URLs, queues, imports and Celery settings from SAGA_*."""
    env = _env(SAGA_REDIS_URL="redis://state.example:6379/3",
               SAGA_BROKER_URL="redis://broker.example:6379/4",
               SAGA_STEPS_QUEUE="orders.steps", SAGA_ROLLBACKS_QUEUE="orders.rollbacks",
               SAGA_IMPORTS=" workers.shop ,", SAGA_VISIBILITY_TIMEOUT="90")
    done = subprocess.run([sys.executable, "-c", _SETTINGS_PROBE], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr

    assert json.loads(done.stdout.splitlines()[-1]) == {
        "main": "saga_workers",
        "redis_url": "redis://state.example:6379/3",
        "broker_url": "redis://broker.example:6379/4",
        "imports": ["workers.shop"],
        "queues": ["celery", "orders.rollbacks", "orders.steps"],
        "step_queue": "orders.steps",
        "rollback_queue": "orders.rollbacks",
        "visibility_timeout": 90,
        "prefetch": 1,
        "serializers": ["json", "json", ["json"]],
        "events": [True, True],
        "retry_on_startup": True,
        "default_broker": "redis://h:1/2",
    }


@pytest.mark.integration
def test_demo_passes_on_the_embedded_server(tmp_path: Path) -> None:
    """Without SAGA_REDIS_URL, ``saga-celery demo`` run outside the repository serves its own
    Redis, and shows both sagas and rollbacks."""
    script = Path(sys.executable).parent / "saga-celery"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "saga_celery.cli"]

    _assert_both_sagas_shown(_run_demo([*command, "demo"], _demo_env(), tmp_path))


@pytest.mark.integration
def test_demo_passes_on_a_real_redis(redis_url: str) -> None:
    """With SAGA_REDIS_URL, ``python -m saga_celery.demo`` (``make demo``) runs on that Redis,
    and shows both sagas and rollbacks."""
    # Queues of its own: other tests' leftover messages in saga.steps must not reach it.
    env = _demo_env(SAGA_REDIS_URL=redis_url, SAGA_STEPS_QUEUE="demo-test.steps",
                    SAGA_ROLLBACKS_QUEUE="demo-test.rollbacks")
    output = _run_demo([sys.executable, "-m", "saga_celery.demo"], env, REPO_ROOT)

    assert f"Using Redis at {redis_url}" in output
    _assert_both_sagas_shown(output)
