"""Security on real workers and a private Redis: signed messages, the smallest ACL, no payloads
in task events.

Each test runs ``tests/integration/secure_app.py`` in a real ``celery worker`` against a
``redis-server`` this module starts on a free port in 6600-6699 (ACL users are server-wide,
so they are never created on a shared Redis).  That server loads ``deploy/redis/acl.conf``
with ``include``: the shipped rule is the one under test.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from celery import Celery
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from kombu.serialization import registry

from saga_celery._celery.dispatch import build_message
from tests.integration import secure_app
from tests.integration.harness import (
    REPO_ROOT,
    WorkerFactory,
    WorkerProcess,
    wait_until,
    worker_env,
)

pytestmark = pytest.mark.integration

ACL_CONF = REPO_ROOT / "deploy" / "redis" / "acl.conf"
SECURE = secure_app.__name__
SECRET = "4242-4242-SECRET"
"""A payload value that must never show up in task events."""


# --- a private redis-server ------------------------------------------------------------------


class PrivateRedis:
    """A ``redis-server`` of this module's own, with the shipped ACL rule included."""

    def __init__(self, workdir: Path) -> None:
        self.password = uuid.uuid4().hex
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        for port in random.sample(range(6600, 6700), 100):
            if self._start(workdir, port):
                break
        else:
            raise RuntimeError("no free port for a private redis-server in 6600-6699")
        self.admin = redis.Redis(port=self.port, decode_responses=True)
        self.admin.execute_command("ACL", "SETUSER", "saga", f">{self.password}")

    def _start(self, workdir: Path, port: int) -> bool:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return False
        conf = workdir / f"redis-{port}.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\n"
                        f"dir {workdir}\ninclude {ACL_CONF}\n")
        with (workdir / f"redis-{port}.log").open("wb") as log:
            process = subprocess.Popen(["redis-server", str(conf)], stdout=log,
                                       stderr=subprocess.STDOUT)
        client = redis.Redis(port=port, socket_connect_timeout=0.2)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return process.poll() is not None

        wait_until(up, timeout=10)
        client.close()
        if process.poll() is not None:
            return False
        self.process, self.port = process, port
        return True

    def url(self, *, user: bool = False) -> str:
        auth = f"saga:{self.password}@" if user else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.admin.close()
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def fresh_redis(private_redis: PrivateRedis) -> PrivateRedis:
    """The private server, emptied, with an empty ACL log."""
    private_redis.admin.flushall()
    private_redis.admin.execute_command("ACL", "LOG", "RESET")
    return private_redis


@pytest.fixture
def client_app() -> Iterator[Callable[[dict[str, str]], ModuleType]]:
    """``secure_app`` copies for this process (the client side), closed afterwards."""
    made: list[ModuleType] = []

    def make(env: dict[str, str]) -> ModuleType:
        module = secure_app.configured(env)
        made.append(module)
        return module

    yield make
    for module in made:
        module.app.close()


# --- (b) signed messages ----------------------------------------------------------------------


def _key_and_cert(directory: Path, name: str) -> None:
    """A private key and a self-signed certificate for it: ``key.pem``, ``cert.pem``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True)
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def signing_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The fleet's key (its certificate is in the trusted store) and a rogue one (it is not)."""
    root = tmp_path_factory.mktemp("signing")
    fleet, rogue = root / "fleet", root / "rogue"
    _key_and_cert(fleet, "saga-fleet")
    _key_and_cert(rogue, "rogue")
    for directory, trusted in ((fleet, fleet), (rogue, rogue)):
        (directory / "certs").mkdir()
        (directory / "certs" / "cert.pem").write_bytes((trusted / "cert.pem").read_bytes())
    return fleet, rogue


@pytest.fixture
def kombu_registry() -> Iterator[None]:
    """``setup_security()`` changes kombu's process-wide serializer registry: restore it."""
    saved = {name: copy.copy(value) for name, value in vars(registry).items()}
    yield
    for name, value in saved.items():
        setattr(registry, name, value)


def _send_first_step(app: Celery, shop: ModuleType, saga_id: str) -> None:
    """Send the saga's first message through ``app`` (with ``app``'s serializer and keys)."""
    snapshot = shop.sagas._store.load(saga_id)
    (dispatch,) = snapshot.run.outbox.values()
    message = build_message(snapshot.run, dispatch, datetime.now(UTC))
    app.send_task(message.task, message.args, message.kwargs, **message.options(),
                  queue="saga.steps")


