"""Optional dependencies: each comes with an extra of the package, and a missing one is named.

    saga-celery[metrics]  prometheus-client  saga_celery.metrics, ``saga-celery metrics``
    saga-celery[demo]     fakeredis[lua]     the demo's embedded Redis (no SAGA_REDIS_URL)
    saga-celery[otel]     opentelemetry-sdk  saga_celery.otel: one trace per saga

``import saga_celery`` (sagas, workers, the ``saga-celery`` command) needs neither: a module
that needs one imports it at its top and turns the ``ImportError`` into a
``MissingExtraError``, whose message says what to install.
"""

from __future__ import annotations

__all__ = ["MissingExtraError"]


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""

    def __init__(self, extra: str, package: str, *, needed_by: str) -> None:
        super().__init__(f"{needed_by} needs {package}, which is not installed: "
                         f"pip install 'saga-celery[{extra}]'")
        self.extra = extra
        """The extra to install: ``pip install 'saga-celery[<extra>]'``."""
