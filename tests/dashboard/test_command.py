"""``saga-celery dashboard`` as a command: an optional extra, clear errors, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog

from saga_celery.cli import main
from tests.unit.clirunner import cli_runner

NOWHERE = "redis://127.0.0.1:1/0"


@pytest.fixture(autouse=True)
def keep_structlog_config() -> Iterator[None]:
    """The CLI points structlog at stderr: give later tests the configuration back."""
    before = structlog.get_config()
    yield
    structlog.configure(**before)


def test_the_library_and_its_command_load_no_tornado() -> None:
    """``import saga_celery`` and ``saga_celery.cli`` (the dashboard command registered)
    import no Tornado: only running the dashboard needs the extra."""
    probe = ("import json, sys, saga_celery, saga_celery.cli; "
             "print(json.dumps('tornado' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) is False


def test_without_tornado_the_command_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Tornado: exit 1 and one line saying ``pip install 'saga-celery[dashboard]'``."""
    monkeypatch.setitem(sys.modules, "tornado", None)
    monkeypatch.delitem(sys.modules, "saga_celery.dashboard.server", raising=False)

    result = cli_runner().invoke(main, ["--redis-url", NOWHERE, "dashboard"])

    assert result.exit_code == 1
    assert result.stderr == ("Error: saga-celery dashboard needs tornado, which is not "
                             "installed: pip install 'saga-celery[dashboard]'\n")


def test_a_malformed_basic_auth_is_a_usage_error() -> None:
    """``--basic-auth`` without ``user:password`` exits 2 naming the option, not the
    password."""
    result = cli_runner().invoke(main, ["--redis-url", NOWHERE, "dashboard",
                                        "--basic-auth", "ops"])
    assert result.exit_code == 2
    assert "--basic-auth" in result.stderr and "user:password" in result.stderr


def test_an_unreachable_store_exits_1_in_one_line() -> None:
    """The store is pinged before serving: no Redis, exit 1 and one line, no traceback."""
    result = cli_runner().invoke(main, ["--redis-url", NOWHERE, "dashboard", "--port", "0"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_the_command_is_listed() -> None:
    """``saga-celery --help`` lists ``dashboard``."""
    result = cli_runner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "dashboard" in result.output
