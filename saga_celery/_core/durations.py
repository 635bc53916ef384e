"""Durations as users write them: ``"15 seconds"``, milliseconds, or a ``timedelta``.

Apart from the configuration models so that the error tree (``RetryLater``) can parse one
without a circle through ``config.py``.
"""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+?)s?\s*$")


def parse_duration(value: object) -> timedelta:
    """``"15 seconds"``, ``"2 minutes"``, a number of milliseconds, or a ``timedelta``."""
    if isinstance(value, timedelta):
        return _non_negative(value)
    if isinstance(value, bool):
        raise ValueError("a duration must be a string like '15 seconds', "
                         "milliseconds or a timedelta")
    if isinstance(value, int | float):
        return _non_negative(timedelta(milliseconds=value))
    if isinstance(value, str):
        match = _DURATION_RE.match(value.lower())
        if match and match.group(2) in _UNITS_S:
            return timedelta(seconds=float(match.group(1)) * _UNITS_S[match.group(2)])
    units = ", ".join(_UNITS_S)
    raise ValueError(f"invalid duration {value!r}: use e.g. '15 seconds' (units: {units}), "
                     "a number of milliseconds, or a timedelta")


def _non_negative(value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise ValueError(f"a duration cannot be negative (got {value})")
    return value
