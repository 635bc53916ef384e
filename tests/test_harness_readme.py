"""The README's "Testing your sagas" example is a complete pytest module: it passes as it
stands, each test in well under a second.  (``tests/test_typing.py`` checks that
``mypy --strict`` accepts it.)"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.typing_readme import ROOT

SECTION = "## Testing your sagas"


def readme_testing_example(readme: Path = ROOT / "README.md") -> str:
    """The first ```` ```python ```` block under ``SECTION``."""
    lines = readme.read_text().splitlines()
    begin = lines.index("```python", lines.index(SECTION)) + 1
    return "\n".join(lines[begin:lines.index("```", begin)]) + "\n"


@pytest.fixture
def example(tmp_path: Path) -> Path:
    path = tmp_path / "test_readme_saga.py"
    path.write_text(readme_testing_example())
    return path


def test_the_readme_testing_example_passes_in_milliseconds(example: Path) -> None:
    """Run by pytest in a fresh process, with no Redis or broker at the URL it names needed:
    every test passes, warnings as errors, each well under a second (milliseconds in fact),
    the two days of a wait's timeout included."""
    report = example.parent / "report.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
         f"--junitxml={report}", "--rootdir", str(example.parent), str(example)],
        cwd=example.parent, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    cases = ET.parse(report).getroot().iter("testcase")
    times = {case.get("name"): float(case.get("time") or "nan") for case in cases}
    assert set(times) == {"test_retries_wait_on_the_virtual_clock",
                          "test_a_declined_card_releases_the_reservation",
                          "test_an_approval_ships_and_silence_rolls_back"}
    assert all(t < 1.0 for t in times.values()), times
