"""`snapshot()` for programs: recent-window percentiles and rates, public bucket bounds."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from dispatcher import BUCKET_BOUNDS, Balancer, percentile
from dispatcher import _layout as L
from dispatcher._latency import Counters, RecentWindow
from tests.helpers import FakeClock

NS = 1_000_000_000
A, B = "127.0.0.1:7701", "127.0.0.1:7702"


def test_bucket_bounds_are_the_shared_histograms() -> None:
    assert len(BUCKET_BOUNDS) == L.BUCKETS
    assert BUCKET_BOUNDS[-1] == math.inf
    assert all(a <= b for a, b in itertools.pairwise(BUCKET_BOUNDS))
    for ns in [0, 1, 2, 3, 5, 999, 1000, 12_345_678, 10**9, 51 * 10**9, 10**13]:
        bucket = L.bucket_of(ns)
        low = BUCKET_BOUNDS[bucket - 1] if bucket else 0.0
        assert low <= ns / 1e9 < BUCKET_BOUNDS[bucket], ns


def test_percentile_is_in_seconds_and_checks_its_input() -> None:
    counts = [0] * L.BUCKETS
    assert percentile(counts, 0.5) is None
    counts[L.bucket_of(2_000_000)] = 90
    counts[L.bucket_of(300_000_000)] = 10
    p50, p99 = percentile(counts, 0.5), percentile(counts, 0.99)
    assert p50 is not None and abs(p50 - 0.002) / 0.002 < 0.19
    assert p99 is not None and abs(p99 - 0.3) / 0.3 < 0.19
    for wrong in (-0.1, 1.5):
        with pytest.raises(ValueError, match="q must"):
            percentile(counts, wrong)
    with pytest.raises(ValueError, match="buckets"):
        percentile([1, 2, 3], 0.5)


def counters(addr: str, requests: int, bucket: int = 40) -> dict[int, Counters]:
    histogram = [0] * L.BUCKETS
    histogram[bucket] = requests
    return {0: Counters(addr, requests, requests // 10, tuple(histogram))}


def test_the_window_is_the_last_10_to_12_seconds_of_frequent_snapshots() -> None:
    recent = RecentWindow()
    first = recent.observe(0, counters(A, 100))[0]
    assert first.window is None and first.requests == 100  # no base: the whole life
    seen = []
    for second in range(1, 40):
        seen.append(recent.observe(second * NS, counters(A, 100 + 10 * second))[0])
    assert [r.window for r in seen[:10]] == [float(s) for s in range(1, 11)]
    for r in seen[10:]:
        assert r.window is not None and 10 <= r.window < 12
        assert r.requests == 10 * r.window and r.failures == r.window
        assert sum(r.histogram) == r.requests


def test_a_slot_that_changed_hands_counts_from_its_registration() -> None:
    recent = RecentWindow()
    recent.observe(0, counters(A, 500))
    moved = recent.observe(3 * NS, counters(B, 20))[0]  # unregistered, B took the slot
    assert (moved.window, moved.requests) == (3.0, 20)
    again = recent.observe(6 * NS, counters(B, 900, bucket=41))[0]  # grew past the old counts
    assert again.requests == 900 and sum(again.histogram) == 900


class Clocked:
    """A backend whose call takes `request` seconds of the balancer's fake clock."""

    clock: FakeClock

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> str:
        Clocked.clock.advance(request)
        return self.addr


def test_snapshot_percentiles_and_rate_are_the_recent_windows() -> None:
    clock = Clocked.clock = FakeClock()
    with clock.use(Balancer([A], backend_factory=Clocked, monitor=False, latency=True)) as balancer:
        for _ in range(1000):
            balancer.invoke(0.001)
        (lifetime,) = balancer.snapshot()
        assert lifetime.window is None
        clock.advance(20.0)
        for _ in range(100):
            balancer.invoke(0.1)
        (recent,) = balancer.snapshot()
    assert lifetime.p50 is not None and abs(lifetime.p50 - 0.001) / 0.001 < 0.19
    assert recent.window is not None and abs(recent.window - 30.0) < 1e-6  # 20 s + 100 x 0.1 s
    assert recent.requests == 1100 and recent.recent_requests == 100
    assert recent.recent_failures == 0 and recent.error_ratio == 0.0
    assert recent.rate == pytest.approx(100 / 30.0)
    for p in (recent.p50, recent.p90, recent.p99):
        assert p is not None and abs(p - 0.1) / 0.1 < 0.19  # the slow calls, not the life's
    assert percentile(recent.histogram, 0.5) == lifetime.p50  # the life is still 1 ms
    assert recent == lifetime.__class__(**_fields(recent))  # windows do not compare


def _fields(stats: Any) -> dict[str, Any]:
    return {name: getattr(stats, name) for name in stats.__dataclass_fields__}
