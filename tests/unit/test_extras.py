"""Optional dependencies are extras: the library runs without them, and names the one missing.

``saga-celery[metrics]`` brings prometheus-client, ``saga-celery[demo]`` fakeredis with Lua.
A missing one is simulated by ``None`` in ``sys.modules``, which makes its import fail.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from saga_celery._extras import MissingExtraError
from saga_celery.cli import main
from tests.unit.clirunner import cli_runner

pytestmark = pytest.mark.usefixtures("keep_structlog_config")

OPTIONAL = ("fakeredis", "lupa", "prometheus_client")

_PROBE = f"""
import json, sys
import saga_celery, saga_celery.cli, saga_celery.demo.app, saga_celery.demo.runner
print(json.dumps(sorted(m for m in {OPTIONAL!r} if m in sys.modules)))
"""


def _without(monkeypatch: pytest.MonkeyPatch, package: str, *importers: str) -> None:
    """Make ``package`` unimportable, and forget the modules that imported it."""
    monkeypatch.setitem(sys.modules, package, None)
    for module in importers:
        monkeypatch.delitem(sys.modules, module, raising=False)


def test_importing_the_library_and_its_command_imports_no_extra() -> None:
    """``import saga_celery``, ``saga_celery.cli`` and the demo's app and runner load neither
    fakeredis nor prometheus-client (a fresh interpreter, so nothing else loaded them)."""
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          timeout=60, check=False)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_saga_celery_metrics_without_prometheus_client_names_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``import saga_celery.metrics`` without prometheus-client raises ``MissingExtraError``
    (an ``ImportError``) that says to install ``saga-celery[metrics]``."""
    _without(monkeypatch, "prometheus_client", "saga_celery.metrics")

    with pytest.raises(MissingExtraError) as raised:
        import saga_celery.metrics  # noqa: F401

    assert isinstance(raised.value, ImportError)
    assert raised.value.extra == "metrics"
    assert str(raised.value) == ("saga_celery.metrics needs prometheus-client, which is not "
                                 "installed: pip install 'saga-celery[metrics]'")


def test_metrics_command_without_the_extra_is_one_line_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``saga-celery metrics`` without prometheus-client: exit status 1 and one line saying
    ``pip install 'saga-celery[metrics]'``, no traceback (before any Redis is reached)."""
    _without(monkeypatch, "prometheus_client", "saga_celery.metrics")

    result = cli_runner().invoke(main, ["--redis-url", "redis://127.0.0.1:1/0", "metrics"])

    assert result.exit_code == 1
    assert result.stderr == ("Error: saga_celery.metrics needs prometheus-client, which is not "
                             "installed: pip install 'saga-celery[metrics]'\n")


def test_demo_without_the_extra_and_without_redis_says_what_to_do(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``saga-celery demo`` with no SAGA_REDIS_URL and no fakeredis: exit status 1 and one line
    naming ``saga-celery[demo]`` and SAGA_REDIS_URL as the two ways out, no traceback."""
    _without(monkeypatch, "fakeredis", "saga_celery.demo.embedded")
    monkeypatch.delenv("SAGA_REDIS_URL", raising=False)

    result = cli_runner().invoke(main, ["demo"])

    assert result.exit_code == 1
    assert result.stderr == (
        "DEMO FAILED: the embedded Redis server needs fakeredis, which is not installed: "
        "pip install 'saga-celery[demo]' (or set SAGA_REDIS_URL to a Redis of your own)\n")
    assert result.stdout == ""
