"""The ``__saga__`` keyword argument that tells a task which saga attempt it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from saga_celery._core.model import Kind
from saga_celery._errors import SagaError, SagaFormatError

CONTROL_KEY = "__saga__"

MESSAGE_FORMAT = 2
"""The format of the control kwarg this release writes (``v``; absent in 0.1.0's: 1).  A
message in a newer one is refused (``SagaFormatError``), not misread."""

_TEXT = ("saga_id", "key", "step")
_NUMBERS = ("count", "attempt")
_KINDS = {kind.value: kind for kind in (Kind.STEP, Kind.ROLLBACK)}
"""What a task message runs (a ``wake`` is a timer's, never a message's: ``timers.py``)."""


@dataclass(frozen=True, slots=True)
class Control:
    """Which saga, step (or its rollback), count and attempt a message carries.

    A plain dataclass read and written by hand: every saga message carries one, and
    building, dumping and validating it through pydantic cost a saga step measurably
    (bench/RESULTS.md).
    """

    saga_id: str
    kind: Kind
    key: str
    step: str
    count: int
    attempt: int
    after: int | None = None
    """The saga version whose commit sent this message: a start that finds an older
    version waits for that commit (the message comes back) instead of dropping it."""
    behind: int = 0
    """How many times this message came back because the store did not show that commit
    yet (each wait is longer)."""

    @classmethod
    def parse(cls, value: object) -> Control:
        """The control of a received message; ``SagaError`` naming what is wrong with it.

        Keys it does not know are ignored, so an older worker reads a newer message.
        """
        if type(value) is dict and value.get("v", 1) in (1, MESSAGE_FORMAT):  # every message
            saga_id, kind, key = value.get("saga_id"), value.get("kind"), value.get("key")
            step, count, attempt = value.get("step"), value.get("count"), value.get("attempt")
            after, behind = value.get("after"), value.get("behind", 0)
            if (type(saga_id) is str and type(key) is str and type(step) is str
                    and type(count) is int and type(attempt) is int and count > 0
                    and attempt > 0 and type(kind) is str and kind in _KINDS
                    and (after is None or (type(after) is int and after > 0))
                    and type(behind) is int and behind >= 0):
                return cls(saga_id, _KINDS[kind], key, step, count, attempt, after, behind)
        return cls._checked(value)

    @classmethod
    def _checked(cls, value: object) -> Control:
        """``parse`` the slow way, naming the first thing wrong."""
        if not isinstance(value, dict):
            raise SagaError(f"the {CONTROL_KEY!r} kwarg of a saga message must be a dict, "
                            f"got {type(value).__name__}")
        _check_format(value)
        for name in (*_TEXT, "kind"):
            if not isinstance(value.get(name), str):
                raise _invalid(value, name, "a string")
        for name in _NUMBERS:
            number = value.get(name)
            if not isinstance(number, int) or isinstance(number, bool) or number < 1:
                raise _invalid(value, name, "a positive integer")
        after = value.get("after")
        if after is not None and (not isinstance(after, int) or isinstance(after, bool)
                                  or after < 1):
            raise _invalid(value, "after", "a positive integer or absent")
        behind = value.get("behind", 0)
        if not isinstance(behind, int) or isinstance(behind, bool) or behind < 0:
            raise _invalid(value, "behind", "a non-negative integer or absent")
        kind = _KINDS.get(value["kind"])
        if kind is None:
            raise _invalid(value, "kind", f"one of {', '.join(_KINDS)}")
        return cls(saga_id=value["saga_id"], kind=kind, key=value["key"], step=value["step"],
                   count=value["count"], attempt=value["attempt"], after=after, behind=behind)

    def as_kwarg(self) -> dict[str, Any]:
        """What the message carries under ``__saga__``: JSON types only."""
        out: dict[str, Any] = {"v": MESSAGE_FORMAT, "saga_id": self.saga_id,
                               "kind": self.kind.value, "key": self.key, "step": self.step,
                               "count": self.count, "attempt": self.attempt}
        if self.after is not None:
            out["after"] = self.after
        if self.behind:
            out["behind"] = self.behind
        return out

    def kwargs_repr(self) -> str:
        """What Celery events and Flower show instead of the kwargs: ids, never payloads.

        ``saga_id`` comes first so Flower's ``kwargs:saga_id=<id>`` search matches it.
        """
        return (f"{{'saga_id': {self.saga_id!r}, 'step': {self.step!r}, "
                f"'count': {self.count!r}, 'attempt': {self.attempt!r}, "
                f"'kind': {self.kind.value!r}}}")


def _check_format(value: dict[Any, Any]) -> None:
    """Refuse a message in a format newer than this release reads (or none at all)."""
    written = value.get("v", 1)
    if not isinstance(written, int) or isinstance(written, bool) or written < 1:
        raise _invalid(value, "v", "a positive integer or absent")
    if written > MESSAGE_FORMAT:
        saga_id = value.get("saga_id")
        raise SagaFormatError(
            f"a saga message in format {written}, sent by a newer saga_celery; this release "
            f"reads formats up to {MESSAGE_FORMAT}: it is handed back for a worker that "
            "reads it", saga_id=saga_id if isinstance(saga_id, str) else None)


def _invalid(value: dict[Any, Any], name: str, expected: str) -> SagaError:
    saga_id = value.get("saga_id")
    return SagaError(f"the {CONTROL_KEY!r} kwarg of a saga message is invalid: {name!r} must "
                     f"be {expected}, got {value.get(name)!r}",
                     saga_id=saga_id if isinstance(saga_id, str) else None)


def split_control(kwargs: dict[str, Any]) -> tuple[Control | None, dict[str, Any]]:
    """The control (None outside a saga) and the user's own kwargs."""
    if CONTROL_KEY not in kwargs:
        return None, kwargs
    rest = kwargs.copy()
    return Control.parse(rest.pop(CONTROL_KEY)), rest
