"""How a balancer chooses a backend: the `Strategy` protocol and the built-in strategies.

A strategy is pure: it reads a `View` (the eligible slots and their live loads, shared by every
process) and returns one of `view.slots`. It takes no lock and does no I/O; the balancer
commits its choice under the shared lock and asks again if the view went stale meanwhile.

To add one, write a class with `uses_cursor` and `pick`, and pass an instance as
``Balancer(strategy=...)``; to make it available by name, add it to `STRATEGIES`.

Anything a strategy derives from the slots and weights (a schedule, prefix sums, a hash ring)
is built once per view and kept until the view changes; a pick rebuilds none of it. Views
change with membership and, during slow start, as weights ramp up; between those changes the
same `View` object is handed to every pick.

Strategies that draw random numbers take a `seed` for tests. A forked child (os.fork,
gunicorn, multiprocessing's fork) and an unpickled copy (spawn) each draw a fresh seed: worker
processes that made the same random choices would herd onto the same backends together.
Pickling carries only the constructor's arguments, never caches or generator state.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import os
import random
import weakref
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate, chain
from operator import add, itemgetter
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from ._checks import check_seconds
from ._core import speedups
from ._latency import FAILURE_PENALTY_NS, decayed
from ._orca import BLACKOUT_NS, ERROR_PENALTY, REPORT_EXPIRY_NS, Weighing
from ._view import View

T = TypeVar("T")

MAX_SCHEDULE = 1024
"""Longest smooth weighted round-robin cycle; larger weight sums are scaled down to fit."""
WEIGHT_RESOLUTION = 100
"""Fractional weights (slow start) are rounded to 1/100 of a unit before building a schedule."""
RING_POINTS = 160
"""Points per backend on the consistent-hash ring, as ketama and NGINX's `hash consistent`."""
UNMEASURED_NS = float(FAILURE_PENALTY_NS)
"""What `PeakEwma` assumes of an unmeasured backend that is already busy with a first call."""


@runtime_checkable
class Strategy(Protocol):
    """Chooses a slot from a `View`.

    `uses_cursor`: the choice depends on `cursor`, the balancer's shared pick counter. Such a
    choice is committed only if no other pick, in any process, advanced the cursor meanwhile,
    which is what makes a shared round-robin exact. Strategies that ignore the cursor get -1.
    `key` is a stable 64-bit hash of the caller's ``key=``, identical in every process, or None.
    """

    uses_cursor: bool

    def pick(self, view: View, cursor: int, key: int | None) -> int: ...


class _PerView(Generic[T]):
    """A structure derived from a view's slots and weights, rebuilt only when those change.

    Keyed by the view object first (the balancer reuses it between refreshes), then by its
    version, slots and weights, so a refreshed but unchanged view keeps the structure. The
    entry is replaced in one assignment, so threads sharing a strategy never see half of one.
    """

    __slots__ = ("_build", "_entry")

    def __init__(self, build: Callable[[View], T]) -> None:
        self._build = build
        self._entry: tuple[View, T] | None = None

    def get(self, view: View) -> T:
        entry = self._entry
        if entry is not None:
            old, value = entry
            if old is view:
                return value
            if (
                old.version == view.version
                and old.slots == view.slots
                and old.weights == view.weights
            ):
                self._entry = (view, value)
                return value
        value = self._build(view)
        self._entry = (view, value)
        return value


