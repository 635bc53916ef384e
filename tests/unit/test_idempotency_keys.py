"""Idempotency keys (SPEC section 2): one per (saga id, step, count), whatever characters those
hold, and a saga keeps the key encoding it was started with.

Sagas run in this process on the in-memory broker and store: a step "runs" by ``Task.apply``
of its due message, as a worker would.
"""

from __future__ import annotations

from typing import Any

import pytest

from saga_celery import RollbackContext, SagaApp, StepContext, current_step
from saga_celery._context import rollback_idempotency_key, step_idempotency_key
from saga_celery._core.model import SagaProgress
from saga_celery._store.memory import MemoryStore
from tests.unit.test_api import run_due

COLLIDING_TODAY = [
    (("a:b", "c", 1), ("a", "b:c", 1)),
    (("x", "y:1", 2), ("x:y", "1", 2)),
    (("a%3Ab", "c", 1), ("a:b", "c", 1)),
]
"""Pairs of different (saga id, step, count) that the ':'-joined legacy keys confuse, or that a
':'-only escape would."""

LEGACY_PROGRESS_JSON = (
    '{"id":"a:b","name":"s","created_at":"2026-11-01T12:00:00Z","steps":{"c#1":'
    '{"key":"c#1","name":"c","count":1,"stage":0}},'
    '"outbox":{}}'
)
"""A saga's progress as saga_celery 0.1.0 stored it: no ``format`` field."""


@pytest.mark.parametrize(("first", "second"), COLLIDING_TODAY)
def test_different_triples_get_different_keys(first: tuple[str, str, int],
                                              second: tuple[str, str, int]) -> None:
    """With the escaped encoding, two different (saga id, step, count) never share a step key
    or a rollback key."""
    assert step_idempotency_key(*first, key_format=2) != step_idempotency_key(
        *second, key_format=2)
    assert rollback_idempotency_key(*first, key_format=2) != rollback_idempotency_key(
        *second, key_format=2)


def test_ordinary_ids_keep_their_readable_keys() -> None:
    """Ids and names without ':' or '%' get the same key in both encodings."""
    for key_format in (1, 2):
        assert step_idempotency_key("order-42", "shop.charge", 3,
                                    key_format=key_format) == "order-42:shop.charge:3"
        assert rollback_idempotency_key("order-42", "shop.charge", 3, key_format=key_format
                                        ) == "order-42:shop.charge:3:rollback"


def test_escaped_components_are_percent_encoded() -> None:
    """':' becomes '%3A' and '%' becomes '%25' in each component; ':' still joins them."""
    assert step_idempotency_key("a:b", "c%d", 1, key_format=2) == "a%3Ab:c%25d:1"
    assert step_idempotency_key("a:b", "c%d", 1, key_format=1) == "a:b:c%d:1"


def test_a_saga_stored_by_0_1_0_reads_as_format_1_and_keeps_its_keys() -> None:
    """A saga stored without ``format`` (as 0.1.0 stored it) reads as format 1 and gives the
    old keys, so a saga in flight across an upgrade keeps its keys."""
    progress = SagaProgress.model_validate_json(LEGACY_PROGRESS_JSON)
    assert progress.format == 1
    assert step_idempotency_key("a:b", "c", 1, key_format=progress.format) == "a:b:c:1"


def run_saga_collecting_keys(sagas: SagaApp, saga_id: str, step: str
                             ) -> tuple[StepContext, RollbackContext]:
    """Run a one-step saga whose step fails, then its rollback; the contexts both saw."""
    seen: list[Any] = []

    @sagas.step(name=step, retries={"limit": 0})
    def fail() -> None:
        seen.append(current_step())
        raise RuntimeError("boom")

    @fail.rollback(retries={"limit": 0})
    def undo(ctx: RollbackContext) -> None:
        seen.append(ctx)

    saga = sagas.saga("s", [fail.si()])
    saga.apply_async(saga_id=saga_id)
    run_due(sagas, saga_id)  # the step fails
    run_due(sagas, saga_id)  # its rollback runs
    step_ctx, rollback_ctx = seen
    return step_ctx, rollback_ctx


def test_a_saga_id_and_step_name_with_colons_get_distinct_keys(sagas: SagaApp) -> None:
    """Saga "a:b" with step "c" and saga "a" with step "b:c" see different step keys and
    different rollback keys."""
    first = run_saga_collecting_keys(sagas, "a:b", "c")
    second = run_saga_collecting_keys(sagas, "a", "b:c")
    assert first[0].idempotency_key == "a%3Ab:c:1"
    assert second[0].idempotency_key == "a:b%3Ac:1"
    assert first[1].idempotency_key == "a%3Ab:c:1:rollback"
    assert second[1].idempotency_key == "a:b%3Ac:1:rollback"


def test_a_saga_started_in_format_1_keeps_its_legacy_keys(app: Any) -> None:
    """A saga created in format 1 (by 0.1.0, or with ``write_format=1`` during an upgrade)
    keeps its ':'-joined keys for its steps and rollbacks."""
    sagas = SagaApp(app, store=MemoryStore(), write_format=1)
    step_ctx, rollback_ctx = run_saga_collecting_keys(sagas, "a:b", "c")
    assert step_ctx.idempotency_key == "a:b:c:1"
    assert rollback_ctx.idempotency_key == "a:b:c:1:rollback"


def test_new_sagas_are_created_in_the_newest_format(sagas: SagaApp) -> None:
    """A saga started now is format 4 (escaped keys, compacted when it ends), and its stored
    record says so."""
    @sagas.step(name="k.a")
    def a() -> None:
        return None

    sagas.saga("s", [a.s()]).apply_async(saga_id="fmt-1")
    assert sagas._store.load("fmt-1").run.format == 4  # type: ignore[union-attr]


def test_an_unknown_write_format_is_refused_naming_the_ones_there_are(app: Any) -> None:
    """``write_format`` must be one this release writes."""
    from saga_celery import SagaConfigError

    with pytest.raises(SagaConfigError, match=r"write_format=5.*\[1, 2, 3, 4\]"):
        SagaApp(app, store=MemoryStore(), write_format=5)
