"""``Durability``: saga writes that count as done only once replicas have them (``WAIT``).

Redis replicates asynchronously.  A write the master has acknowledged may not have reached a
replica yet when the master fails, and the replica Sentinel promotes then never had it: the
saga's state steps back, and a step it recorded may run again.  With
``Durability(replicas=1, timeout_ms=1000)`` (``SagaApp(durable_replicas=1)``) every saga
write is followed by ``WAIT 1 1000``, on the same connection and in the same write, and
counts as done only when that many replicas confirm it.  When fewer do in time, the write
raises ``SagaStoreUnavailableError``: it is on the master and maybe nowhere else, so its
outcome is unknown, as when a connection drops before the reply, and the task hands its
message back to be tried again (each write's version check makes that safe).

``WAIT`` makes no transaction: a write not confirmed stays on the master, and a replica
that confirmed it can still lose it if it fails too.  Lease renewals and releases are not
waited for (a lost one only changes when a lease ends), nor are the index sets (the
recovery sweep mends them).  Redis Cluster is refused: ``WAIT`` must follow the write on
the connection that made it, which redis-py's cluster client does not promise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from saga_celery._errors import SagaConfigError, SagaStoreUnavailableError
from saga_celery._store.connections import pack
from saga_celery._store.topology import is_cluster


@dataclass(frozen=True, slots=True)
class Durability:
    """Wait for ``replicas`` replicas to have each saga write, at most ``timeout_ms``."""

    replicas: int
    timeout_ms: int
    packed: bytes = field(init=False, repr=False, compare=False)
    """The ``WAIT`` command in RESP, sent after each write."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise SagaConfigError(f"durable_replicas must be 1 or more, not {self.replicas}")
        if self.timeout_ms < 1:
            raise SagaConfigError(f"the durable timeout must be positive, not "
                                  f"{self.timeout_ms} ms (WAIT 0 would wait for ever)")
        object.__setattr__(self, "packed", pack(*self.command))

    @property
    def command(self) -> tuple[str, str, str]:
        return ("WAIT", str(self.replicas), str(self.timeout_ms))

    @staticmethod
    def check(durability: Durability | None, client: object) -> Durability | None:
        """``durability`` if the client can honour it, else ``SagaConfigError``."""
        if durability is not None and is_cluster(client):
            raise SagaConfigError(
                "durable_replicas is not available on Redis Cluster: WAIT must follow each "
                "write on the connection that made it. Use it with one Redis or behind "
                "Sentinel, or run without it (README, \"Redis topologies\").")
        return durability

    def confirm(self, reply: object, waited: object, where: str, saga_id: str) -> None:
        """Raise ``SagaStoreUnavailableError`` if the script wrote (``reply`` is not an error
        and not 0) and fewer than ``replicas`` replicas confirmed it (``waited``)."""
        if isinstance(reply, Exception) or not reply:
            return
        if isinstance(waited, int) and waited >= self.replicas:
            return
        got = waited if isinstance(waited, int) else f"none ({waited})"
        raise SagaStoreUnavailableError(
            f"Redis at {where}: {got} of the {self.replicas} replica(s) durable_replicas asks "
            f"for confirmed a write of this saga within {self.timeout_ms} ms, so a failover "
            "could still lose it; it will be tried again. Check the replicas (INFO "
            "replication) and their lag.", saga_id=saga_id)
