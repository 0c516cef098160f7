"""What strategies and observers read: frozen values, with no shared memory behind them.

A `View` is what a strategy decides from; `BackendStats` is one backend's numbers in a
snapshot. Neither needs a segment: tests of strategies build views from plain lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import monotonic_ns


@dataclass(frozen=True, slots=True)
class View:
    """What a strategy may read: the eligible slots of one membership version, and live loads.

    `in_flight` and `latency` are indexed by slot and read without the lock; the other fields
    are fixed for the life of the view. Tests of strategies build one from plain lists.
    """

    version: int
    slots: tuple[int, ...]
    """Eligible slots, ascending: live and not ejected."""
    weights: Sequence[float]
    """Weight of each slot, scaled down while it warms up after entering rotation."""
    in_flight: Sequence[int]
    latency: Sequence[float]
    """Peak-EWMA latency in nanoseconds as last stored; 0.0 before a slot's first answer.
    Read it through `_latency.decayed` with `stamps` and `clock`: it decays with time."""
    expires_ns: int = 1 << 62
    """When an ejection ends, a warm-up advances or a penalty drops: rebuild the view by then."""
    panic: bool = False
    """Too few backends were eligible: `slots` holds every registered one instead."""
    penalties: Sequence[int] = ()
    """Recent failures of each slot, counted as calls in flight (`_latency` explains); empty
    when no slot has any (`penalized` is False)."""
    penalized: bool = False
    stamps: Sequence[int] = ()
    """When each slot's latency was last sampled (ns, `clock`'s time)."""
    clock: Callable[[], int] = monotonic_ns
    members: tuple[int, ...] = ()
    """Every slot in rotation, eligible or not (ejected, down): what a consistent-hash ring is
    built from, so that ejections only mask its points. Empty: the same as `slots`."""
    reported: Sequence[float] = ()
    """Weights computed from the backends' own load reports (0.0: none known yet)."""
    timed: bool = False
    """Whether calls chosen from this view have their latency recorded (`record_latency`)."""


@dataclass(frozen=True, slots=True)
class BackendStats:
    """One backend's numbers at one moment, the same from every attached process.

    Counts are since the backend was registered; times are seconds. `ejected_until` and
    `last_failure` are on the `time.monotonic()` clock (CLOCK_MONOTONIC, shared by every
    process of the machine). The ``recent_*`` fields and the percentiles cover the recent
    window (`window` seconds, about the last 10 s: see `RecentWindow` in `_latency`), not the
    backend's whole life. They depend on what this process saw before, so two snapshots
    compare equal when their shared numbers are equal, whatever their windows.
    """

    addr: str
    """``host:port``, canonical."""
    weight: int
    in_flight: int
    """Calls under way on it now, from every process."""
    requests: int
    """Calls that ended with an outcome (answer or failure), since it was registered;
    cancelled calls (an interrupt, a cancelled task) are not counted."""
    failures: int
    """Calls that raised (connection errors, timeouts, 5xx with `HttpBackend`)."""
    consecutive_failures: int
    """Failures since its last success: `failure_threshold` of them eject it."""
    ejected: bool
    """Passively ejected: out of rotation after consecutive failures, until `ejected_until`."""
    ejected_until: float | None
    """A `time.monotonic()` value in seconds, while ejected."""
    times_ejected: int
    """Ejections since it was registered; the n-th lasts n times `ejection_seconds`."""
    down: bool
    """Held out of rotation by failing active health checks."""
    draining: bool
    """Taking no new calls; removed once the calls in flight on it end."""
    effective_weight: float
    """`weight`, scaled down while the backend warms up after entering rotation."""
    last_failure: float | None
    """A `time.monotonic()` value in seconds: when it last failed."""
    latency_ewma: float | None
    """Peak-EWMA latency in seconds (what `peak_ewma` picks by); None before a first answer
    and after an ejection."""
    histogram: tuple[int, ...]
    """Calls with an outcome per latency bucket since it was registered; bucket ``i`` holds
    latencies below ``BUCKET_BOUNDS[i]`` seconds and at least the bound before it."""
    slot: int
    """Its index in the shared arrays (reused after it is unregistered)."""
    window: float | None = field(default=None, compare=False)
    """Seconds the recent numbers cover; None for a process's first snapshot, whose recent
    numbers cover the backend's whole life."""
    recent_requests: int = field(default=0, compare=False)
    """`requests` over the recent window."""
    recent_failures: int = field(default=0, compare=False)
    """`failures` over the recent window."""
    recent_histogram: tuple[int, ...] = field(default=(), compare=False)
    """`histogram` over the recent window."""
    p50: float | None = field(default=None, compare=False)
    """Median latency over the recent window, in seconds (within ~19%); None without calls."""
    p90: float | None = field(default=None, compare=False)
    """90th percentile latency over the recent window, in seconds."""
    p99: float | None = field(default=None, compare=False)
    """99th percentile latency over the recent window, in seconds."""

    @property
    def rate(self) -> float | None:
        """Requests per second over the recent window; None when there is no window."""
        return self.recent_requests / self.window if self.window else None

    @property
    def error_ratio(self) -> float | None:
        """Share of the recent window's requests that failed; None without requests."""
        return self.recent_failures / self.recent_requests if self.recent_requests else None


@dataclass(frozen=True, slots=True)
class Membership:
    """What a balancer keeps of one membership version: the view, and who is behind its slots."""

    view: View
    addrs: tuple[str | None, ...]
    """The address of every slot of `view.slots`, None for the others."""
    live: frozenset[str]
    """Every registered address, ejected or not."""
