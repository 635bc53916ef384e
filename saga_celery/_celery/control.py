"""The ``__saga__`` keyword argument that tells a task which saga attempt it runs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from saga_celery._core.model import Kind

CONTROL_KEY = "__saga__"


class Control(BaseModel):
    """Which saga, step (or its rollback), count and attempt a message carries."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    saga_id: str
    kind: Kind
    key: str
    step: str
    count: int
    attempt: int

    def kwargs_repr(self) -> str:
        """What Celery events and Flower show instead of the kwargs: ids, never payloads.

        ``saga_id`` comes first so Flower's ``kwargs:saga_id=<id>`` search matches it.
        """
        return repr({"saga_id": self.saga_id, "step": self.step, "count": self.count,
                     "attempt": self.attempt, "kind": self.kind.value})


def split_control(kwargs: dict[str, Any]) -> tuple[Control | None, dict[str, Any]]:
    """The control (None outside a saga) and the user's own kwargs."""
    if CONTROL_KEY not in kwargs:
        return None, kwargs
    rest = {k: v for k, v in kwargs.items() if k != CONTROL_KEY}
    return Control.model_validate(kwargs[CONTROL_KEY]), rest
