"""The fences around kombu's and Celery's internals (``saga_celery._internals``, SPEC 9).

Each fast path is probed once per process: on the installed kombu and Celery it is on; when
an internal it needs is gone or changed it is off, with exactly one warning line, and the
library takes the public path.  ``SAGA_CELERY_FAST_PATHS=off`` turns every one off silently.
How the public paths behave against a real broker: ``tests/integration/test_dispatch.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import celery
import pytest
from celery import Celery, Task
from celery.local import PromiseProxy, Proxy
from kombu.message import Message
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual
from structlog.testing import capture_logs

import saga_celery._internals
from saga_celery import SagaApp
from saga_celery._celery.acks import acks_in_task
from saga_celery._celery.dispatch import Dispatcher
from saga_celery._internals import FAST_PATHS_ENV
from saga_celery._internals import celery as celery_internals
from saga_celery._internals import kombu as kombu_internals

PROBES: dict[str, Callable[[], Any]] = {
    kombu_internals.OWN_ACK: kombu_internals.own_ack,
    celery_internals.TASK_SETTINGS: celery_internals.task_settings,
}


def _forget_probes() -> None:
    for probe in PROBES.values():
        probe.cache_clear()  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test probes anew, in a process that has warned of nothing yet."""
    monkeypatch.delenv(FAST_PATHS_ENV, raising=False)
    monkeypatch.setattr(saga_celery._internals, "_warned", set())
    _forget_probes()
    yield
    _forget_probes()


def _warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "saga.fast_path_off"]


def test_every_probe_passes_on_the_installed_kombu_and_celery() -> None:
    """The installed kombu and Celery are what the fast paths were written against."""
    with capture_logs() as logs:
        assert kombu_internals.own_ack()
        assert celery_internals.task_settings() is Task.from_config
    assert not _warnings(logs)


def test_the_public_table_of_task_settings_is_celerys_own() -> None:
    """The fallback names what the installed Celery fills in: both paths drop the same
    options of a wrapped task.  It is Celery 5.7's list; Celery 5.6 fills in fewer (the
    others, left unset, read as None and drop nothing)."""
    table = set(celery_internals.CELERY_5_TASK_SETTINGS)
    assert set(Task.from_config) <= table
    if celery.VERSION >= (5, 7):
        assert set(Task.from_config) == table


BROKEN: list[tuple[str, object, str]] = [
    (kombu_internals.OWN_ACK, kombu_redis.QoS, "_remove_from_indices"),
    (kombu_internals.OWN_ACK, kombu_redis.QoS, "ack"),
    (kombu_internals.OWN_ACK, virtual.QoS, "ack"),
    (kombu_internals.OWN_ACK, Message, "acknowledged"),
    (celery_internals.TASK_SETTINGS, Task, "from_config"),
]


def _replacement(owner: object, name: str) -> object:
    """Something of another shape where ``owner.name`` was: a kombu or Celery release since."""
    if name == "from_config":
        return ("serializer", "task_serializer")  # flat, not pairs
    if isinstance(getattr(owner, name), type):
        return type(name, (), {})
    if isinstance(getattr(owner, name), property):
        return property(lambda self: False)
    return lambda *args, **kwargs: None


@pytest.mark.parametrize(("fast_path", "owner", "name"), BROKEN,
                         ids=[f"{p}-{n}" for p, _, n in BROKEN])
@pytest.mark.parametrize("how", ["removed", "changed"])
def test_a_changed_internal_turns_its_fast_path_off_with_one_warning(
        monkeypatch: pytest.MonkeyPatch, fast_path: str, owner: object, name: str,
        how: str) -> None:
    """An internal gone or of another shape: the probe says off, once, in one warning line
    naming the fast path, however often it is asked (and after its cache is cleared)."""
    if how == "removed":
        monkeypatch.delattr(owner, name)
    else:
        monkeypatch.setattr(owner, name, _replacement(owner, name))
    probe = PROBES[fast_path]
    with capture_logs() as logs:
        results = [probe(), probe()]
        probe.cache_clear()  # type: ignore[attr-defined]
        results.append(probe())
    if fast_path == celery_internals.TASK_SETTINGS:
        assert results == [celery_internals.CELERY_5_TASK_SETTINGS] * 3
    else:
        assert results == [False] * 3
    warned = _warnings(logs)
    assert len(warned) == 1
    assert warned[0]["fast_path"] == fast_path and warned[0]["log_level"] == "warning"
    assert warned[0]["reason"]


def test_the_environment_turns_every_fast_path_off_without_a_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``SAGA_CELERY_FAST_PATHS=off``: the public path everywhere, and nothing to warn of."""
    monkeypatch.setenv(FAST_PATHS_ENV, "off")
    with capture_logs() as logs:
        assert not kombu_internals.own_ack()
        assert celery_internals.task_settings() == celery_internals.CELERY_5_TASK_SETTINGS
    assert not logs


def test_with_the_own_ack_off_the_main_process_acks_as_celery_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks do not acknowledge their own messages, whatever the broker, when the probe says
    off: the pool process and the main process both read it from the same probe."""
    app = Celery("fence-ack", broker="redis://127.0.0.1:1/0", set_as_current=False)
    assert acks_in_task(app)
    monkeypatch.setattr(kombu_internals, "own_ack", lambda: False)
    assert not acks_in_task(app)


def test_the_app_probes_when_it_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe runs when the dispatcher is built, in a worker's main process before it
    forks its pool: the pool processes inherit the answer and log nothing more."""
    monkeypatch.delattr(kombu_redis.QoS, "_remove_from_indices")
    app = Celery("fence-start", broker="redis://127.0.0.1:1/0", set_as_current=False)
    with capture_logs() as logs:
        dispatcher = Dispatcher(app, clock=lambda: datetime.now(UTC))
        built = len(_warnings(logs))
        assert not dispatcher.acks_in_task()
    assert built == 1
    assert len(_warnings(logs)) == 1


# --- Celery's public ways in (no fence needed) ----------------------------------------------


def _noop() -> None:
    return None


def test_a_task_behind_a_plain_proxy_is_wrapped_as_itself(app: Celery, sagas: SagaApp) -> None:
    """A task seen through ``celery.local.Proxy`` (as ``@shared_task`` returns it) keeps its
    name and options when ``@sagas.step`` wraps it."""
    task = app.task(name="plain.proxied", rate_limit="3/s", lazy=False)(_noop)
    step = sagas.step(Proxy(lambda: task))
    assert step.name == "plain.proxied"
    assert step.rate_limit == "3/s"


def test_a_lazy_task_is_evaluated_and_wrapped(app: Celery, sagas: SagaApp) -> None:
    """A lazy ``@app.task`` (Celery's ``PromiseProxy``) is evaluated, then wrapped."""
    lazy = app.task(name="plain.lazy", rate_limit="4/s")(_noop)
    assert isinstance(lazy, PromiseProxy)
    step = sagas.step(lazy)
    assert step.name == "plain.lazy"
    assert step.rate_limit == "4/s"

