"""A user's ``mypy --strict`` passes on the README example and on ``workers/``, and the typed
decorators really type: a wrong call is an error, not ``Any``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_harness_readme import readme_testing_example
from tests.typing_readme import ROOT, check_readme, mypy_strict

pytestmark = pytest.mark.slow

WRONG_CALLS = """\
from celery import Celery
from saga_celery import RollbackContext, SagaApp

sagas = SagaApp(Celery("typing", broker="redis://127.0.0.1:6379/0"))


@sagas.step(timeout="30 seconds")
def reserve(sku: str, qty: int) -> dict[str, str]:
    return {"reservation_id": f"{sku}-{qty}"}


def not_a_handler(reservation_id: str) -> None: ...


reveal_type(reserve)
reserve("sku-1", "two")
reserve.delay(1, 2)
reserve.rollback(not_a_handler)
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for this module's runs: the first run fills it for the others."""
    return tmp_path_factory.mktemp("mypy_cache")


def test_readme_example_passes_mypy_strict(tmp_path: Path, cache_dir: Path) -> None:
    """The README's complete example type-checks under ``mypy --strict`` as written."""
    result = check_readme(tmp_path, cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_testing_example_passes_mypy_strict(tmp_path: Path, cache_dir: Path) -> None:
    """The README's "Testing your sagas" pytest module type-checks under ``mypy --strict``."""
    path = tmp_path / "test_readme_saga.py"
    path.write_text(readme_testing_example())
    result = mypy_strict(path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workers_pass_mypy_strict(cache_dir: Path) -> None:
    """``workers/`` (the example saga in ``shop.py`` included) passes ``mypy --strict`` with
    no ``# mypy: disable-error-code`` and no ``type: ignore`` on a saga decorator."""
    result = mypy_strict(ROOT / "workers", cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    source = "\n".join(path.read_text() for path in (ROOT / "workers").glob("*.py"))
    assert "disable-error-code" not in source


def test_a_step_is_typed_by_its_function(tmp_path: Path, cache_dir: Path) -> None:
    """A step is ``SagaStep[P, R]``, not ``Any``: a call with a wrong argument, and a rollback
    handler that does not take a ``RollbackContext``, are mypy errors."""
    path = tmp_path / "wrong_calls.py"
    path.write_text(WRONG_CALLS)
    result = mypy_strict(path, cache_dir=cache_dir)
    assert result.returncode == 1, result.stdout
    expected = [
        'Revealed type is "saga_celery._celery.typed.SagaStep[[sku: str, qty: int], '
        'dict[str, str]]"',
        'Argument 2 to "__call__" of "SagaStep" has incompatible type "str"; expected "int"',
        'Argument 1 to "delay" of "SagaStep" has incompatible type "int"; expected "str"',
        'Argument 1 to "rollback" of "SagaStep" has incompatible type "Callable[[str], None]"',
    ]
    for message in expected:
        assert message in result.stdout, result.stdout
    assert result.stdout.count("error:") == 3, result.stdout
