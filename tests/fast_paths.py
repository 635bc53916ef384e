"""Running tests on the public paths: every fast path of ``saga_celery._internals`` off.

``SAGA_CELERY_FAST_PATHS=off`` only counts where a probe has not run yet in the process, so
``fast_paths_off`` forgets the probes' answers on the way in and on the way out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import saga_celery._internals as internals
from saga_celery._internals import pydantic as pydantic_fence


def forget_probes() -> None:
    """Forget every probe's answer and every warning given, as in a new process."""
    pydantic_fence.probe.cache_clear()
    pydantic_fence.fits.cache_clear()
    internals._warned.clear()


@contextmanager
def fast_paths_off() -> Iterator[None]:
    """Within: the library takes the public path wherever it has a fast one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(internals.FAST_PATHS_ENV, "off")
        forget_probes()
        try:
            yield
        finally:
            forget_probes()