@pytest.mark.timeout(150)
def test_signed_sagas_run_and_unsigned_or_forged_messages_are_refused(
    fresh_redis: PrivateRedis, signing_dirs: tuple[Path, Path], worker_factory: WorkerFactory,
    client_app: Callable[[dict[str, str]], ModuleType], kombu_registry: None,
) -> None:
    """With message signing on, sagas complete and roll back on a worker that accepts only
    signed messages; a plain JSON message and one signed by an untrusted key never run."""
    fleet, rogue = signing_dirs
    env = {"SAGA_SECURE_URL": fresh_redis.url(), "SAGA_SECURE_SIGNING": str(fleet)}
    shop = client_app(env)
    worker = worker_factory(SECURE, env=env, concurrency=2)

    assert shop.order.apply_async(params={}).wait(timeout=30).status == "complete"
    failed = shop.order.apply_async(params={"fail": True}).wait(timeout=30)
    assert failed.status == "errored"
    assert failed.rollback is not None and failed.rollback.outcome == "complete"
    assert failed.rollback.completed_steps == 2

    # The same saga's first step, sent unsigned, then signed with a key the worker does not
    # trust: both are refused; then signed by the fleet: it runs.
    shop.sagas._engine.submit(saga_id="forged", name="secure-order", plan=shop.order.plan,
                             params={})
    with Celery("plain", broker=fresh_redis.url(), set_as_current=False) as plain:
        _send_first_step(plain, shop, "forged")
    intruder = client_app({"SAGA_SECURE_URL": fresh_redis.url(),
                           "SAGA_SECURE_SIGNING": str(rogue)})
    _send_first_step(intruder.app, shop, "forged")
    refusals = ("Refusing to deserialize untrusted content of type json",
                "Can't decode message body")
    assert wait_until(lambda: all(r in worker.log() for r in refusals), timeout=20), (
        worker.log())
    time.sleep(1)
    assert shop.sagas.run("forged").status().status == "queued", "a refused message ran"

    shop.app.setup_security()  # the fleet's key signs again in this process
    _send_first_step(shop.app, shop, "forged")
    assert shop.sagas.run("forged").wait(timeout=30).status == "complete"


# --- (d) the smallest Redis ACL ---------------------------------------------------------------


@pytest.fixture
def full_worker(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], WorkerProcess]]:
    """A worker with Celery's defaults (gossip, mingle, heartbeats) plus task events: the
    harness turns gossip and mingle off, and the ACL must cover them too."""
    workers: list[WorkerProcess] = []

    def start(env: dict[str, str]) -> WorkerProcess:
        node = f"acl-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        log_path = tmp_path / f"{node.split('@', maxsplit=1)[0]}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", SECURE, "worker", "-c", "2", "-n", node,
                 "--loglevel", "INFO", "-E"],
                cwd=REPO_ROOT, env=worker_env(env), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, process_group=0)
        worker = WorkerProcess(popen, node, log_path)
        workers.append(worker)
        ready = wait_until(lambda: f"{node} ready." in worker.log()
                           or worker.returncode is not None, timeout=60)
        assert ready and worker.returncode is None, worker.log()
        return worker

    yield start
    for worker in workers:
        worker.stop()


@contextmanager
def capturing_events(app: Celery) -> Iterator[list[dict[str, Any]]]:
    """Collect every Celery event in a thread while the block runs, as Flower does."""
    seen: list[dict[str, Any]] = []
    with app.connection() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": seen.append})
        thread = threading.Thread(target=receiver.capture,
                                  kwargs={"limit": None, "timeout": None, "wakeup": False},
                                  daemon=True)
        thread.start()
        time.sleep(0.5)  # subscribed before anything is sent
        try:
            yield seen
        finally:
            receiver.should_stop = True
            thread.join(10)


