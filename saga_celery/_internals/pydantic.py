"""pydantic's private names: building a model from field values that are already valid.

A load builds the saga's run from its progress, just validated from JSON, and its plan,
validated once per process (``_store/encoding.py``).  pydantic's public way to build a
model without validating, ``model_construct``, loops over every field's aliases and defaults
again.  The fast path (``build``) does what ``model_construct`` ends with: it sets the
instance's ``__dict__`` and pydantic's three slots, ``__pydantic_fields_set__``,
``__pydantic_extra__`` and ``__pydantic_private__``, with ``object.__setattr__`` (the
models may be frozen).

``probe`` checks, once per process, that a model built so on the installed pydantic is the
one ``model_construct`` builds; ``fits`` checks that a model class has nothing that the fast
path would skip (a ``model_post_init``, private attributes, extra fields).  Otherwise
``build`` takes ``model_construct``.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from saga_celery._internals import fall_back, fast_paths_allowed

FAST_PATH = "pydantic.build"
M = TypeVar("M", bound=BaseModel)

_SLOTS = frozenset(
    {"__dict__", "__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__"})
"""``BaseModel``'s slots as the fast path sets them: one more would be left unset."""

_set = object.__setattr__


class _Sample(BaseModel):
    """What the probe builds both ways: frozen, extra fields forbidden, as the saga's are."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    items: list[int]
    note: str | None = None


def build(cls: type[M], fields: dict[str, Any]) -> M:
    """A ``cls`` holding ``fields`` (every field, each value valid): nothing is validated
    or copied again, and ``fields`` becomes the model's own ``__dict__``."""
    if fits(cls):
        model = cls.__new__(cls)
        _set(model, "__dict__", fields)
        _set(model, "__pydantic_fields_set__", set(fields))
        _set(model, "__pydantic_extra__", None)
        _set(model, "__pydantic_private__", None)
        return model
    return cls.model_construct(**fields)


@functools.cache
def fits(cls: type[BaseModel]) -> bool:
    """Whether ``build`` may build ``cls`` by hand (``probe`` passed, and nothing of the
    class needs ``model_construct``); checked once per class and process."""
    if not probe():
        return False
    reason = _misfit(cls)
    return True if reason is None else fall_back(FAST_PATH, reason)


@functools.cache
def probe() -> bool:
    """Whether pydantic's internals are what the fast path expects; once per process.

    False, with one warning line, when they are not; False, silently, when
    ``SAGA_CELERY_FAST_PATHS`` turns the fast paths off.
    """
    if not fast_paths_allowed():
        return False
    reason = _mismatch()
    return True if reason is None else fall_back(FAST_PATH, reason)


def _mismatch() -> str | None:
    """Why a model built by hand would differ from ``model_construct``'s; None if not."""
    slots = set(getattr(BaseModel, "__slots__", ()))
    if slots != _SLOTS:
        return f"pydantic.BaseModel's slots are {sorted(slots)}, not {sorted(_SLOTS)}"
    fields: dict[str, Any] = {"name": "probe", "items": [1, 2], "note": None}
    try:
        reference = _Sample.model_construct(**fields)
        built = _Sample.__new__(_Sample)
        _set(built, "__dict__", dict(fields))
        _set(built, "__pydantic_fields_set__", set(fields))
        _set(built, "__pydantic_extra__", None)
        _set(built, "__pydantic_private__", None)
        same = _alike(built, reference)
    except Exception as exc:  # any surprise at all means: not the pydantic this expects
        return f"building a model by hand failed: {exc!r}"
    return None if same else "a model built by hand differs from model_construct's"


def _alike(built: BaseModel, reference: BaseModel) -> bool:
    """Whether two models hold the same in every slot, and compare and dump the same."""
    return all(getattr(built, slot) == getattr(reference, slot) for slot in _SLOTS) and (
        built == reference and built.model_dump() == reference.model_dump())


def _misfit(cls: type[BaseModel]) -> str | None:
    """What of ``cls`` needs ``model_construct``; None if nothing."""
    if cls.__pydantic_post_init__ is not None:
        return f"{cls.__name__} has a model_post_init"
    if cls.__private_attributes__:
        return f"{cls.__name__} has private attributes"
    if cls.model_config.get("extra") == "allow":
        return f"{cls.__name__} allows extra fields"
    return None
