"""Bad input beyond SPEC section 7, against a real Redis: each gets a clear error, loses nothing.

- Foreign or corrupted records under the saga prefix raise ``SagaCorruptStateError`` naming
  the key, and nothing stored is overwritten.
- Oversized params are refused at ``apply_async``; an oversized output fails the saga, which
  rolls back (on a real worker).
- A Redis connection dropped after a transition's script ran but before its reply arrived:
  redis-py's retry sends the script again, the compare-and-set refuses the replay, and the
  engine converges on the state the first send wrote, which holds the transition once.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from saga_celery import SagaApp, SagaCorruptStateError, SagaDefinitionError, SagaError
from saga_celery._core.events import (
    AttemptFailed,
    AttemptStarted,
    AttemptSucceeded,
    Decision,
    TerminateRequested,
)
from saga_celery._core.model import ErrorInfo, Kind
from saga_celery._engine import Lease
from saga_celery._store import RedisStore
from tests.integration import secure_app
from tests.integration.harness import WorkerFactory
from tests.integration.proxy import TcpProxy

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def app() -> Iterator[Celery]:
    """A Celery app on the in-memory broker: messages go nowhere, no worker runs."""
    celery = Celery("t", broker="memory://", set_as_current=False)
    yield celery
    celery.close()


def shop_saga(sagas: SagaApp, name: str = "bad") -> Any:
    """Two steps, the first with a rollback handler."""

    @sagas.step(name=f"{name}.reserve", retries={"limit": 1, "delay": 100})
    def reserve() -> str:
        return "r-1"

    @reserve.rollback
    def release(ctx: Any) -> None:
        return None

    @sagas.step(name=f"{name}.charge", retries={"limit": 0})
    def charge(reservation: str) -> str:
        return "c-1"

    return sagas.saga(name, [reserve.s(), charge.s()])


def keys_under(client: redis.Redis, prefix: str) -> dict[str, tuple[str, bytes | None]]:
    """Every key under ``prefix`` with its type and serialized value (``DUMP``)."""
    return {str(k): (str(client.type(k)), client.execute_command("DUMP", k, NEVER_DECODE=True))
            for k in client.scan_iter(match=f"{prefix}*")}


def state_key(prefix: str, saga_id: str) -> str:
    return f"{prefix}{{{saga_id}}}:state"


def events_key(prefix: str, saga_id: str) -> str:
    return f"{prefix}{{{saga_id}}}:events"


# --- foreign and corrupted records ------------------------------------------------------------


def _foreign_string(client: redis.Redis, key: str) -> None:
    client.set(key, "somebody else's value")


def _garbage_json(client: redis.Redis, key: str) -> None:
    client.hset(key, mapping={"v": "3", "d": "{not json"})


def _future_version(client: redis.Redis, key: str) -> None:
    record = {"id": key.split("{")[1].split("}", maxsplit=1)[0], "name": "bad", "created_at":
              datetime(2026, 1, 1, tzinfo=UTC).isoformat(), "plan": {"stages": []},
              "steps": {}, "schema": 2, "compensation_graph": {"nodes": []}}
    client.hset(key, mapping={"v": "7", "d": json.dumps(record)})


def _other_sagas_record(client: redis.Redis, key: str) -> None:
    donor = client.hget(key.replace("victim", "donor"), "d")
    assert donor is not None
    client.hset(key, mapping={"v": "2", "d": donor})


FOREIGN = {
    "a string where the state hash belongs": (_foreign_string, "wrong Redis type"),
    "garbage JSON in the d field": (_garbage_json, "readable saga record"),
    "a record from a future version": (_future_version, "readable saga record"),
    "another saga's record": (_other_sagas_record, "holds the record of saga 'donor"),
}


@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_a_foreign_state_record_is_corrupt_names_its_key_and_is_left_alone(
    app: Celery, redis_url: str, redis_client: redis.Redis, prefix: str, case: str
) -> None:
    """Every read and write of a saga whose state key holds something saga_celery did not
    write raises SagaCorruptStateError naming the key, and overwrites nothing."""
    sagas = SagaApp(app, redis_url=redis_url, prefix=prefix)
    saga = shop_saga(sagas)
    saga.apply_async(saga_id="donor")
    write, detail = FOREIGN[case]
    key = state_key(prefix, "victim")
    write(redis_client, key)
    before = keys_under(redis_client, f"{prefix}{{")

    calls = {
        "run": lambda: sagas.run("victim"),
        "apply_async": lambda: saga.apply_async(saga_id="victim"),
        "engine": lambda: sagas._engine.handle("victim", TerminateRequested(rollback=True)),
    }
    for what, call in calls.items():
        with pytest.raises(SagaCorruptStateError, match=detail) as raised:
            call()
        assert key in str(raised.value), f"{what}: the error does not name {key}"
        assert "delete it" in str(raised.value)
        assert raised.value.saga_id == "victim"

    assert keys_under(redis_client, f"{prefix}{{") == before, "a foreign record was touched"
    assert sagas.run("donor").status().status == "queued"


def test_a_foreign_value_at_a_lease_key_is_corrupt_and_left_alone(
    app: Celery, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """A lease key holding another Redis type fails the start with SagaCorruptStateError
    naming that key; the saga's version and events are unchanged."""
    sagas = SagaApp(app, redis_url=redis_url, prefix=prefix)
    shop_saga(sagas).apply_async(saga_id="leased")
    lease_key = f"{prefix}{{leased}}:lease:step:bad.reserve#1"
    redis_client.hset(lease_key, "x", "y")
    before = keys_under(redis_client, prefix)

    with pytest.raises(SagaCorruptStateError, match=lease_key.replace("{", r"\{")):
        sagas._engine.handle("leased", AttemptStarted(kind=Kind.STEP, key="bad.reserve#1",
                                                     attempt=1),
                            lease=Lease("step:bad.reserve#1", "token", 5000))

    assert keys_under(redis_client, prefix) == before


