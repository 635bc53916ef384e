"""Step and rollback configuration: durations, retries, timeouts (validated with pydantic)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from saga_celery._core.durations import parse_duration
from saga_celery._core.model import Backoff, Policy
from saga_celery._errors import SagaConfigError


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be greater than zero")
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_positive)]
"""A timeout: zero would mean "no limit" to one pool and "fail at once" to another."""


class RetryConfig(BaseModel):
    """How often, and how long apart, a failed attempt is tried again."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    limit: int = Field(default=5, ge=0, strict=True)
    """Retries after the first attempt: limit 0 means one attempt only."""
    delay: Duration = timedelta(seconds=10)
    """Base delay before a retry."""
    backoff: Backoff = Backoff.EXPONENTIAL
    """constant: delay; linear: delay·n; exponential: delay·2^(n-1) (n = failed attempt)."""
    max_delay: Duration | None = None
    """Upper bound of any single delay."""
    jitter: bool = Field(default=False, strict=True)
    """Full jitter (Celery's): a uniformly random delay between 0 and the computed one."""


class StepConfig(BaseModel):
    """The resolved, frozen configuration of one step or one rollback handler."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    retries: RetryConfig = RetryConfig()
    """Retry policy of each attempt."""
    timeout: PositiveDuration = timedelta(minutes=10)
    """Per attempt: an attempt running longer fails (and is retried like any failure)."""

    def policy(self) -> Policy:
        r = self.retries
        return Policy(
            limit=r.limit,
            delay_ms=_ms(r.delay),
            backoff=r.backoff,
            max_delay_ms=None if r.max_delay is None else _ms(r.max_delay),
            jitter=r.jitter,
            timeout_ms=_ms(self.timeout),
        )


def _ms(value: timedelta) -> float:
    return value.total_seconds() * 1000.0


def resolve_config(
    *, owner: str, retries: object = None, timeout: object = None
) -> StepConfig:
    """Validate user-facing ``retries``/``timeout`` into a ``StepConfig``.

    Raises ``SagaConfigError`` naming ``owner`` (the step or rollback) and the bad field.
    """
    data: dict[str, Any] = {}
    if retries is not None:
        data["retries"] = retries
    if timeout is not None:
        data["timeout"] = timeout
    try:
        return StepConfig.model_validate(data)
    except ValidationError as exc:
        raise SagaConfigError(_describe(owner, exc), step=owner) from exc


def _describe(owner: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "config"
        problems.append(f"{field}: {err['msg']} (got {err.get('input')!r})")
    return f"invalid configuration for {owner!r}: " + "; ".join(problems)
