"""Retry delays for each backoff kind, and equivalence with Celery's exponential helper."""

from __future__ import annotations

import pytest
from celery.utils.time import get_exponential_backoff_interval

from saga_celery._core.backoff import may_retry, retry_delay_ms
from saga_celery._core.config import resolve_config
from saga_celery._core.model import Policy


def _policy(**retries: object) -> Policy:
    return resolve_config(owner="t", retries=retries).policy()


def test_constant_linear_exponential_delays() -> None:
    """constant d, linear d·n, exponential d·2^(n-1), n = the attempt that just failed."""
    constant = _policy(delay="1 second", backoff="constant")
    linear = _policy(delay="1 second", backoff="linear")
    exponential = _policy(delay="1 second", backoff="exponential")
    assert [retry_delay_ms(constant, n) for n in (1, 2, 3)] == [1000, 1000, 1000]
    assert [retry_delay_ms(linear, n) for n in (1, 2, 3)] == [1000, 2000, 3000]
    assert [retry_delay_ms(exponential, n) for n in (1, 2, 3, 4)] == [1000, 2000, 4000, 8000]


def test_max_delay_caps_every_kind() -> None:
    """max_delay caps a single delay."""
    p = _policy(delay="1 second", backoff="exponential", max_delay="3 seconds")
    assert [retry_delay_ms(p, n) for n in (1, 2, 3, 4)] == [1000, 2000, 3000, 3000]


def test_sub_second_delays_are_kept_in_float() -> None:
    """Millisecond delays are not rounded to whole seconds."""
    assert retry_delay_ms(_policy(delay=250, backoff="exponential"), 2) == 500.0


def test_full_jitter_scales_by_the_draw() -> None:
    """With jitter the delay is uniform in [0, computed]: the draw picks the point."""
    p = _policy(delay="2 seconds", backoff="exponential", jitter=True)
    assert retry_delay_ms(p, 2, draw=0.25) == 1000.0
    assert retry_delay_ms(p, 2, draw=0.0) == 0.0
    assert retry_delay_ms(p, 2, draw=1.0) == 4000.0


@pytest.mark.parametrize("factor", [1, 3, 10])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_exponential_matches_celerys_helper(factor: int, n: int) -> None:
    """Exponential backoff is Celery's formula (retries = n-1), capped the same way."""
    cap = 100
    p = _policy(delay=f"{factor} seconds", backoff="exponential", max_delay=f"{cap} seconds")
    celery_s = get_exponential_backoff_interval(factor, n - 1, cap, full_jitter=False)
    assert retry_delay_ms(p, n) == celery_s * 1000


def test_limit_counts_retries_after_the_first_attempt() -> None:
    """limit 0 allows one attempt; limit 2 allows three."""
    assert not may_retry(_policy(limit=0), 1)
    assert may_retry(_policy(limit=2), 2) and not may_retry(_policy(limit=2), 3)
