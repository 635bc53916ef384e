"""``mypy --strict`` on the README's complete example, as a user's project would check it.

``python -m tests.typing_readme`` (``make lint`` runs it) exits with mypy's status and prints
its errors with README line numbers.  The example uses ``inventory``, ``payments``,
``create_ticket`` and ``send_receipt`` without defining them (the README says what they
stand for): ``PRELUDE`` declares them, and nothing else is added to the example.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## A complete example"

PRELUDE = """\
from typing import Any

from saga_celery import SagaStep

inventory: Any
payments: Any
create_ticket: SagaStep[[dict[str, str]], dict[str, str]]
send_receipt: SagaStep[[dict[str, str]], None]
"""


def readme_example(readme: Path = ROOT / "README.md") -> tuple[int, str]:
    """The first ```` ```python ```` block under ``SECTION``: (its first line number, its code)."""
    lines = readme.read_text().splitlines()
    start = lines.index(SECTION)
    begin = lines.index("```python", start) + 1
    end = lines.index("```", begin)
    return begin + 1, "\n".join(lines[begin:end]) + "\n"


def mypy_strict(*targets: str | Path, cache_dir: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` with the project's configuration, from the repository root."""
    cache = ["--cache-dir", str(cache_dir)] if cache_dir is not None else []
    command = [sys.executable, "-m", "mypy", "--strict", "--config-file",
               str(ROOT / "pyproject.toml"), *cache, *map(str, targets)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)


def check_readme(workdir: Path, cache_dir: Path | None = None
                 ) -> subprocess.CompletedProcess[str]:
    """mypy on the example, its errors pointing at README.md lines."""
    first_line, code = readme_example()
    path = workdir / "readme_example.py"
    path.write_text(PRELUDE + code)
    result = mypy_strict(path, cache_dir=cache_dir)
    shift = first_line - 1 - PRELUDE.count("\n")

    def readme_line(match: re.Match[str]) -> str:
        return f"README.md:{int(match.group(1)) + shift}:"

    result.stdout = re.sub(rf"{re.escape(str(path))}:(\d+):", readme_line, result.stdout)
    return result


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        result = check_readme(Path(tmp))
    print(f"mypy --strict on README.md {SECTION!r}:\n{result.stdout}", end="")
    print(result.stderr, end="", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
