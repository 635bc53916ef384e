"""Which modules may touch a dependency's private internals (SPEC section 9), listed.

``ALLOWED`` names, per dependency, every module of saga_celery allowed to touch its private
names: one fenced module under ``saga_celery/_internals`` at most, probed with a public
fallback.  ``test_fences_kombu_celery.py`` and ``test_fences_redis_pydantic.py`` read every
other module's source and fail when one touches a private name of kombu, Celery, redis-py or
pydantic; this file keeps the list itself honest.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "saga_celery"

ALLOWED: dict[str, set[str]] = {
    "kombu": {"saga_celery._internals.kombu"},
    "celery": {"saga_celery._internals.celery"},
    "redis": set(),  # no fast path left: the public API with hiredis (bench/RESULTS.md)
    "pydantic": set(),  # likewise: model_construct, not its private fields
}


def test_the_fence_holds_exactly_the_listed_modules() -> None:
    """Every module under ``_internals`` is listed for its dependency, and every listed one
    exists: a new reach into a dependency means a new, listed, fenced module."""
    fenced = {f"saga_celery._internals.{p.stem}" for p in (PACKAGE / "_internals").glob("*.py")
              if p.stem != "__init__"}
    assert fenced == set().union(*ALLOWED.values())


def test_each_fenced_module_is_named_for_its_dependency() -> None:
    """One module per dependency, named after it, so a reader finds it."""
    for dependency, modules in ALLOWED.items():
        assert all(m.rsplit(".", 1)[1] == dependency for m in modules)


def test_the_source_checks_cover_every_listed_dependency() -> None:
    """The source-reading checks exist for all four dependencies."""
    here = Path(__file__).parent
    assert (here / "test_fences_kombu_celery.py").exists()
    assert (here / "test_fences_redis_pydantic.py").exists()
    assert set(ALLOWED) == {"kombu", "celery", "redis", "pydantic"}
