"""Sagas of the shop that wait (SPEC section 8), for the dashboard's tests on a real worker.

Defined in the test process only: a saga's plan travels in the store, so the shop worker
runs them with the shop's own steps.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType
from typing import Any, NamedTuple

from tests.integration.harness import wait_until

SLEEP_S = 2.0


class WaitingSagas(NamedTuple):
    approved: Any
    """reserve, a 2 s sleep ``cool-off``, a wait for ``approval``, ticket."""
    held: Any
    """reserve, ticket, on_failure="hold": held when ticket fails for good."""


@cache
def waiting_sagas(shop: ModuleType) -> WaitingSagas:
    sagas = shop.sagas
    return WaitingSagas(
        approved=sagas.saga("dash-approved", [
            shop.reserve.s("sku-1", 1), sagas.sleep(f"{SLEEP_S} seconds", name="cool-off"),
            sagas.wait_for_event("approval", timeout="60 seconds"), shop.ticket.s()]),
        held=sagas.saga("dash-held", [shop.reserve.s("sku-1", 1), shop.ticket.s()],
                        on_failure="hold"))


def run_approved(shop: ModuleType, saga_id: str) -> Any:
    """The saga with a sleep and a wait, the event sent once the wait began; its end state."""
    run = waiting_sagas(shop).approved.apply_async(saga_id=saga_id)
    assert wait_until(lambda: run.status().step("wait:approval").status == "running",
                      timeout=30)
    run.send_event("approval", payload={"by": "ann"})
    return run.wait(timeout=60)


def start_held(shop: ModuleType, saga_id: str) -> Any:
    """A saga held by a step that fails for good: its handle, once it is held."""
    run = waiting_sagas(shop).held.apply_async(
        saga_id=saga_id, params={"fail": {"shop.ticket": "nonretryable"}})
    assert wait_until(lambda: run.status().status == "held", timeout=30)
    return run
