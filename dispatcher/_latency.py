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

**Recent windows.** The shared histogram only grows: it holds a backend's whole life, where a
p99 barely moves on a long-running server. The recent numbers of a snapshot are the
difference between this snapshot's counters and those of an earlier snapshot taken in the
same process, kept by `RecentWindow`: the observer does the work, so a call's hot path does
none.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import sub

from ._layout import BUCKETS, bucket_floor_ns

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


WINDOW_S = 10.0
"""The recent window of a snapshot: its numbers cover the last 10 to 12 seconds (see
`RecentWindow`)."""

BUCKET_BOUNDS: tuple[float, ...] = (
    *(max(bucket_floor_ns(bucket + 1), 2) / 1e9 for bucket in range(BUCKETS - 1)),
    math.inf,
)
"""Upper bound, in seconds, of each latency bucket of `BackendStats.histogram`.

Bucket ``i`` holds the calls that took at least ``BUCKET_BOUNDS[i - 1]`` (0 for the first)
and less than ``BUCKET_BOUNDS[i]``; the last is unbounded, and bucket 1 is always empty (its
bounds are equal). Two buckets per power of two of nanoseconds, so a percentile read from
them is within about 19% of the true value.
"""


def decayed(average: float, stamp_ns: int, now_ns: int) -> float:
    """The average as read at `now_ns`: decayed towards 0, and 0.0 (unmeasured) once an
    answer's average is stale."""
    age = now_ns - stamp_ns
    if average <= 0.0 or (age >= STALE_NS and average < FAILURE_PENALTY_NS):
        return 0.0
    return average * math.exp(-max(age, 0) / DECAY_NS)


def peak_ewma(average: float, stamp_ns: int, sample_ns: float, now_ns: int) -> float:
    """The next average after `sample_ns` arrives at `now_ns`; 0.0 means "no data yet".

    `decayed` and the step towards the sample share one weight: the average decays for its
    age, and the sample moves it by as much.
    """
    age = now_ns - stamp_ns
    if average <= 0.0 or (age >= STALE_NS and average < FAILURE_PENALTY_NS):
        return float(sample_ns)
    weight = math.exp(-max(age, 0) / DECAY_NS)
    current = average * weight
    if current <= 0.0 or sample_ns >= current:
        return float(sample_ns)
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


def percentiles_ns(counts: Sequence[int], fractions: Sequence[float]) -> list[int | None]:
    """`percentile_ns` for several fractions at once: one pass over the histogram."""
    cumulative = list(accumulate(counts))
    total = cumulative[-1] if cumulative else 0
    if total == 0:
        return [None] * len(fractions)
    found: list[int | None] = []
    for fraction in fractions:
        bucket = bisect_left(cumulative, fraction * total)
        while bucket < len(counts) - 1 and not counts[bucket]:
            bucket += 1
        found.append(_bucket_middle(min(bucket, len(counts) - 1)))
    return found


def percentile(histogram: Sequence[int], q: float) -> float | None:
    """The latency, in seconds, below which a share `q` (0 to 1) of a histogram's calls fell.

    `histogram` is a `BackendStats.histogram` or `recent_histogram` (counts per bucket of
    `BUCKET_BOUNDS`); the answer is the middle of the bucket that holds the rank, so within
    about 19% of the true value. None when the histogram is empty.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be within 0 and 1, not {q!r}")
    if len(histogram) != BUCKETS:
        raise ValueError(f"a histogram has {BUCKETS} buckets, not {len(histogram)}")
    ns = percentile_ns(histogram, q)
    return None if ns is None else ns / 1e9


def _bucket_middle(bucket: int) -> int:
    low = bucket_floor_ns(bucket)
    return (low + bucket_floor_ns(bucket + 1)) // 2


@dataclass(frozen=True, slots=True)
class Counters:
    """What a snapshot keeps of one backend to diff against later: its growing counters."""

    addr: str
    requests: int
    failures: int
    histogram: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Recent:
    """One backend's numbers over the recent window."""

    window: float | None
    """Seconds covered; None when there was no earlier snapshot (the backend's whole life)."""
    requests: int
    failures: int
    histogram: tuple[int, ...]


class RecentWindow:
    """The earlier snapshots of one process, to turn growing counters into recent numbers.

    A snapshot is kept when the newest one kept is at least a fifth of the window old; the
    base of a new snapshot is the newest kept one that is at least `window_ns` old, or the
    oldest there is. So when snapshots are taken at least every 2 s (the dashboard, `top`, a
    metrics scrape), the recent numbers cover the last 10 to 12 s; a program that takes them
    rarely gets the time since its previous one, and the first snapshot of a process covers
    the whole life of each backend (`window` None). A backend whose slot changed hands since
    the base (unregistered, registered again) is counted from its registration.
    """

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window_ns = round(window_s * 1e9)
        self._history: deque[tuple[int, dict[int, Counters]]] = deque()
        self._lock = threading.Lock()

    def observe(self, now_ns: int, counters: dict[int, Counters]) -> dict[int, Recent]:
        """The recent numbers of each slot in `counters` (taken at `now_ns`); keep them."""
        with self._lock:
            history = self._history
            while len(history) > 1 and now_ns - history[1][0] >= self._window_ns:
                history.popleft()
            base = history[0] if history else None
            if not history or now_ns - history[-1][0] >= self._window_ns // 5:
                history.append((now_ns, counters))
        if base is None or base[0] >= now_ns:
            return {
                slot: Recent(None, c.requests, c.failures, c.histogram)
                for slot, c in counters.items()
            }
        window = (now_ns - base[0]) / 1e9
        return {slot: _diff(window, c, base[1].get(slot)) for slot, c in counters.items()}


def _diff(window: float, now: Counters, then: Counters | None) -> Recent:
    if then is None or then.addr != now.addr or then.requests > now.requests:
        return Recent(window, now.requests, now.failures, now.histogram)
    histogram = tuple(map(sub, now.histogram, then.histogram))
    if min(histogram, default=0) < 0:  # the slot changed hands and outgrew its old counts
        return Recent(window, now.requests, now.failures, now.histogram)
    return Recent(
        window, now.requests - then.requests, max(now.failures - then.failures, 0), histogram
    )
