"""The demo's saga: place an order (reserve stock, charge the card, open a fulfilment ticket).

``declare_shop(sagas, redis_url)`` declares the steps, their rollbacks and the saga on a
``SagaApp``: the demo's own (``saga_celery.demo.app``) or a fleet's (the repository's
``workers/shop.py``).  Each step's effect, and each rollback's undoing of it, is simulated by
an entry in a "ledger" on that Redis (one list per saga), written at most once per
idempotency key, so a retried or redelivered task never applies an effect twice.

Failures on purpose, chosen by the saga's params (names without the ``shop.`` prefix):

- ``{"fail_at": "create_ticket"}``: that step fails on every attempt, so the saga fails and
  the steps that started are rolled back in reverse start order.
- ``{"flaky": ["refund_payment"]}``: the first attempt of that step or rollback fails and
  its retry succeeds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import redis

from saga_celery import RollbackContext, SagaApp, SagaDefinition, StepContext, current_step

__all__ = ["DemoFailure", "Ledger", "Shop", "declare_shop"]

STEP_RETRIES = {"limit": 1, "delay": 200, "backoff": "constant"}
ROLLBACK_RETRIES = {"limit": 2, "delay": 200, "backoff": "linear"}
TIMEOUT = "5 seconds"
APPROVAL = "approval"
"""The event type the ``approved-order`` saga waits for."""
APPROVAL_TIMEOUT = "1 minute"
LEDGER_TTL_S = 7 * 24 * 3600

# KEYS[1] applied effects (hash: idempotency key -> entry), KEYS[2] the ledger (list)
# ARGV[1] idempotency key, ARGV[2] entry (JSON), ARGV[3] TTL of both keys in seconds
# Returns 1 when the entry was appended, 0 when that key had already applied its effect.
_RECORD_ONCE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


class DemoFailure(RuntimeError):
    """A failure the saga's params asked for."""


class Ledger:
    """The effects applied for each saga, oldest first, each at most once per idempotency key."""

    def __init__(self, redis_url: str) -> None:
        self._redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self._record_once = self._redis.register_script(_RECORD_ONCE)

    def record(self, saga_id: str, idempotency_key: str, entry: dict[str, Any]) -> None:
        """Apply (append) one effect to the saga's ledger, once per idempotency key."""
        payload = json.dumps({**entry, "key": idempotency_key})
        self._record_once(keys=_keys(saga_id), args=[idempotency_key, payload, LEDGER_TTL_S])

    def entries(self, saga_id: str) -> list[dict[str, Any]]:
        """Every effect applied for ``saga_id``, oldest first."""
        raw = cast(list[str], self._redis.lrange(_keys(saga_id)[1], 0, -1))
        return [json.loads(item) for item in raw]


@dataclass(frozen=True)
class Shop:
    """What ``declare_shop`` declared: the saga to start, and the ledger to read effects from."""

    place_order: SagaDefinition
    """Reserve 2 x sku-42, charge 4200 (cents) for them, open a fulfilment ticket."""
    ledger: Ledger
    approved_order: SagaDefinition
    """Wait (at most a minute) for an ``approval`` event, then reserve 1 x sku-7, charge 990
    (cents) and open a ticket (SPEC section 8: a saga that waits)."""


def _keys(saga_id: str) -> list[str]:
    # One hash tag per saga: both keys sit in the same Redis Cluster slot.
    return [f"shop:{{{saga_id}}}:applied", f"shop:{{{saga_id}}}:ledger"]


def ref(prefix: str, idempotency_key: str) -> str:
    """A short id that is the same on every retry of one step (so effects dedupe)."""
    return f"{prefix}-{hashlib.sha256(idempotency_key.encode()).hexdigest()[:8]}"


def maybe_fail(name: str, attempt: int, params: Any) -> None:
    """Raise if the saga's params ask ``name`` (a step or rollback) to fail this attempt."""
    wanted = params if isinstance(params, dict) else {}
    if wanted.get("fail_at") == name:
        raise DemoFailure(f"{name} failed on purpose (params fail_at={name!r})")
    if name in (wanted.get("flaky") or []) and attempt == 1:
        raise DemoFailure(f"{name} failed its first attempt on purpose (params flaky)")


def _begin(name: str) -> StepContext:
    """The running step's context, after failing it if the params ask for that."""
    ctx = current_step()
    maybe_fail(name, ctx.attempt, ctx.params)
    return ctx


def _apply(ledger: Ledger, ctx: StepContext, action: str,
           effect: dict[str, Any]) -> dict[str, Any]:
    """Record ``effect`` as ``action`` in the ledger; the effect is the step's output."""
    ledger.record(ctx.saga_id, ctx.idempotency_key, {"action": action, **effect})
    return effect


# --- steps and their rollbacks ---------------------------------------------------------


def _steps(ledger: Ledger) -> list[Callable[..., dict[str, Any]]]:
    def reserve_inventory(sku: str, qty: int) -> dict[str, Any]:
        ctx = _begin("reserve_inventory")
        return _apply(ledger, ctx, "reserved", {
            "reservation_id": ref("res", ctx.idempotency_key), "sku": sku, "qty": qty})

    def charge_payment(reservation: dict[str, Any], amount: int) -> dict[str, Any]:
        ctx = _begin("charge_payment")
        return _apply(ledger, ctx, "charged", {
            "charge_id": ref("ch", ctx.idempotency_key), "amount": amount,
            "reservation_id": reservation["reservation_id"]})

    def create_ticket(charge: dict[str, Any]) -> dict[str, Any]:
        ctx = _begin("create_ticket")
        return _apply(ledger, ctx, "ticket_opened", {
            "ticket_id": ref("tk", ctx.idempotency_key), "charge_id": charge["charge_id"]})

    return [reserve_inventory, charge_payment, create_ticket]


def _undo(ledger: Ledger, name: str, action: str) -> Callable[[RollbackContext], None]:
    """A rollback handler that records ``action`` with the output of the step it undoes."""

    def undo(ctx: RollbackContext) -> None:
        maybe_fail(name, ctx.attempt, ctx.params)
        if ctx.output is None:  # the step itself failed: nothing to undo
            return
        ledger.record(ctx.saga_id, ctx.idempotency_key,
                      {"action": action, **cast(dict[str, Any], ctx.output)})

    return undo


_UNDO = {"reserve_inventory": ("release_inventory", "released"),
         "charge_payment": ("refund_payment", "refunded"),
         "create_ticket": ("close_ticket", "ticket_closed")}
"""Each step's rollback: its name, and the ledger action it records."""


def declare_shop(sagas: SagaApp, redis_url: str) -> Shop:
    """Declare the shop's steps (``shop.*`` tasks), rollbacks and saga on ``sagas``."""
    ledger = Ledger(redis_url)
    tasks = []
    for body in _steps(ledger):
        task = sagas.step(body, name=f"shop.{body.__name__}", retries=STEP_RETRIES,
                          timeout=TIMEOUT)
        undo_name, action = _UNDO[body.__name__]
        task.rollback(_undo(ledger, undo_name, action), name=f"shop.{undo_name}",
                      retries=ROLLBACK_RETRIES, timeout=TIMEOUT)
        tasks.append(task)
    reserve, charge, ticket = tasks
    order = sagas.saga("place-order", [reserve.s("sku-42", 2), charge.s(amount=4200),
                                       ticket.s()])
    approved = sagas.saga("approved-order", [
        sagas.wait_for_event(APPROVAL, timeout=APPROVAL_TIMEOUT, name="manager-approval"),
        reserve.si("sku-7", 1), charge.s(amount=990), ticket.s()])
    return Shop(order, ledger, approved)
