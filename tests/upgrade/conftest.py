"""The upgrade tests use the integration tests' real Redis (fails, not skips, in CI)."""

from __future__ import annotations

from tests.integration.conftest import redis_url

__all__ = ["redis_url"]
