"""Validation of user-supplied numbers, with errors that name the argument and the value."""

from __future__ import annotations

import math

MAX_WEIGHT = 1_000_000
"""Largest backend weight: far above any real ratio, small enough for exact float shares."""


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """`value` if it is an int (not a bool) in [low, high]; TypeError or ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"in {low}-{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, not {value!r}")
    return value


def check_seconds(name: str, value: object, *, high: float = 1e9) -> float:
    """`value` if it is a positive, finite number of seconds no larger than `high`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(value) and 0 < value <= high):
        raise ValueError(f"{name} must be a positive, finite number of seconds, not {value!r}")
    return float(value)
