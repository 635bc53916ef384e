"""Security checks on the Celery app: JSON only, signed messages allowed, TLS that checks.

Every test builds its own Celery app (nothing connects: the checks read settings only) and a
``SagaApp`` on the in-memory store.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from saga_celery import SagaApp, SagaConfigError, SagaError
from saga_celery._celery.security import SAFE_CONTENT, check_app
from saga_celery._store.memory import MemoryStore

SECRET = "s3cr3t-pw"


def undo(ctx: Any) -> None:
    return None


@pytest.fixture
def app() -> Iterator[Celery]:
    celery = Celery("t", broker="memory://", set_as_current=False)
    yield celery
    celery.close()


def build(app: Celery, **settings: Any) -> SagaApp:
    app.conf.update(settings)
    return SagaApp(app, store=MemoryStore())


# --- JSON only --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("accept_content", ["json", "pickle"]),
        ("accept_content", ["application/x-python-serialize"]),
        ("accept_content", ["json", "yaml"]),
        ("task_serializer", "pickle"),
        ("result_accept_content", ["pickle"]),
        ("result_serializer", "pickle"),
        ("event_serializer", "msgpack"),
    ],
)
def test_an_app_that_accepts_or_sends_anything_but_json_is_refused(
    app: Celery, setting: str, value: Any
) -> None:
    """A serializer setting other than json or auth is refused, naming it and saying why."""
    routes = app.conf.task_routes
    with pytest.raises(SagaConfigError, match=setting) as raised:
        build(app, **{setting: value})
    message = str(raised.value)
    assert repr(value) in message
    assert "runs any code" in message and "accept_content=['json']" in message
    assert isinstance(raised.value, SagaError) and isinstance(raised.value, ValueError)
    assert app.conf.task_routes == routes, "a refused app was configured anyway"


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"accept_content": ["application/json"], "result_accept_content": ["json"]},
        {"task_serializer": "auth", "event_serializer": "auth", "accept_content": ["auth"]},
        {"accept_content": ["auth", "json"], "task_serializer": "auth"},
    ],
)
def test_json_and_signed_json_are_accepted(app: Celery, settings: dict[str, Any]) -> None:
    """Celery's defaults (JSON) and the message-signing ``auth`` serializer are allowed."""
    sagas = build(app, **settings)
    assert sagas.app is app


def test_the_allowed_content_is_json_and_auth_only() -> None:
    """Only JSON and Celery's signed JSON, by name or content type, are safe content."""
    assert {"json", "application/json", "auth", "application/data"} == SAFE_CONTENT


def test_step_and_rollback_messages_are_json_by_default(app: Celery) -> None:
    """Saga steps and rollbacks send JSON, whatever Celery's own default would be."""
    sagas = build(app)

    @sagas.step(name="sec.step", retries={"limit": 0})
    def step() -> None:
        return None

    handler = step.rollback(undo)
    for task in (step, handler):
        assert task.serializer == "json"
        assert task._get_exec_options()["serializer"] == "json"


def test_step_and_rollback_messages_are_signed_when_the_app_signs(app: Celery) -> None:
    """With ``task_serializer='auth'`` steps, rollbacks and their retries use it too, so a
    worker that accepts only signed messages runs them."""
    sagas = build(app, task_serializer="auth", event_serializer="auth", accept_content=["auth"])

    @sagas.step(name="sec.signed", retries={"limit": 1, "delay": 10})
    def step() -> None:
        return None

    handler = step.rollback(undo)
    for task in (step, handler):
        assert task.serializer == "auth"
        assert task._get_exec_options()["serializer"] == "auth"


# --- TLS that checks the server ---------------------------------------------------------------


@pytest.mark.parametrize("reqs", ["none", "CERT_NONE", "None"])
@pytest.mark.parametrize("setting", ["broker_url", "result_backend", "redis_url"])
def test_a_rediss_url_that_skips_the_certificate_check_is_refused(
    app: Celery, setting: str, reqs: str
) -> None:
    """``rediss://...?ssl_cert_reqs=none`` (broker, result backend or saga state) is refused,
    naming the setting, without printing the password."""
    url = f"rediss://:{SECRET}@redis.example:6380/0?ssl_cert_reqs={reqs}"
    with pytest.raises(SagaConfigError, match=setting) as raised:
        if setting == "redis_url":
            SagaApp(app, redis_url=url, store=MemoryStore())
        else:
            build(app, **{setting: url})
    message = str(raised.value)
    assert "certificate" in message and "ssl_cert_reqs=required" in message
    assert SECRET not in message


@pytest.mark.parametrize("setting", ["broker_use_ssl", "redis_backend_use_ssl"])
@pytest.mark.parametrize("reqs", [ssl.CERT_NONE, "none", "CERT_NONE"])
def test_ssl_options_that_skip_the_certificate_check_are_refused(
    app: Celery, setting: str, reqs: object
) -> None:
    """``broker_use_ssl`` / ``redis_backend_use_ssl`` with ``ssl_cert_reqs`` none is refused."""
    with pytest.raises(SagaConfigError, match=setting) as raised:
        build(app, broker_url="rediss://redis.example:6380/0",
              **{setting: {"ssl_cert_reqs": reqs, "ssl_ca_certs": "/etc/ca.pem"}})
    assert "CERT_REQUIRED" in str(raised.value)


@pytest.mark.parametrize(
    "settings",
    [
        {"broker_url": "rediss://redis.example:6380/0"},
        {"broker_url": "rediss://redis.example:6380/0?ssl_cert_reqs=required"},
        {"broker_url": "rediss://redis.example:6380/0?ssl_cert_reqs=CERT_REQUIRED"},
        {"broker_url": "rediss://redis.example:6380/0",
         "broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem"}},
        {"broker_url": "rediss://redis.example:6380/0", "broker_use_ssl": {}},
        {"broker_url": "redis://redis.example:6379/0?ssl_cert_reqs=none"},
        {"result_backend": "rediss://redis.example:6380/1?ssl_cert_reqs=CERT_OPTIONAL"},
    ],
)
def test_tls_that_checks_the_server_or_no_tls_is_accepted(
    app: Celery, settings: dict[str, Any]
) -> None:
    """TLS with a certificate requirement (the default) and plain redis:// are accepted."""
    assert build(app, **settings).app is app


def test_every_url_of_a_failover_broker_list_is_checked() -> None:
    """A ``;``-separated broker list is refused if any one URL skips the check."""
    conf = {"broker_url": "rediss://a:6380/0;rediss://b:6380/0?ssl_cert_reqs=none"}
    with pytest.raises(SagaConfigError, match="rediss://b:6380"):
        check_app(conf)