@pytest.mark.timeout(170)
def test_sagas_run_as_the_acl_user_with_nothing_denied(
    fresh_redis: PrivateRedis, full_worker: Callable[[dict[str, str]], WorkerProcess],
    client_app: Callable[[dict[str, str]], ModuleType],
) -> None:
    """As the ACL user of ``deploy/redis/acl.conf``, a worker and a client run a saga to
    completion, roll one back, survive a killed pool process, answer remote control, stream
    events and sweep for recovery, and Redis denies nothing on the way."""
    env = {"SAGA_SECURE_URL": fresh_redis.url(user=True)}
    shop = client_app(env)
    worker = full_worker(env)

    with capturing_events(shop.app) as seen:
        assert shop.order.apply_async(params={}).wait(timeout=30).status == "complete"
        failed = shop.order.apply_async(params={"fail": True}).wait(timeout=30)
        assert failed.status == "errored"
        assert failed.rollback is not None and failed.rollback.completed_steps == 2

        slow = shop.order.apply_async(params={"sleep": 3})
        assert wait_until(lambda: slow.status().step("secure.charge").status == "running",
                          timeout=20)
        for pid in worker.child_pids():  # the pool process running the step dies
            os.kill(pid, signal.SIGKILL)
        assert slow.wait(timeout=60).status == "complete"

        pong = shop.app.control.inspect(timeout=3).ping() or {}
        assert worker.hostname in pong
        assert shop.sagas.recover(grace=0) == 0
        assert shop.sagas.run(slow.id).events()
    assert any(e["type"] == "task-succeeded" for e in seen)

    denied = fresh_redis.admin.execute_command("ACL", "LOG")
    assert denied == [], f"Redis denied the saga user: {denied}"
    assert "NOPERM" not in worker.log()


def test_the_acl_user_is_confined_to_saga_and_celery_keys(fresh_redis: PrivateRedis) -> None:
    """The ACL user cannot read other keys, run admin or dangerous commands, or listen on
    other channels."""
    fresh_redis.admin.set("payroll:ceo", "secret")
    user = redis.Redis.from_url(fresh_redis.url(user=True))
    assert user.ping()
    forbidden: list[Callable[[], Any]] = [
        lambda: user.get("payroll:ceo"),
        lambda: user.set("payroll:ceo", "mine"),
        lambda: user.keys("*"),
        user.flushall,
        lambda: user.config_get("*"),
        lambda: user.execute_command("ACL", "LIST"),
        lambda: user.eval("return 1", 0),
        lambda: user.publish("payroll", "x"),
        lambda: user.execute_command("CLIENT", "LIST"),
        user.script_flush,
    ]
    for call in forbidden:
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()
    user.close()
    assert fresh_redis.admin.get("payroll:ceo") == "secret"


# --- (e) payloads stay out of task events -----------------------------------------------------


@pytest.mark.timeout(120)
def test_task_events_carry_ids_only_never_payloads_or_outputs(
    fresh_redis: PrivateRedis, worker_factory: WorkerFactory,
    client_app: Callable[[dict[str, str]], ModuleType],
) -> None:
    """Every task-sent and task-received event shows the ids-only kwargs and a placeholder for
    the args, task results are not step outputs, and no payload appears in any event."""
    env = {"SAGA_SECURE_URL": fresh_redis.url()}
    shop = client_app(env)
    worker_factory(SECURE, env=env, concurrency=2)

    with capturing_events(shop.app) as seen:
        ok = shop.order.apply_async(params={"card": SECRET})
        assert ok.wait(timeout=30).status == "complete"
        failed = shop.order.apply_async(params={"card": SECRET, "fail": True})
        assert failed.wait(timeout=30).status == "errored"
        wait_until(lambda: sum(e["type"] == "task-succeeded" for e in seen) >= 5, timeout=10)

    tasks = [e for e in seen if e["type"].startswith("task-")]
    for kind in ("task-sent", "task-received"):
        events = [e for e in tasks if e["type"] == kind]
        assert len(events) >= 6, f"too few {kind} events: {len(events)}"
        for e in events:
            kwargs = eval(e["kwargs"])  # the ids-only repr Flower shows and searches
            assert set(kwargs) == {"saga_id", "step", "count", "attempt", "kind"}, e
            assert kwargs["saga_id"] in (ok.id, failed.id)
            assert e["args"] == "(…)", e
    results = [e["result"] for e in tasks if e["type"] == "task-succeeded"]
    assert results and set(results) == {"None"}, results
    text = json.dumps(seen, default=str)
    for payload in (SECRET, "sku-1", "r-sku-1", "c-100", "amount", "__saga__"):
        assert payload not in text, f"{payload!r} leaked into task events"
