"""Configuration: durations, defaults, partial retries, and clear errors naming the field."""

from __future__ import annotations

from datetime import timedelta

import pytest

from saga_celery import SagaConfigError, SagaError
from saga_celery._core.config import resolve_config
from saga_celery._core.durations import parse_duration
from saga_celery._core.model import Backoff


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15 seconds", 15), ("1 second", 1), ("2 minutes", 120), ("1 hour", 3600),
     ("3 days", 259200), ("1 week", 604800), (1500, 1.5), (timedelta(seconds=7), 7)],
)
def test_durations(text: object, seconds: float) -> None:
    """Durations accept unit strings, milliseconds and timedeltas."""
    assert parse_duration(text).total_seconds() == seconds


def test_defaults_for_steps_and_rollbacks() -> None:
    """Unset config means 5 retries, 10 s exponential, 10 minute timeout."""
    config = resolve_config(owner="s")
    assert config.retries.limit == 5
    assert config.retries.delay == timedelta(seconds=10)
    assert config.retries.backoff == Backoff.EXPONENTIAL
    assert config.timeout == timedelta(minutes=10)


def test_partial_retries_take_defaults_for_the_rest() -> None:
    """A partial retries dict keeps the defaults for the fields it omits."""
    config = resolve_config(owner="s", retries={"limit": 1})
    assert config.retries.limit == 1
    assert config.retries.delay == timedelta(seconds=10)


def test_config_is_frozen() -> None:
    """The resolved config cannot be changed after decoration."""
    config = resolve_config(owner="s")
    with pytest.raises(ValueError, match="frozen"):
        config.timeout = timedelta(seconds=1)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"retries": {"limit": -1}}, "retries.limit"),
     ({"retries": {"delay": "soon"}}, "retries.delay"),
     ({"retries": {"backoff": "fibonacci"}}, "retries.backoff"),
     ({"retries": {"limti": 2}}, "retries.limti"),
     ({"timeout": "5 parsecs"}, "timeout"),
     ({"timeout": -5}, "timeout"),
     ({"timeout": 0}, "timeout"),
     ({"timeout": "0 seconds"}, "timeout"),
     ({"timeout": timedelta(0)}, "timeout")],
)
def test_bad_config_names_the_step_and_field(kwargs: dict[str, object], field: str) -> None:
    """Bad config raises SagaConfigError (a SagaError and ValueError) naming step and field."""
    with pytest.raises(SagaConfigError) as info:
        resolve_config(owner="shop.charge", **kwargs)
    assert isinstance(info.value, SagaError) and isinstance(info.value, ValueError)
    assert "shop.charge" in str(info.value) and field in str(info.value)
    assert info.value.__cause__ is not None


def test_timeout_must_be_greater_than_zero() -> None:
    """A zero timeout is refused (each pool would read it differently), saying it must be
    positive."""
    with pytest.raises(SagaConfigError, match=r"'shop\.charge'.*timeout.*greater than zero"):
        resolve_config(owner="shop.charge", timeout="0 seconds")


def test_zero_delays_stay_allowed() -> None:
    """A zero retry delay (retry at once) and a zero max_delay are valid durations."""
    config = resolve_config(owner="s", retries={"delay": 0, "max_delay": "0 seconds"})
    assert config.retries.delay == config.retries.max_delay == timedelta(0)
