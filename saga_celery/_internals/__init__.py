"""The only place saga_celery touches a dependency's private internals (SPEC section 9).

One module per dependency (``kombu``, ``celery``; redis-py and pydantic need none) holds every
private name of it the library uses, behind a fast path that is probed once per process: do the
internals look as this release expects?  When they do not (a dependency released since), the
library takes the public path instead and logs one warning line saying which fast path is
off and why.  ``SAGA_CELERY_FAST_PATHS=off`` turns every fast path off (the tests run the
integration scenarios that way too, and the bench measures what the fast paths are worth).

No other module of the package names a private attribute of a dependency:
``tests/test_fences.py`` lists the modules allowed per dependency; the source checks
beside it (``test_fences_kombu_celery.py``, ``test_fences_redis_pydantic.py``) enforce it.
"""

from __future__ import annotations

import os
import threading

import structlog

log = structlog.get_logger("saga_celery")

FAST_PATHS_ENV = "SAGA_CELERY_FAST_PATHS"
"""``off`` (or ``0``, ``false``, ``no``) takes the public path everywhere."""

_warned: set[str] = set()
_lock = threading.Lock()


def fast_paths_allowed() -> bool:
    """False when ``SAGA_CELERY_FAST_PATHS`` turns every fast path off."""
    return os.environ.get(FAST_PATHS_ENV, "").strip().lower() not in ("off", "0", "false", "no")


def fall_back(fast_path: str, reason: str) -> bool:
    """Log, once per process and fast path, that ``fast_path`` is off and why; False."""
    with _lock:
        first = fast_path not in _warned
        _warned.add(fast_path)
    if first:
        log.warning("saga.fast_path_off", fast_path=fast_path, reason=reason)
    return False