class _Sampler:
    """Draws one or two distinct slots, uniformly or in proportion to weight, in O(log n)."""

    __slots__ = ("prefix", "slots", "total")

    def __init__(self, view: View, weighted: bool = True) -> None:
        self.slots = view.slots
        weights = [float(view.weights[s]) for s in self.slots]
        self.prefix: list[float] | None = None
        self.total = 0.0
        if weighted and weights and min(weights) != max(weights) and max(weights) > 0:
            self.prefix = list(accumulate(max(w, 0.0) for w in weights))
            self.total = self.prefix[-1]

    def one(self, rng: random.Random) -> int:
        slots, prefix = self.slots, self.prefix
        if prefix is None:
            return slots[rng.randrange(len(slots))]
        return slots[min(bisect_right(prefix, rng.random() * self.total), len(slots) - 1)]

    def two(self, rng: random.Random) -> tuple[int, int]:
        """Two different slots; needs at least two."""
        slots, prefix = self.slots, self.prefix
        n = len(slots)
        if prefix is None:
            i = rng.randrange(n)
            j = rng.randrange(n - 1)
            return slots[i], slots[j + (j >= i)]
        i = min(bisect_right(prefix, rng.random() * self.total), n - 1)
        low = prefix[i - 1] if i else 0.0
        width = prefix[i] - low
        # Draw from the weight of the others and step over the first one's interval.
        r = rng.random() * (self.total - width)
        if r >= low:
            r += width
        j = min(bisect_right(prefix, r), n - 1)
        if j == i:
            j = i + 1 if i + 1 < n else i - 1
        return slots[i], slots[j]


_randomised: weakref.WeakSet[_Randomised] = weakref.WeakSet()


class _Randomised:
    """Base of the strategies that draw random numbers: a seed for tests, fresh per process.

    Subclasses list their constructor arguments in `_params` (pickling carries only those)
    and build their per-process state in `_start`.
    """

    _params: ClassVar[tuple[str, ...]] = ("seed",)

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._begin(seed)

    def _begin(self, seed: int | None) -> None:
        self._rng = random.Random(seed)
        self._start()
        _randomised.add(self)

    def _start(self) -> None:
        """Build this process's caches."""

    def _reseed(self) -> None:
        self._rng.seed()

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._params}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self._begin(None)

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._params)
        return f"{type(self).__name__}({args})"


def _reseed_after_fork() -> None:
    for strategy in list(_randomised):
        strategy._reseed()


os.register_at_fork(after_in_child=_reseed_after_fork)


class RoundRobin:
    """Each eligible backend in turn, from one cursor shared by every process.

    Ignores weights, so slow start does not apply: use `WeightedRoundRobin` for either.
    """

    name: ClassVar[str] = "round_robin"
    uses_cursor = True

    def pick(self, view: View, cursor: int, key: int | None) -> int:
        slots = view.slots
        return slots[cursor % len(slots)]


class Random(_Randomised):
    """A uniformly random eligible backend (Envoy's RANDOM).

    Needs no shared cursor, so picks never contend for it. Ignores weights and thus slow start:
    use `WeightedRandom` for either.
    """

    name: ClassVar[str] = "random"
    uses_cursor = False

    def pick(self, view: View, cursor: int, key: int | None) -> int:
        slots = view.slots
        return slots[self._rng.randrange(len(slots))]


