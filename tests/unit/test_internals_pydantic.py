"""The pydantic fast path (``_internals/pydantic.py``): its probe, its fallback, the same run.

A load builds the saga's run by hand from its validated progress and plan; pydantic's public
``model_construct`` must build the same run, and does when the probe says no.
"""

from __future__ import annotations

from collections.abc import Iterator

import pydantic
import pytest
import structlog

from saga_celery._core.model import SagaProgress, SagaRun
from saga_celery._internals import pydantic as pydantic_fence
from saga_celery._store.encoding import decode_run, encode_progress, with_plan
from tests.fast_paths import fast_paths_off, forget_probes
from tests.unit.sim import Sim, plan


@pytest.fixture(autouse=True)
def _fresh_probes() -> Iterator[None]:
    """Each test probes as a new process would, and leaves no answer behind."""
    forget_probes()
    yield
    forget_probes()


def mid_saga() -> tuple[SagaProgress, SagaRun]:
    """A run with a finished step and a started one, and its progress as a load reads it."""
    s = Sim.start(plan("a", ["b", "c"], "d"), params={"order": 1})
    s.run_step("a", output={"r": 1})
    s.start_step("b")
    return SagaProgress.model_validate_json(encode_progress(s.run)), s.run


def assert_same_run(built: SagaRun, reference: SagaRun) -> None:
    """Two runs alike in every respect: values, field order, fields set, no extra state."""
    assert built == reference
    assert list(built.__dict__) == list(reference.__dict__)
    assert built.model_fields_set == reference.model_fields_set
    assert built.__pydantic_extra__ is reference.__pydantic_extra__ is None
    assert built.__pydantic_private__ is reference.__pydantic_private__ is None
    assert encode_progress(built) == encode_progress(reference)
    assert built.model_dump() == reference.model_dump()


def test_the_probe_passes_on_the_installed_pydantic() -> None:
    """On the pydantic this release is tested with, the fast path is on for the saga run."""
    with structlog.testing.capture_logs() as logs:
        assert pydantic_fence.probe() is True
        assert pydantic_fence.fits(SagaRun) is True
    assert logs == []


def test_with_plan_builds_what_model_construct_builds() -> None:
    """The run a load builds by hand is the one ``model_construct`` builds, so a pydantic
    upgrade that changes what a constructed model holds fails here (or in the probe)."""
    progress, run = mid_saga()
    built = with_plan(progress, run.plan)
    reference = SagaRun.model_construct(plan=run.plan, **progress.__dict__)

    assert built == run
    assert_same_run(built, reference)
    assert decode_run(encode_progress(built), built.plan) == built


def test_with_the_fast_paths_off_a_load_builds_the_run_through_model_construct(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``SAGA_CELERY_FAST_PATHS=off``: the probe says no, without a warning, and the run
    comes from ``model_construct``, the same run."""
    progress, run = mid_saga()
    constructed: list[object] = []
    construct = SagaRun.model_construct

    def spy(**fields: object) -> SagaRun:
        constructed.append(fields["plan"])
        return construct(**fields)

    with fast_paths_off(), structlog.testing.capture_logs() as logs:
        monkeypatch.setattr(SagaRun, "model_construct", spy)
        built = with_plan(progress, run.plan)
        assert pydantic_fence.probe() is False

    assert constructed == [run.plan]
    assert_same_run(built, run)
    assert logs == []


def test_unexpected_internals_fall_back_with_one_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pydantic whose models have another slot than the fast path sets turns the fast
    path off with exactly one warning line, however many loads follow, and loads still
    build the same run."""
    progress, run = mid_saga()
    slots = (*pydantic.BaseModel.__slots__, "__pydantic_something_new__")
    monkeypatch.setattr(pydantic.BaseModel, "__slots__", slots)

    with structlog.testing.capture_logs() as logs:
        built = [with_plan(progress, run.plan) for _ in range(3)]

    assert [(e["log_level"], e["event"], e["fast_path"]) for e in logs] == [
        ("warning", "saga.fast_path_off", pydantic_fence.FAST_PATH)]
    assert "__pydantic_something_new__" in logs[0]["reason"]
    for one in built:
        assert_same_run(one, run)


def test_a_model_with_a_post_init_is_built_by_model_construct() -> None:
    """A model class the fast path would build wrongly (a ``model_post_init`` it would
    skip) takes ``model_construct``, with one warning naming it."""

    class Hooked(pydantic.BaseModel):
        n: int

        def model_post_init(self, context: object, /) -> None:
            object.__setattr__(self, "n", self.n + 1)

    with structlog.testing.capture_logs() as logs:
        built = pydantic_fence.build(Hooked, {"n": 1})

    assert built.n == 2
    assert [e["reason"] for e in logs] == ["Hooked has a model_post_init"]
