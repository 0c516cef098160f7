"""Validation of user-supplied numbers, with errors that name the argument and the value."""

from __future__ import annotations

import math

MAX_WEIGHT = 1_000_000
"""Largest backend weight: far above any real ratio, small enough for exact float shares."""
MAX_COUNT = 1 << 32
"""Largest count an argument may give when nothing smaller applies: it must fit a word."""


def check_int(name: str, value: object, low: int, high: int = MAX_COUNT) -> int:
    """`value` if it is an int (not a bool) in [low, high]; TypeError or ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        shown = repr(value) if value.bit_length() < 64 else f"a {value.bit_length()}-bit number"
        raise ValueError(f"{name} must be in {low}-{high}, not {shown}")
    return value


def check_seconds(name: str, value: object, *, high: float = 1e9) -> float:
    """`value` if it is a positive, finite number of seconds no larger than `high`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if isinstance(value, int) and value.bit_length() > 64:
        raise ValueError(f"{name} must be at most {high:g} seconds, not a huge integer")
    if not (math.isfinite(value) and 0 < value <= high):
        raise ValueError(f"{name} must be a positive, finite number of seconds, not {value!r}")
    return float(value)
