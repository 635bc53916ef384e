"""Where saga runs, their events and their leases are kept: Redis, or memory in tests."""

from saga_celery._store.base import (
    CorruptRecord,
    LeaseAction,
    LeaseChange,
    SagaStore,
    Snapshot,
    SweepRecord,
    Timer,
    active_pages,
)
from saga_celery._store.memory import MemoryStore
from saga_celery._store.redis import RedisStore

__all__ = [
    "CorruptRecord",
    "LeaseAction",
    "LeaseChange",
    "MemoryStore",
    "RedisStore",
    "SagaStore",
    "Snapshot",
    "SweepRecord",
    "Timer",
    "active_pages",
]
