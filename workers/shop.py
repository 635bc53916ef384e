"""The example saga: place an order (reserve stock, charge the card, open a fulfilment ticket).

Each step's effect, and each rollback's undoing of it, is simulated by an entry in a
"ledger" on the saga Redis (one list per saga), written at most once per idempotency key, so
a retried or redelivered task never applies an effect twice.

Failures on purpose, chosen by the saga's params (names without the ``shop.`` prefix):

- ``{"fail_at": "create_ticket"}``: that step fails on every attempt, so the saga fails and
  the steps that started are rolled back in reverse start order.
- ``{"flaky": ["refund_payment"]}``: the first attempt of that step or rollback fails and
  its retry succeeds.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, cast

import redis

from saga_celery import RollbackContext, current_step
from workers.app import sagas, settings

STEP_RETRIES = {"limit": 1, "delay": 200, "backoff": "constant"}
ROLLBACK_RETRIES = {"limit": 2, "delay": 200, "backoff": "linear"}
TIMEOUT = "5 seconds"
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

_redis = redis.Redis.from_url(settings.state_url, decode_responses=True)
_record_once = _redis.register_script(_RECORD_ONCE)


class DemoFailure(RuntimeError):
    """A failure the saga's params asked for."""


def _keys(saga_id: str) -> list[str]:
    # One hash tag per saga: both keys sit in the same Redis Cluster slot.
    return [f"shop:{{{saga_id}}}:applied", f"shop:{{{saga_id}}}:ledger"]


def record(saga_id: str, idempotency_key: str, entry: dict[str, Any]) -> None:
    """Apply (append) one effect to the saga's ledger, once per idempotency key."""
    payload = json.dumps({**entry, "key": idempotency_key})
    _record_once(keys=_keys(saga_id), args=[idempotency_key, payload, LEDGER_TTL_S])


def ledger_entries(saga_id: str) -> list[dict[str, Any]]:
    """Every effect applied for ``saga_id``, oldest first."""
    raw = cast(list[str], _redis.lrange(_keys(saga_id)[1], 0, -1))
    return [json.loads(item) for item in raw]


def ref(prefix: str, idempotency_key: str) -> str:
    """A short id that is the same on every retry of one step (so effects dedupe)."""
    return f"{prefix}-{hashlib.sha256(idempotency_key.encode()).hexdigest()[:8]}"


def _fields(output: object) -> dict[str, Any]:
    return cast(dict[str, Any], output)


def maybe_fail(name: str, attempt: int, params: Any) -> None:
    """Raise if the saga's params ask ``name`` (a step or rollback) to fail this attempt."""
    wanted = params if isinstance(params, dict) else {}
    if wanted.get("fail_at") == name:
        raise DemoFailure(f"{name} failed on purpose (params fail_at={name!r})")
    if name in (wanted.get("flaky") or []) and attempt == 1:
        raise DemoFailure(f"{name} failed its first attempt on purpose (params flaky)")


# --- steps and their rollbacks ---------------------------------------------------------


@sagas.step(name="shop.reserve_inventory", retries=STEP_RETRIES, timeout=TIMEOUT)
def reserve_inventory(sku: str, qty: int) -> dict[str, Any]:
    ctx = current_step()
    maybe_fail("reserve_inventory", ctx.attempt, ctx.params)
    reservation = {"reservation_id": ref("res", ctx.idempotency_key), "sku": sku, "qty": qty}
    record(ctx.saga_id, ctx.idempotency_key, {"action": "reserved", **reservation})
    return reservation


@reserve_inventory.rollback(name="shop.release_inventory", retries=ROLLBACK_RETRIES,
                            timeout=TIMEOUT)
def release_inventory(ctx: RollbackContext) -> None:
    maybe_fail("release_inventory", ctx.attempt, ctx.params)
    if ctx.output is None:  # the step itself failed: nothing to undo
        return
    record(ctx.saga_id, ctx.idempotency_key, {"action": "released", **_fields(ctx.output)})


@sagas.step(name="shop.charge_payment", retries=STEP_RETRIES, timeout=TIMEOUT)
def charge_payment(reservation: dict[str, Any], amount: int) -> dict[str, Any]:
    ctx = current_step()
    maybe_fail("charge_payment", ctx.attempt, ctx.params)
    charge = {"charge_id": ref("ch", ctx.idempotency_key), "amount": amount,
              "reservation_id": reservation["reservation_id"]}
    record(ctx.saga_id, ctx.idempotency_key, {"action": "charged", **charge})
    return charge


@charge_payment.rollback(name="shop.refund_payment", retries=ROLLBACK_RETRIES,
                         timeout=TIMEOUT)
def refund_payment(ctx: RollbackContext) -> None:
    maybe_fail("refund_payment", ctx.attempt, ctx.params)
    if ctx.output is None:  # the step itself failed: nothing to undo
        return
    record(ctx.saga_id, ctx.idempotency_key, {"action": "refunded", **_fields(ctx.output)})


@sagas.step(name="shop.create_ticket", retries=STEP_RETRIES, timeout=TIMEOUT)
def create_ticket(charge: dict[str, Any]) -> dict[str, Any]:
    ctx = current_step()
    maybe_fail("create_ticket", ctx.attempt, ctx.params)
    ticket = {"ticket_id": ref("tk", ctx.idempotency_key), "charge_id": charge["charge_id"]}
    record(ctx.saga_id, ctx.idempotency_key, {"action": "ticket_opened", **ticket})
    return ticket


@create_ticket.rollback(name="shop.close_ticket", retries=ROLLBACK_RETRIES, timeout=TIMEOUT)
def close_ticket(ctx: RollbackContext) -> None:
    maybe_fail("close_ticket", ctx.attempt, ctx.params)
    if ctx.output is None:  # the step itself failed: nothing to undo
        return
    record(ctx.saga_id, ctx.idempotency_key, {"action": "ticket_closed", **_fields(ctx.output)})


place_order = sagas.saga("place-order", [
    reserve_inventory.s("sku-42", 2),
    charge_payment.s(amount=4200),
    create_ticket.s(),
])
"""Reserve 2 x sku-42, charge 4200 (cents) for them, open a fulfilment ticket."""
