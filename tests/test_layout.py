"""The pure parts: layout arithmetic, latency buckets, the ejection policy."""

from __future__ import annotations

import math

import pytest

from dispatcher import _layout as L
from dispatcher._latency import (
    FAILURE_DECAY_NS,
    FAILURE_PENALTY_NS,
    FAILURE_SCORE_CAP,
    STALE_NS,
    decayed,
    failed_once_more,
    failure_score,
    peak_ewma,
    penalty_drops_at,
    percentile_ns,
    sample_ns,
)
from dispatcher._policy import NS, EjectionPolicy
from dispatcher.errors import SegmentError


def test_regions_do_not_overlap_and_fill_the_size() -> None:
    lay = L.Layout(capacity=5, max_workers=3)
    assert lay.field(0) == L.HEADER_WORDS
    assert lay.field(L.SLOT_FIELDS) == lay.histogram
    assert lay.addresses == (lay.histogram + L.BUCKETS * 5) * L.WORD
    assert lay.workers * L.WORD == lay.addresses + 5 * L.ADDRESS_BYTES
    assert lay.size == (lay.workers + 3 * (L.W_HEADER + 5)) * L.WORD
    assert L.H_STRATEGY_NAME * L.WORD + L.NAME_BYTES <= L.HEADER_WORDS * L.WORD


def test_header_round_trip_and_rejections() -> None:
    lay = L.Layout(4, 2)
    words = memoryview(bytearray(lay.size)).cast("q")
    with pytest.raises(SegmentError, match="not a dispatcher segment"):
        L.read_layout(words, "x", lay.size)
    L.write_header(words, lay, owner_pid=123, owner_start=0)
    assert L.read_layout(words, "x", lay.size) == lay
    with pytest.raises(SegmentError, match="needs"):
        L.read_layout(words, "x", lay.size - 8)
    words[L.H_LAYOUT] = 99
    with pytest.raises(SegmentError, match="layout version 99"):
        L.read_layout(words, "x", lay.size)
    words[L.H_LAYOUT] = L.LAYOUT_VERSION
    words[L.H_CAPACITY] = 0
    with pytest.raises(SegmentError, match="corrupt"):
        L.read_layout(words, "x", lay.size)


def test_names_round_trip() -> None:
    buf = memoryview(bytearray(L.HEADER_WORDS * L.WORD))
    L.write_name(buf, L.H_LOCK_NAME, "/mp-abc123")
    assert L.read_name(buf, L.H_LOCK_NAME) == "/mp-abc123"
    with pytest.raises(ValueError, match="longer"):
        L.write_name(buf, L.H_LOCK_NAME, "x" * L.NAME_BYTES)


def test_buckets_are_monotonic_half_octaves() -> None:
    assert L.bucket_of(0) == 0
    previous = 0
    for ns in [1, 2, 3, 4, 5, 6, 7, 8, 100, 1000, 10**6, 10**9, 10**12]:
        assert L.bucket_of(ns) >= previous
        previous = L.bucket_of(ns)
    for bucket in range(3, L.BUCKETS):
        floor = L.bucket_floor_ns(bucket)
        assert L.bucket_of(floor) == bucket
        assert L.bucket_of(floor - 1) == bucket - 1
    assert L.bucket_of(10**15) == L.BUCKETS - 1


def test_percentiles_from_a_histogram() -> None:
    counts = [0] * L.BUCKETS
    assert percentile_ns(counts, 0.5) is None
    counts[L.bucket_of(1_000_000)] = 99
    counts[L.bucket_of(100_000_000)] = 1
    p50, p99, p100 = (percentile_ns(counts, f) for f in (0.5, 0.99, 1.0))
    assert p50 is not None and L.bucket_of(p50) == L.bucket_of(1_000_000)
    assert p99 == p50
    assert p100 is not None and L.bucket_of(p100) == L.bucket_of(100_000_000)


def test_peak_ewma_jumps_up_decays_when_read_and_forgets_when_stale() -> None:
    assert peak_ewma(0.0, 0, 5.0, 0) == 5.0
    assert peak_ewma(10.0, 0, 50.0, 1) == 50.0
    assert peak_ewma(100.0, 0, 0.0, 0) == 100.0
    # Read a second later, an average has decayed by e^-0.1 towards zero...
    assert decayed(100.0, 0, NS) == pytest.approx(100 * math.exp(-0.1))
    # ...and a sample below it pulls it down from there.
    w = math.exp(-0.1)
    assert peak_ewma(100.0, 0, 0.0, NS) == pytest.approx(100 * w * w)
    # An average with no sample for STALE_NS is not trusted: unmeasured, then started anew.
    assert decayed(100.0, 0, STALE_NS) == 0.0
    assert peak_ewma(500.0, 0, 5.0, STALE_NS) == 5.0


def test_failures_cost_more_than_any_answer_and_add_up_as_calls_in_flight() -> None:
    assert sample_ns(1000, failed=True) == FAILURE_PENALTY_NS
    assert sample_ns(4 * FAILURE_PENALTY_NS, failed=True) == 8 * FAILURE_PENALTY_NS
    assert sample_ns(1000, failed=False) == 1000
    score = 0.0
    for _ in range(3):
        score = failed_once_more(score, 0, 0)
    assert score == 3.0
    assert int(failure_score(score, 0, FAILURE_DECAY_NS)) == 1  # 3 / e
    drop = penalty_drops_at(score, 0, 3)
    assert int(failure_score(score, 0, drop - 1)) == 3 > int(failure_score(score, 0, drop + 1))
    for _ in range(100):
        score = failed_once_more(score, 0, 0)
    assert score == FAILURE_SCORE_CAP


def test_ejection_policy() -> None:
    policy = EjectionPolicy.from_seconds(5, 30.0, 300.0, 50)
    assert [policy.duration_ns(t) // NS for t in (1, 2, 3, 10, 11)] == [30, 60, 90, 300, 300]
    assert policy.may_eject(live=2, ejected=0)
    assert not policy.may_eject(live=1, ejected=0)
    assert not policy.may_eject(live=2, ejected=1)
    assert policy.may_eject(live=4, ejected=1)
    assert not policy.may_eject(live=4, ejected=2)
    assert EjectionPolicy(max_ejected_percent=0).may_eject(live=8, ejected=0)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((0, 30.0, 300.0, 50), ValueError),
        ((5, -1.0, 300.0, 50), ValueError),
        ((5, float("nan"), 300.0, 50), ValueError),
        ((5, float("inf"), 300.0, 50), ValueError),
        ((5, 30.0, 10.0, 50), ValueError),
        ((5, 30.0, 300.0, 101), ValueError),
        ((5.0, 30.0, 300.0, 50), TypeError),
        ((True, 30.0, 300.0, 50), TypeError),
        ((5, "30", 300.0, 50), TypeError),
    ],
)
def test_policy_rejects_bad_arguments(args: tuple[object, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        EjectionPolicy.from_seconds(*args)  # type: ignore[arg-type]
