"""What strategies and observers read: frozen values, with no shared memory behind them.

A `View` is what a strategy decides from; `BackendStats` is one backend's numbers in a
snapshot. Neither needs a segment: tests of strategies build views from plain lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class BackendStats:
    """One backend's numbers at one moment, the same from every attached process."""

    addr: str
    weight: int
    in_flight: int
    requests: int
    failures: int
    consecutive_failures: int
    ejected: bool
    ejected_until: float | None
    """A `time.monotonic()` value in seconds, while ejected."""
    times_ejected: int
    down: bool
    """Held out of rotation by failing active health checks."""
    draining: bool
    """Taking no new calls; removed once the calls in flight on it end."""
    effective_weight: float
    """`weight`, scaled down while the backend warms up after entering rotation."""
    last_failure: float | None
    latency_ewma: float | None
    """Peak-EWMA latency in seconds."""
    histogram: tuple[int, ...]
    """Completed calls per latency bucket (see `_layout.bucket_of`)."""
    slot: int


@dataclass(frozen=True, slots=True)
class Membership:
    """What a balancer keeps of one membership version: the view, and who is behind its slots."""

    view: View
    addrs: tuple[str | None, ...]
    """The address of every slot of `view.slots`, None for the others."""
    live: frozenset[str]
    """Every registered address, ejected or not."""
