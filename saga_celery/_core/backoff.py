"""Retry delays: constant, linear and exponential, with a cap and optional full jitter.

Exponential is Celery's ``get_exponential_backoff_interval`` (``factor * 2**retries``, capped,
full jitter uniform between 0 and the capped value) computed in float milliseconds, so
sub-second delays work; ``tests/unit/test_backoff.py`` pins the equivalence.  Pure: the
caller supplies the random draw.
"""

from __future__ import annotations

from saga_celery._core.model import Backoff, Policy


def retry_delay_ms(policy: Policy, failed_attempt: int, *, draw: float = 1.0) -> float:
    """Delay before the retry that follows attempt ``failed_attempt`` of the current budget.

    ``failed_attempt`` is 1-based within the budget; ``draw`` is a uniform random number in
    [0, 1] used only when the policy has jitter.
    """
    n = max(failed_attempt, 1)
    base = policy.delay_ms
    if policy.backoff == Backoff.CONSTANT:
        delay = base
    elif policy.backoff == Backoff.LINEAR:
        delay = base * n
    else:
        delay = base * 2 ** (n - 1)
    if policy.max_delay_ms is not None:
        delay = min(delay, policy.max_delay_ms)
    if policy.jitter:
        delay *= min(max(draw, 0.0), 1.0)
    return max(delay, 0.0)


def may_retry(policy: Policy, failed_attempt: int) -> bool:
    """Whether attempt ``failed_attempt`` (1-based within its budget) leaves a retry."""
    return failed_attempt <= policy.limit