def _integer_weights(weights: Sequence[float]) -> list[int]:
    """Small positive integers in the proportions of `weights`, summing to about MAX_SCHEDULE
    at most. Integral weights stay exact (1:3 gives a cycle of 4); fractional ones, as slow
    start makes them, are rounded to WEIGHT_RESOLUTION."""
    if all(w == int(w) for w in weights):
        ints = [max(1, int(w)) for w in weights]
    else:
        ints = [max(1, round(w * WEIGHT_RESOLUTION)) for w in weights]
    total = sum(ints)
    if total > MAX_SCHEDULE:
        ints = [max(1, round(i * MAX_SCHEDULE / total)) for i in ints]
    divisor = math.gcd(*ints)
    return [i // divisor for i in ints]


def smooth_schedule(slots: Sequence[int], weights: Sequence[int]) -> tuple[int, ...]:
    """One cycle of NGINX's smooth weighted round-robin over `slots` with integer `weights`.

    Each step adds every weight to its peer's current value, takes the highest (the first on
    a tie) and subtracts the total from it. Over a cycle each slot appears `weight` times, and
    the picks of each slot are spread evenly instead of coming in a burst.
    """
    total = sum(weights)
    n = len(slots)
    current = [0] * n
    order = []
    for _ in range(total):
        best, top = 0, current[0] + weights[0]
        current[0] = top
        for i in range(1, n):
            value = current[i] + weights[i]
            current[i] = value
            if value > top:
                best, top = i, value
        current[best] -= total
        order.append(slots[best])
    return tuple(order)


def _schedule(view: View) -> tuple[int, ...]:
    weights = [view.weights[s] for s in view.slots]
    if min(weights) == max(weights):
        return view.slots
    return smooth_schedule(view.slots, _integer_weights(weights))


class WeightedRoundRobin:
    """Smooth weighted round-robin, as NGINX's default `ngx_http_upstream_get_peer`.

    The NGINX sequence is computed once per view (weights 1:3 give ``b a b b``) and indexed by
    the shared cursor, so the whole fleet of processes follows one cycle: over any whole number
    of cycles each backend gets exactly its share, and a light backend is never skipped for a
    cycle. Fractional weights (slow start) are rounded to 1/100 and the cycle is bounded by
    `MAX_SCHEDULE`, so very unequal weights are approximated (the lightest keeps one turn).
    Follows `view.weights`, so slow start ramps a new backend's share.
    """

    name: ClassVar[str] = "weighted_round_robin"
    uses_cursor = True

    def __init__(self) -> None:
        self._schedule = _PerView(_schedule)

    def pick(self, view: View, cursor: int, key: int | None) -> int:
        schedule = self._schedule.get(view)
        return schedule[cursor % len(schedule)]

    def __reduce__(self) -> tuple[type[Any], tuple[()]]:
        """Pickled as its class alone: the receiving process builds its own caches."""
        return (type(self), ())


class WeightedRandom(_Randomised):
    """A random eligible backend with probability proportional to its weight.

    Prefix sums of the weights are built once per view; a pick is one bisect, O(log n).
    Follows `view.weights`, so slow start ramps a new backend's share.
    """

    name: ClassVar[str] = "weighted_random"
    uses_cursor = False

    def _start(self) -> None:
        self._sampler = _PerView(_Sampler)

    def pick(self, view: View, cursor: int, key: int | None) -> int:
        return self._sampler.get(view).one(self._rng)


class _Scan:
    """How `LeastLoaded` reads a view, and this process's tie-break state for it.

    With equal weights, ties are broken two ways, both keeping the fair share. When every
    backend is idle (a pool that is not saturated, the common case), they are taken in turn
    from ``turns[0]``: one comparison of the counts' bytes, whatever the number of backends.
    Otherwise a tied backend is drawn at random from ``turns[1]``, the state of a small
    generator that the compiled core steps the same way: a few draws almost always land on a
    tied backend, and only when they all miss (few are tied) are the tied ones counted and
    one of them drawn.
    A draw, not the next tied one after a pointer: that would give a busy backend's turns to
    its neighbour, doubling the neighbour's share (`scripts/simulate.py` shows it in the
    tails). Each process starts at random points, so workers that start at once do not pick
    in lockstep. Counts are read in one C-level call (a slice, or an `itemgetter` when some
    slots are out); on shared counts of contiguous slots an idle backend is checked in their
    bytes, so 4096 backends cost about what 8 do. With unequal weights (slow start), `current`
    holds the smooth weighted round-robin values by slot (minus infinity for slots not in the
    view).
    """

    __slots__ = ("current", "fast", "idle", "read", "span", "turns", "uniform", "view")

    def __init__(self, view: View) -> None:
        self.view = view
        slots = view.slots
        contiguous = slots == tuple(range(slots[0], slots[-1] + 1))
        self.read = itemgetter(slice(slots[0], slots[-1] + 1)) if contiguous else itemgetter(*slots)
        weights = [float(view.weights[s]) for s in slots]
        self.uniform = len(set(weights)) == 1
        self.current = [-math.inf] * (slots[-1] + 1)
        for slot, weight in zip(slots, weights, strict=True):
            self.current[slot] = random.random() * weight
        shared = isinstance(view.in_flight, memoryview)
        self.span = slice(slots[0], slots[-1] + 1) if contiguous and shared else None
        """Where the counts of every slot lie, when they are shared ones (a memoryview)."""
        self.idle = bytes(8 * len(slots))
        """The bytes of `span` when every backend is idle."""
        self.turns = array("q", [random.randrange(len(slots)), random.getrandbits(63)])
        """The next turn when all are idle, as an index into `view.slots`; the draws' state."""
        self.fast: Callable[[Sequence[int]], int] | None = None
        """The compiled core's pick for equal weights and no penalties, when it runs
        (`_core`): the same choices, from the same `turns`."""
        if speedups is not None and self.span is not None and self.uniform:
            self.fast = speedups.EqualScan(lo=slots[0], hi=slots[-1] + 1, turns=self.turns).pick

    def follows(self, view: View) -> bool:
        """Whether this scan's structures still describe `view` (a rebuilt but equal view)."""
        old = self.view
        return (
            old.version == view.version
            and old.slots == view.slots
            and (old.weights == view.weights)
        )


class LeastLoaded:
    """The backend with the fewest calls in flight across all processes, per unit of weight.

    As NGINX's `least_conn`: the lowest ``in_flight / weight`` wins (recent failures counted
    as calls in flight), and ties are broken in turn among the tied backends (by smooth
    weighted round-robin when weights differ). Ties are what an idle or lightly loaded pool
    mostly has, so this is what spreads sequential calls evenly (or by weight, which is how
    slow start ramps a new backend even when nothing is in flight). The tie-break state is
    this process's own and restarts when the view changes.
    """

    name: ClassVar[str] = "least_loaded"
    uses_cursor = False

    def __init__(self) -> None:
        self._scan: _Scan | None = None

    def pick(self, view: View, cursor: int, key: int | None) -> int:
        slots = view.slots
        if len(slots) == 1:
            return slots[0]
        scan = self._scan
        if scan is None or scan.view is not view:
            scan = self._follow(view)
        if not scan.uniform:
            return _least_loaded_weighted(view, scan.current)
        if view.penalized:
            counts = list(map(add, scan.read(view.in_flight), scan.read(view.penalties)))
        elif scan.fast is not None:
            return scan.fast(view.in_flight)
        elif scan.span is not None:
            # `span` is set only for shared counts: a memoryview, with `tobytes`.
            raw = view.in_flight[scan.span].tobytes()  # type: ignore[attr-defined]
            turns = scan.turns
            if raw == scan.idle:
                i = turns[0] % len(slots)
                turns[0] = i + 1
                return slots[i]
            i = _draw_idle(raw, turns)
            if i >= 0:
                return slots[i]
            counts = list(scan.read(view.in_flight))
            i = _nth(counts, 0, turns)
            if i >= 0:
                return slots[i]
        else:
            counts = list(scan.read(view.in_flight))
        return slots[_draw_least(counts, scan.turns)]

    def _follow(self, view: View) -> _Scan:
        """The scan for `view`: the current one if the view only was rebuilt, else a new one."""
        scan = self._scan
        if scan is not None and scan.follows(view):
            scan.view = view
        else:
            scan = self._scan = _Scan(view)
        return scan

    def __reduce__(self) -> tuple[type[Any], tuple[()]]:
        """Pickled as its class alone: the receiving process builds its own caches."""
        return (type(self), ())


IDLE = bytes(8)
"""A count of zero, as the bytes of a shared word."""
DRAWS = 4
"""Draws for a tied backend before taking the first one after the last draw."""
_MULTIPLIER, _INCREMENT, _MASK = 6364136223846793005, 1442695040888963407, (1 << 63) - 1


def _draw_idle(raw: bytes, turns: array[int]) -> int:
    """The index of an idle slot in `raw` (counts' bytes), drawn; -1 if every draw missed.

    The draws step the generator in ``turns[1]`` (Knuth's MMIX constants, modulo 2**63 so
    the state fits a signed word), as `_draw_least`, `_nth` and the compiled core do.
    """
    n = len(raw) >> 3
    state = turns[1]
    for _ in range(DRAWS):
        state = (state * _MULTIPLIER + _INCREMENT) & _MASK
        i = (state >> 31) % n
        if raw.startswith(IDLE, i << 3):
            turns[1] = state
            return i
    turns[1] = state
    return -1


def _nth(counts: list[int], low: int, turns: array[int]) -> int:
    """The index of one of the slots counting `low`, each as likely, for when the draws
    missed (few are tied); -1 if none is."""
    k = counts.count(low)
    if not k:
        return -1
    state = turns[1] = (turns[1] * _MULTIPLIER + _INCREMENT) & _MASK
    i = -1
    for _ in range((state >> 31) % k + 1):
        i = counts.index(low, i + 1)
    return i


def _draw_least(counts: list[int], turns: array[int]) -> int:
    """The index of one of the least loaded, drawn as `_draw_idle` draws; an idle one if any;
    the next in turn if all are idle."""
    low = 0 if 0 in counts else min(counts)
    n = len(counts)
    if not low and not any(counts):
        i = turns[0] % n
        turns[0] = i + 1
        return i
    state = turns[1]
    for _ in range(DRAWS):
        state = (state * _MULTIPLIER + _INCREMENT) & _MASK
        i = (state >> 31) % n
        if counts[i] == low:
            turns[1] = state
            return i
    turns[1] = state
    return _nth(counts, low, turns)


def _loads(view: View) -> Sequence[int]:
    """Calls in flight by slot, recent failures counted among them (`_latency` says why)."""
    if not view.penalized:
        return view.in_flight
    return list(map(add, view.in_flight, view.penalties))


def _least_loaded_weighted(view: View, current: list[float]) -> int:
    """`LeastLoaded` when weights differ, by ``in_flight / weight``.

    A plain loop: C-level helpers would turn every count into a float first, which costs more.
    """
    slots, weights = view.slots, view.weights
    in_flight = _loads(view)
    best, low, ties = slots[0], math.inf, 0
    for slot in slots:
        load = in_flight[slot] / weights[slot]
        if load < low:
            best, low, ties = slot, load, 1
        elif load == low:
            ties += 1
    if ties == 1:
        return best
    chosen, top, total = best, -math.inf, 0.0
    for slot in slots:
        if in_flight[slot] / weights[slot] == low:
            weight = weights[slot]
            value = current[slot] = current[slot] + weight
            total += weight
            if value > top:
                chosen, top = slot, value
    # Counts may have moved between the two passes (other processes): `chosen` then falls
    # back to the first pass's answer, with the cycle's state still consistent.
    current[chosen] -= total
    return chosen


class PowerOfTwo(_Randomised):
    """Power of two choices: two distinct random backends, the less loaded one wins.

    Mitzenmacher's result (maximum load ln ln n / ln 2 instead of ln n / ln ln n), Envoy's
    default LEAST_REQUEST and NGINX's `random two least_conn`. As in NGINX, candidates are
    drawn in proportion to weight and compared by ``in_flight / weight``, so slow start
    applies both when idle and under load; ties go to the first draw. Unlike a full scan it
    does not herd when many pickers decide at once: each sees a different pair.
    """

    name: ClassVar[str] = "power_of_two"
    uses_cursor = False

    def _start(self) -> None:
        self._sampler = _PerView(_Sampler)

    def pick(self, view: View, cursor: int, key: int | None) -> int:
        if len(view.slots) == 1:
            return view.slots[0]
        a, b = self._sampler.get(view).two(self._rng)
        in_flight, weights = view.in_flight, view.weights
        load_a, load_b = in_flight[a], in_flight[b]
        if view.penalized:
            load_a, load_b = load_a + view.penalties[a], load_b + view.penalties[b]
        if load_b * weights[a] < load_a * weights[b]:
            return b
        return a


SLOT_BITS = 12
"""A ring point is its position (32 bits) shifted left by this, or'ed with its slot: sorting
the points sorts the positions, and a point names its owner."""


def _ring_points(slot: int) -> list[int]:
    """The slot's RING_POINTS points: the same in every process and every run."""
    points: list[int] = []
    for block in range(RING_POINTS // 16):
        digest = hashlib.blake2b(
            f"{slot}-{block}".encode(), digest_size=64, person=b"dispatcher-ring"
        ).digest()
        for i in range(0, 64, 4):
            points.append(int.from_bytes(digest[i : i + 4], "big") << SLOT_BITS | slot)
    points.sort()
    return points


_points_of: dict[int, list[int]] = {}


def _points(slot: int) -> list[int]:
    points = _points_of.get(slot)
    if points is None:
        points = _points_of[slot] = _ring_points(slot)
    return points


class _Ring:
    """The points of every slot in rotation, sorted. Made from the previous ring when a few
    members changed (their points taken out or merged in), so a registration at 512 backends
    costs a process about 2 ms, against 13 ms for a whole new sort; ejections and health
    changes leave the ring alone (a pick steps over points of slots not eligible)."""

    __slots__ = ("members", "points")

    def __init__(self, members: frozenset[int], points: list[int]) -> None:
        self.members = members
        self.points = points

    def moved_to(self, members: frozenset[int]) -> _Ring:
        """The ring of `members`: this one if they are the same, else a new one."""
        if members == self.members:
            return self
        added, removed = members - self.members, self.members - members
        if not self.points or len(added) + len(removed) > max(len(members) // 8, 1):
            return _Ring(members, sorted(chain.from_iterable(map(_points, members))))
        points = list(self.points)
        for slot in removed:
            for point in _points(slot):
                del points[bisect_left(points, point)]
        if added:
            points.extend(chain.from_iterable(map(_points, added)))
            points.sort()  # two sorted runs: a merge, not a sort
        return _Ring(members, points)


_EMPTY_RING = _Ring(frozenset(), [])


_SLOT_MASK = (1 << SLOT_BITS) - 1


class _Eligible:
    """Which members of a view's ring may take a call: all of them (`masked` empty), or the
    eligible ones when some are ejected or down."""

    __slots__ = ("masked", "members", "ring")

    def __init__(self, view: View) -> None:
        members = frozenset(view.members or view.slots)
        eligible = frozenset(view.slots)
        self.members = members
        self.masked = eligible if eligible != members else frozenset()
        self.ring: _Ring | None = None
        """The ring of `members`, once a pick needed it."""


def _eligible(view: View) -> _Eligible:
    return _Eligible(view)


def _uniform_sampler(view: View) -> _Sampler:
    return _Sampler(view, weighted=False)


class ConsistentHash(_Randomised):
    """Calls with the same ``key=`` go to the same backend, in every process.

    A ketama ring (as NGINX's `hash ... consistent` and HAProxy's consistent hashing): each
    slot owns RING_POINTS pseudo-random points and a key goes to the owner of the first point
    at or after its hash. Chosen over the alternatives because:

    * removing a backend moves only the keys it owned (about 1/N of them) to its ring
      neighbours, and adding one takes about 1/N; Maglev moves about twice as many;
    * a pick is one C-level bisect, O(log n); rendezvous hashing needs n hashes per pick in
      Python, and Maglev's 65,537-entry table would take each process tens of milliseconds to
      rebuild on every ejection;
    * bounded load has a natural meaning: walk on along the ring to the next backend.

    Points belong to slots, and every process agrees on slots, so the mapping is the same in
    every process and in every run; a backend re-registered in another slot takes other keys.
    Weights are ignored (so slow start does not apply): moving keys as weights ramp would
    defeat stickiness.

    `balance_factor` (c > 1, like HAProxy's ``hash-balance-factor 125`` as 1.25) bounds load:
    a backend already at ``ceil(c x (total in flight + 1) / n)`` calls is passed over for the
    next one along the ring (Mirrokni, Thorup and Zadimoghaddam). Keys then stay put until
    their backend is overloaded.

    A call without a key goes to the less loaded of two random backends (`PowerOfTwo`
    without weights): it has no affinity to honour, so the choice should at least be cheap
    and load-aware.
    """

    name: ClassVar[str] = "consistent_hash"
    uses_cursor = False
    _params = ("balance_factor", "seed")

    def __init__(self, balance_factor: float | None = None, seed: int | None = None) -> None:
        if balance_factor is not None and not (
            isinstance(balance_factor, int | float) and 1.0 < balance_factor < math.inf
        ):
            raise ValueError(f"balance_factor must be a number above 1, not {balance_factor!r}")
        self.balance_factor = balance_factor
        super().__init__(seed)

    def _start(self) -> None:
        self._ring = _EMPTY_RING
        self._eligible = _PerView(_eligible)
        self._sampler = _PerView(_uniform_sampler)

    def pick(self, view: View, cursor: int, key: int | None) -> int:
        slots, in_flight = view.slots, view.in_flight
        if key is None:
            if len(slots) == 1:
                return slots[0]
            a, b = self._sampler.get(view).two(self._rng)
            return b if in_flight[b] < in_flight[a] else a
        eligible = self._eligible.get(view)
        ring = eligible.ring
        if ring is None:
            ring = eligible.ring = self._ring = self._ring.moved_to(eligible.members)
        points = ring.points
        size = len(points)
        at = bisect_left(points, (key >> 32) << SLOT_BITS)
        factor = self.balance_factor
        limit = 0
        if factor is not None:
            total = 0
            for s in slots:
                total += in_flight[s]
            limit = math.ceil(factor * (total + 1) / len(slots))
        # An eligible backend below the limit exists (the least loaded is), so the walk ends.
        masked = eligible.masked
        for step in range(size):
            slot = points[(at + step) % size] & _SLOT_MASK
            if masked and slot not in masked:
                continue
            if not limit or in_flight[slot] < limit:
                return slot
        return slots[0]


class PeakEwma(_Randomised):
    """Latency-aware power of two choices, as Finagle's `p2cPeakEwma` and Linkerd.

    Two distinct random backends (drawn by weight, as `PowerOfTwo`); the one with the lower
    ``latency x (in_flight + 1 + recent failures) / weight`` wins, where latency is the shared
    peak EWMA (`_latency`): a backend that turns slow costs more from its first slow answer,
    and a failure counts as an answer slower than any other (at least 5 s, at least twice its
    time), so a backend that fails fast or holds calls never looks fast.

    The cost decays as it is read: a backend that was slow and got no call for
    `_latency.STALE_NS` (2 s) counts as unmeasured again, so it is tried again, once for the
    whole pool, and its next answer sets its cost anew. An unmeasured backend (latency 0.0)
    costs nothing while it has no call in flight, so it is probed at once; while its first
    calls are in flight it costs as much as a failing one (`UNMEASURED_NS`), so it is not
    flooded before its first answer. This is Finagle's rule (cost 0 when idle, a large penalty
    when busy).
    """

    name: ClassVar[str] = "peak_ewma"
    uses_cursor = False
    uses_latency = True

    def _start(self) -> None:
        self._sampler = _PerView(_Sampler)

    def pick(self, view: View, cursor: int, key: int | None) -> int:
        if len(view.slots) == 1:
            return view.slots[0]
        a, b = self._sampler.get(view).two(self._rng)
        now = view.clock()
        return b if _cost(view, b, now) < _cost(view, a, now) else a


def _cost(view: View, slot: int, now: int) -> float:
    latency = view.latency[slot]
    if view.stamps:
        latency = decayed(latency, view.stamps[slot], now)
    load = view.in_flight[slot]
    if latency <= 0.0:
        if load == 0:
            return 0.0
        latency = UNMEASURED_NS
    if view.penalized:
        load += view.penalties[slot]
    return latency * (load + 1) / view.weights[slot]


class ClientSideWeightedRoundRobin:
    """Round robin weighted by the load each backend reports of itself (gRPC's weighted round
    robin, Envoy's `client_side_weighted_round_robin`).

    Backends that send ORCA's ``endpoint-load-metrics`` header with their answers (see
    `HttpResponse.load_report`) say how busy they are and how much they serve, from every
    client on every host. Once a second, one process of the host turns the reports into
    weights, ``qps / (utilization + eps / qps)`` (gRFC A58; for a backend that reports no
    rates, the rates this host sent it), and every process of the host follows them: a backend
    kept busy by other hosts gets less from this one. A backend's reports count after 10 s of
    them; until two backends are known, or for a backend that never reports, the configured
    weights (and slow start) apply. Picks follow one earliest-deadline-first cycle of the
    weights, indexed by the shared cursor, as `WeightedRoundRobin` does.
    """

    name: ClassVar[str] = "client_side_weighted_round_robin"
    uses_cursor = True
    uses_load_reports = True

    def __init__(
        self,
        *,
        blackout_seconds: float = BLACKOUT_NS / 1e9,
        expiry_seconds: float = REPORT_EXPIRY_NS / 1e9,
        error_penalty: float = ERROR_PENALTY,
    ) -> None:
        if blackout_seconds:
            check_seconds("blackout_seconds", blackout_seconds)
        check_seconds("expiry_seconds", expiry_seconds)
        if not (isinstance(error_penalty, int | float) and 0.0 <= error_penalty < math.inf):
            raise ValueError(f"error_penalty must be a number >= 0, not {error_penalty!r}")
        self.weighing = Weighing(
            round(blackout_seconds * 1e9), round(expiry_seconds * 1e9), float(error_penalty)
        )
        self._schedule = _PerView(_reported_schedule)

    def pick(self, view: View, cursor: int, key: int | None) -> int:
        schedule = self._schedule.get(view)
        return schedule[cursor % len(schedule)]

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """Pickled as its settings: the receiving process builds its own caches."""
        w = self.weighing
        settings = (w.blackout_ns / 1e9, w.expiry_ns / 1e9, w.error_penalty)
        return (_client_side_weighted_round_robin, settings)


def _client_side_weighted_round_robin(
    blackout: float, expiry: float, penalty: float
) -> ClientSideWeightedRoundRobin:
    return ClientSideWeightedRoundRobin(
        blackout_seconds=blackout, expiry_seconds=expiry, error_penalty=penalty
    )


def _reported_schedule(view: View) -> tuple[int, ...]:
    reported = view.reported
    weights = [(reported[s] if reported else 1.0) * view.weights[s] for s in view.slots]
    if min(weights) == max(weights):
        return view.slots
    return edf_schedule(view.slots, _integer_weights(weights))


def edf_schedule(slots: Sequence[int], weights: Sequence[int]) -> tuple[int, ...]:
    """One cycle of earliest-deadline-first over `slots` with integer `weights` (Envoy's
    weighted round robin): each slot appears `weight` times, spread evenly, in
    O(total x log n) where NGINX's smooth sequence takes O(total x n)."""
    total = sum(weights)
    heap = [(1.0 / w, i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    order = []
    for _ in range(total):
        deadline, i = heapq.heappop(heap)
        order.append(slots[i])
        heapq.heappush(heap, (deadline + 1.0 / weights[i], i))
    return tuple(order)


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    RoundRobin.name: RoundRobin,
    Random.name: Random,
    WeightedRoundRobin.name: WeightedRoundRobin,
    WeightedRandom.name: WeightedRandom,
    LeastLoaded.name: LeastLoaded,
    PowerOfTwo.name: PowerOfTwo,
    ConsistentHash.name: ConsistentHash,
    PeakEwma.name: PeakEwma,
    ClientSideWeightedRoundRobin.name: ClientSideWeightedRoundRobin,
}


def make_strategy(spec: str | Strategy) -> Strategy:
    """A strategy from its name in `STRATEGIES`, or the given object if it is one."""
    if isinstance(spec, str):
        try:
            return STRATEGIES[spec]()
        except KeyError:
            known = ", ".join(sorted(STRATEGIES))
            raise ValueError(f"unknown strategy {spec!r}; choose one of {known}") from None
    if not isinstance(spec, Strategy):
        raise TypeError(
            f"strategy must be a name or an object with uses_cursor and pick(), "
            f"not {type(spec).__name__}"
        )
    return spec