def test_a_foreign_events_key_fails_the_write_and_names_the_key(
    app: Celery, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """An events key of another type makes a transition fail with SagaCorruptStateError
    naming it, before anything is written: the state keeps its version."""
    sagas = SagaApp(app, redis_url=redis_url, prefix=prefix)
    run = shop_saga(sagas).apply_async(saga_id="evts")
    key = events_key(prefix, "evts")
    redis_client.delete(key)
    redis_client.set(key, "not a stream")
    before = keys_under(redis_client, f"{prefix}{{")

    with pytest.raises(SagaCorruptStateError, match=key.replace("{", r"\{")):
        run.terminate(rollback=True)
    with pytest.raises(SagaCorruptStateError):
        run.events()

    assert keys_under(redis_client, f"{prefix}{{") == before
    assert run.status().status == "queued"


def test_a_terminal_write_that_fails_keeps_the_saga_in_the_active_index(
    app: Celery, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """A saga whose terminal transition failed is still unfinished: the recovery sweep must
    keep seeing it in the active index."""
    sagas = SagaApp(app, redis_url=redis_url, prefix=prefix)
    run = shop_saga(sagas).apply_async(saga_id="still-active")
    key = events_key(prefix, "still-active")
    redis_client.delete(key)
    redis_client.set(key, "not a stream")

    with pytest.raises(SagaCorruptStateError):
        run.terminate(rollback=True)  # terminal: nothing started, nothing to roll back

    assert "still-active" in sagas._store.active_ids()


def test_reading_a_foreign_events_key_names_the_key(
    app: Celery, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """``run.events()`` on an events key of another type names that key in the error."""
    sagas = SagaApp(app, redis_url=redis_url, prefix=prefix)
    run = shop_saga(sagas).apply_async(saga_id="evts-read")
    key = events_key(prefix, "evts-read")
    redis_client.delete(key)
    redis_client.set(key, "not a stream")

    with pytest.raises(SagaCorruptStateError, match=key.replace("{", r"\{")):
        run.events()


def test_a_foreign_entry_in_the_event_stream_is_corrupt_and_named(
    app: Celery, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """An entry in a saga's event stream that is not an event JSON is named in the error."""
    sagas = SagaApp(app, redis_url=redis_url, prefix=prefix)
    run = shop_saga(sagas).apply_async(saga_id="stream")
    entry = redis_client.xadd(events_key(prefix, "stream"), {"e": "<xml/>"})

    with pytest.raises(SagaCorruptStateError, match=str(entry)):
        run.events()
    assert run.status().status == "queued"


def test_a_corrupt_record_does_not_stop_the_recovery_sweep_for_other_sagas(
    app: Celery, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """The recovery sweep skips (and logs) a corrupt saga and still re-sends the overdue
    messages of every other saga."""
    sagas = SagaApp(app, redis_url=redis_url, prefix=prefix)
    saga = shop_saga(sagas)
    saga.apply_async(saga_id="healthy-1")
    redis_client.set(state_key(prefix, "broken"), "foreign")
    with pytest.raises(SagaCorruptStateError):
        saga.apply_async(saga_id="broken")  # puts it in the active index, as any commit would
    saga.apply_async(saga_id="healthy-2")

    assert sagas.recover(grace=0) == 2


# --- oversized params and outputs -------------------------------------------------------------


def test_oversized_params_are_refused_at_apply_async_and_nothing_is_stored(
    app: Celery, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """2 MiB of params raise a SagaError naming the size and the limit; no key is written."""
    sagas = SagaApp(app, redis_url=redis_url, prefix=prefix)
    saga = shop_saga(sagas)

    with pytest.raises(SagaDefinitionError, match=r"over the limit of 1048576") as raised:
        saga.apply_async(saga_id="huge", params={"blob": "x" * (2 * MIB)})

    assert isinstance(raised.value, SagaError)
    assert "'huge'" in str(raised.value) and f"{2 * MIB + 12} bytes" in str(raised.value)
    assert keys_under(redis_client, prefix) == {}


def test_params_up_to_the_limit_are_accepted(
    app: Celery, redis_url: str, prefix: str
) -> None:
    """The params limit is ``max_output_bytes`` of JSON, inclusive."""
    sagas = SagaApp(app, redis_url=redis_url, prefix=prefix, max_output_bytes=100)
    saga = shop_saga(sagas)
    fits = {"p": "x" * 91}  # {"p": "..."} is 100 bytes
    assert len(json.dumps(fits)) == 100

    assert saga.apply_async(saga_id="fits", params=fits).status().params == fits
    with pytest.raises(SagaDefinitionError, match="101 bytes"):
        saga.apply_async(saga_id="over", params={"p": "x" * 92})


@pytest.mark.timeout(120)
def test_an_oversized_output_on_a_real_worker_fails_the_saga_and_rolls_back(
    worker_factory: WorkerFactory, redis_url: str
) -> None:
    """A step returning 2 MiB fails with OutputTooLargeError naming size and limit; the step
    before it is compensated and the saga ends errored, its state intact."""
    env = {"SAGA_SECURE_URL": redis_url, "SAGA_SECURE_QUEUES": "badin"}
    shop = secure_app.configured(env)
    worker_factory(secure_app.__name__, env=env, concurrency=1)
    run = shop.order.apply_async(params={"big": 2 * MIB})
    state = run.wait(timeout=60)

    assert state.status == "errored"
    assert state.error is not None and state.error.type == "OutputTooLargeError"
    assert f"{2 * MIB + 2} bytes" in state.error.message and "1048576" in state.error.message
    assert state.rollback is not None and state.rollback.outcome == "complete"
    reserve = state.step("secure.reserve")
    assert reserve.output == {"reservation": "r-sku-1"}
    assert reserve.rollback is not None and reserve.rollback.status == "complete"
    assert state.step("secure.charge").output is None


# --- a connection dropped in the middle of a transition ---------------------------------------


class ReplyDroppingProxy(TcpProxy):
    """A TCP proxy in front of Redis that can lose one reply.

    Armed with a marker (a script's SHA), it forwards the request that carries it, waits
    until Redis answers (so the script has run) and then closes the client's connection
    instead of relaying the answer: what a network failure between the two looks like.
    """

    def __init__(self, host: str, port: int) -> None:
        self.marker: bytes | None = None
        self.dropped = 0
        super().__init__(host, port)

    def arm(self, marker: str) -> None:
        self.marker = marker.encode()

    def connected(self, client: socket.socket, server: socket.socket) -> None:
        armed = threading.Event()
        threading.Thread(target=self._requests, args=(client, server, armed),
                         daemon=True).start()
        threading.Thread(target=self._replies, args=(server, client, armed),
                         daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket,
                  armed: threading.Event) -> None:
        with suppress(OSError):
            while data := client.recv(65536):
                if self.marker is not None and self.marker in data:
                    self.marker = None
                    armed.set()
                server.sendall(data)

    def _replies(self, server: socket.socket, client: socket.socket,
                 armed: threading.Event) -> None:
        with suppress(OSError):
            while data := server.recv(65536):
                if armed.is_set():
                    self.dropped += 1
                    for sock in (client, server):
                        with suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                        sock.close()
                    return
                client.sendall(data)


@pytest.fixture
def dropping(redis_url: str, prefix: str, app: Celery) -> Iterator[tuple[SagaApp,
                                                                           ReplyDroppingProxy]]:
    """A SagaApp whose store reaches Redis through a ``ReplyDroppingProxy``, with redis-py's
    retry on (3 retries on connection errors)."""
    target = redis.Redis.from_url(redis_url)
    kwargs = target.connection_pool.connection_kwargs
    proxy = ReplyDroppingProxy(kwargs.get("host", "127.0.0.1"), kwargs.get("port", 6379))
    client = redis.Redis(host="127.0.0.1", port=proxy.port, db=kwargs.get("db", 0),
                         socket_timeout=5, retry=Retry(NoBackoff(), 3),
                         retry_on_error=[redis.ConnectionError])
    sagas = SagaApp(app, store=RedisStore(client, prefix=prefix))
    yield sagas, proxy
    client.close()
    target.close()
    proxy.close()


def _commit_sha(sagas: SagaApp) -> str:
    store = sagas._store
    assert isinstance(store, RedisStore)
    return str(store._commit.sha)


def _version(sagas: SagaApp, saga_id: str) -> int:
    snapshot = sagas._store.load(saga_id)
    assert snapshot is not None
    return snapshot.version


LEASE = Lease("step:bad.reserve#1", "worker-1", 5000)
STARTED = AttemptStarted(kind=Kind.STEP, key="bad.reserve#1", attempt=1)


def test_a_lost_reply_to_a_step_completion_is_applied_once_and_converges(
    dropping: tuple[SagaApp, ReplyDroppingProxy]
) -> None:
    """The completion's script runs, its reply is lost, redis-py sends it again: the replay
    is refused by the version check, the engine reloads, sees the completion already
    recorded (version +1, its events once) and still hands back the next step to send."""
    sagas, proxy = dropping
    run = shop_saga(sagas).apply_async(saga_id="lost-ok")
    sagas._engine.handle("lost-ok", STARTED, lease=LEASE)
    version, events = _version(sagas, "lost-ok"), len(run.events())

    proxy.arm(_commit_sha(sagas))
    t = sagas._engine.handle("lost-ok", AttemptSucceeded(kind=Kind.STEP, key="bad.reserve#1",
                                                        attempt=1, output="r-1"), lease=LEASE)

    assert proxy.dropped == 1
    assert _version(sagas, "lost-ok") == version + 1
    types = [e["type"] for e in run.events()[events:]]
    assert types == ["attempt_completed", "step_completed"]
    assert [d.id for d in t.dispatches] == ["step:bad.charge#1:1"]
    state = run.status()
    assert state.step("bad.reserve").status == "complete"
    assert len(state.step("bad.reserve").attempts) == 1


def test_a_lost_reply_to_a_failed_attempt_schedules_one_retry(
    dropping: tuple[SagaApp, ReplyDroppingProxy]
) -> None:
    """A failed attempt whose reply is lost is recorded once and its retry is due once."""
    sagas, proxy = dropping
    run = shop_saga(sagas).apply_async(saga_id="lost-fail")
    sagas._engine.handle("lost-fail", STARTED, lease=LEASE)
    version = _version(sagas, "lost-fail")

    proxy.arm(_commit_sha(sagas))
    t = sagas._engine.handle("lost-fail", AttemptFailed(
        kind=Kind.STEP, key="bad.reserve#1", attempt=1,
        error=ErrorInfo(type="Boom", message="no")), lease=LEASE)

    assert proxy.dropped == 1
    assert _version(sagas, "lost-fail") == version + 1
    assert [d.id for d in t.dispatches] == ["step:bad.reserve#1:2"]
    assert [e["type"] for e in run.events()].count("attempt_errored") == 1
    stored = sagas._store.load("lost-fail")
    assert stored is not None and list(stored.run.outbox) == ["step:bad.reserve#1:2"]


def test_a_lost_reply_to_a_step_start_is_applied_once(
    dropping: tuple[SagaApp, ReplyDroppingProxy]
) -> None:
    """A start whose reply is lost is recorded once: no phantom worker loss, and the
    delivery still runs the attempt."""
    sagas, proxy = dropping
    shop_saga(sagas).apply_async(saga_id="lost-start")
    version = _version(sagas, "lost-start")

    proxy.arm(_commit_sha(sagas))
    t = sagas._engine.handle("lost-start", STARTED, lease=LEASE)

    assert proxy.dropped == 1
    assert t.decision == Decision.RUN
    stored = sagas._store.load("lost-start")
    assert stored is not None
    assert stored.run.steps["bad.reserve#1"].attempts[0].losses == 0
    assert stored.version == version + 1


def test_a_lost_reply_to_terminate_is_applied_once_and_reported_as_done(
    dropping: tuple[SagaApp, ReplyDroppingProxy]
) -> None:
    """``terminate()`` whose reply is lost is applied once and returns the terminated saga
    instead of raising."""
    sagas, proxy = dropping
    run = shop_saga(sagas).apply_async(saga_id="lost-term")
    version = _version(sagas, "lost-term")

    proxy.arm(_commit_sha(sagas))
    state = run.terminate(rollback=True)

    assert proxy.dropped == 1
    assert state.status == "terminated"
    assert _version(sagas, "lost-term") == version + 1
    assert [e["type"] for e in run.events()].count("terminate_requested") == 1
