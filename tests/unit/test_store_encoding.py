"""How a run is stored (``_store/encoding.py``): its progress as JSON, its plan apart."""

from __future__ import annotations

from saga_celery._core.model import SagaProgress, SagaRun
from saga_celery._store.encoding import decode_run, encode_progress, with_plan
from tests.unit.sim import Sim, plan


def mid_saga() -> SagaRun:
    """A run with a finished step and a started one."""
    s = Sim.start(plan("a", ["b", "c"], "d"), params={"order": 1})
    s.run_step("a", output={"r": 1})
    s.start_step("b")
    return s.run


def test_a_stored_run_reads_back_as_the_same_run() -> None:
    """The progress JSON and the plan give back the run that was stored, every field set,
    and it encodes to the same JSON again."""
    run = mid_saga()
    loaded = decode_run(encode_progress(run), run.plan)

    assert loaded == run
    assert loaded.model_fields_set == set(SagaRun.model_fields)
    assert encode_progress(loaded) == encode_progress(run)
    assert loaded.model_dump() == run.model_dump()


def test_the_progress_leaves_out_the_plan_and_default_values() -> None:
    """A commit stores neither the plan (written once, at the start) nor the fields that
    hold their defaults (validation restores them)."""
    run = mid_saga()
    stored = encode_progress(run)
    progress = SagaProgress.model_validate_json(stored)

    assert run.terminate is None and '"terminate"' not in stored
    assert '"plan"' not in stored
    assert with_plan(progress, run.plan) == run
