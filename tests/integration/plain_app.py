"""A plain Celery app, no saga_celery, that the harness tests run in worker subprocesses.

The broker, result backend and the task's own Redis client all use ``$SAGA_TEST_REDIS_URL``.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

REDIS_URL = os.environ.get("SAGA_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")

app = Celery("plain_app", broker=REDIS_URL, backend=REDIS_URL)
app.conf.broker_connection_retry_on_startup = True

# KEYS[1]: the record hash.  ARGV[1]: the sum.  ARGV[2]: the pid of the process that ran it.
# Returns how many times a task recorded into this hash.
_RECORD = """
redis.call('HSET', KEYS[1], 'result', ARGV[1], 'pid', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'runs', 1)
"""


@app.task(name="plain_app.add")
def add(x: int, y: int, record_key: str | None = None) -> int:
    """Return x + y; with ``record_key``, also record it there with a Lua script (EVALSHA)."""
    total = x + y
    if record_key is not None:
        with redis.Redis.from_url(REDIS_URL) as client:
            client.register_script(_RECORD)(keys=[record_key], args=[total, os.getpid()])
    return total
