"""Latency bookkeeping: a peak-sensitive moving average and histogram percentiles.

The average follows Finagle's peak EWMA: a sample above the average replaces it at once, so a
backend that turns slow is seen as slow on its first slow answer; below the average it decays
with a time constant, so recovery is believed only gradually. A failure is scored as at least
`FAILURE_PENALTY_NS`, so a backend that fails fast never looks fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._layout import bucket_floor_ns

DECAY_NS = 10_000_000_000
FAILURE_PENALTY_NS = 1_000_000_000


def peak_ewma(average: float, stamp_ns: int, sample_ns: float, now_ns: int) -> float:
    """The next average after `sample_ns` arrives at `now_ns`; 0.0 means "no data yet"."""
    if average <= 0.0 or sample_ns >= average:
        return float(sample_ns)
    weight = math.exp(-max(now_ns - stamp_ns, 0) / DECAY_NS)
    return average * weight + sample_ns * (1.0 - weight)


def sample_ns(latency_ns: int, failed: bool) -> float:
    """The latency a call counts as: its own, or for a failure at least a slow answer."""
    return float(max(latency_ns, FAILURE_PENALTY_NS) if failed else latency_ns)


def percentile_ns(counts: Sequence[int], fraction: float) -> int | None:
    """The latency below which `fraction` of the histogram's calls fell, or None if empty."""
    total = sum(counts)
    if total == 0:
        return None
    rank = fraction * total
    seen = 0
    for bucket, count in enumerate(counts):
        seen += count
        if seen >= rank and count:
            return _bucket_middle(bucket)
    return _bucket_middle(len(counts) - 1)


def _bucket_middle(bucket: int) -> int:
    low = bucket_floor_ns(bucket)
    return (low + bucket_floor_ns(bucket + 1)) // 2
