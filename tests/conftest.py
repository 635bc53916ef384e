"""Configuration shared by every test suite (unit, contract, integration)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI machines have 2 cores shared with a Redis server and worker subprocesses: a property test's
# per-example deadline would measure the machine, not the code.
settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "default")
