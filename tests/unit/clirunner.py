"""A ``CliRunner`` that keeps stderr apart from stdout on every click the ranges allow.

click 8.2 always does; click 8.1 does only when asked, with ``mix_stderr=False``, an argument
8.2 removed.  The CLI tests read ``result.stderr``, so they build their runner here.
"""

from __future__ import annotations

import inspect

from click.testing import CliRunner


def cli_runner() -> CliRunner:
    """A runner whose results have ``stdout`` and ``stderr`` apart."""
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)  # click < 8.2
    return CliRunner()
