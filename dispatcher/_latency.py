"""Latency and failure bookkeeping: a peak-sensitive moving average, recent failures, percentiles.

**Peak EWMA** (Finagle's and Linkerd's): a sample above the average replaces it at once, so a
backend that turns slow is seen as slow on its first slow answer; below the average it pulls
the average down with a time constant (`DECAY_NS`). Unlike the plain EWMA it decays when it is
*read* too, towards zero, so a backend that was slow once is not remembered as slow forever
for want of new answers; and an answer's average with no sample for `STALE_NS` is not
trusted at all: the backend counts as unmeasured, is tried again (once for the whole pool:
the first try is in flight for everyone to see), and its next answer starts a new average.
A failure's average (`FAILURE_PENALTY_NS` or more) is not forgotten that way: a backend that
failed or timed out is tried again once its decayed cost falls below its peers' (from 5 s to
5 ms peers, about 70 s), unless health checks bring it back first.

**Failures cost more than answers.** A failed call is scored as at least `FAILURE_PENALTY_NS`
and at least twice its own time, so a timeout costs more than any answer within it, and a
backend that fails fast never looks fast.

**Recent failures count as calls in flight.** Each failure adds one to a backend's failure
score, which decays with `FAILURE_DECAY_NS`; load-aware strategies add its whole part to the
backend's calls in flight (the "sinkholing" fix of the Google SRE book: count recent errors as
active requests), so a backend that answers 503 at once stops looking idle. The score is capped
at `FAILURE_SCORE_CAP`, so a backend that recovers is tried again within a few seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._layout import bucket_floor_ns

DECAY_NS = 10_000_000_000
"""Time constant of the peak EWMA: Finagle's and Linkerd's default."""
STALE_NS = 2_000_000_000
"""An average with no new sample for this long is not trusted: the backend is tried again."""
FAILURE_PENALTY_NS = 5_000_000_000
"""The least a failure is scored as (Linkerd scores a failure as a 5 s answer)."""
FAILURE_DECAY_NS = 1_000_000_000
"""Time constant of the failure score."""
FAILURE_SCORE_CAP = 16.0
"""Most recent failures counted: a backend that recovers is tried again within ~2.8 s."""


def decayed(average: float, stamp_ns: int, now_ns: int) -> float:
    """The average as read at `now_ns`: decayed towards 0, and 0.0 (unmeasured) once an
    answer's average is stale."""
    age = now_ns - stamp_ns
    if average <= 0.0 or (age >= STALE_NS and average < FAILURE_PENALTY_NS):
        return 0.0
    return average * math.exp(-max(age, 0) / DECAY_NS)


def peak_ewma(average: float, stamp_ns: int, sample_ns: float, now_ns: int) -> float:
    """The next average after `sample_ns` arrives at `now_ns`; 0.0 means "no data yet"."""
    current = decayed(average, stamp_ns, now_ns)
    if current <= 0.0 or sample_ns >= current:
        return float(sample_ns)
    weight = math.exp(-max(now_ns - stamp_ns, 0) / DECAY_NS)
    return current * weight + sample_ns * (1.0 - weight)


def sample_ns(latency_ns: int, failed: bool) -> float:
    """The latency a call counts as: its own, or for a failure more than any answer."""
    if failed:
        return float(max(2 * latency_ns, FAILURE_PENALTY_NS))
    return float(latency_ns)


def failure_score(score: float, stamp_ns: int, now_ns: int) -> float:
    """A backend's failure score as read at `now_ns`."""
    if score <= 0.0:
        return 0.0
    return score * math.exp(-max(now_ns - stamp_ns, 0) / FAILURE_DECAY_NS)


def failed_once_more(score: float, stamp_ns: int, now_ns: int) -> float:
    """The failure score after one more failure at `now_ns`."""
    return min(failure_score(score, stamp_ns, now_ns) + 1.0, FAILURE_SCORE_CAP)


def penalty_drops_at(score: float, stamp_ns: int, penalty: int) -> int:
    """When the whole part of a score, `penalty` now, falls below it."""
    return stamp_ns + math.ceil(FAILURE_DECAY_NS * math.log(score / penalty))


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
