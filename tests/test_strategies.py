"""Strategies: exact or statistically bounded distributions on plain views, then through real
balancers shared by threads and processes (load spread, sticky keys, slow start)."""

from __future__ import annotations

import multiprocessing
import pickle
import random
import re
import sys
import threading
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher import Balancer, View
from dispatcher import _strategies as S
from dispatcher._balancer import key_hash_of as _key_hash
from dispatcher._strategies import (
    STRATEGIES,
    ConsistentHash,
    LeastLoaded,
    PeakEwma,
    PowerOfTwo,
    Random,
    Strategy,
    WeightedRandom,
    WeightedRoundRobin,
    make_strategy,
)
from tests.helpers import (
    Echo,
    FailingOn,
    FakeClock,
    hold_one_call,
    in_flight,
    in_flight_by_addr,
    wait_for,
)

ADDRS = [f"10.0.1.{i}:80" for i in range(1, 9)]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "strategies.md"


def view(
    weights: list[float],
    in_flight: list[int] | None = None,
    latency: list[float] | None = None,
    slots: tuple[int, ...] | None = None,
) -> View:
    n = len(weights)
    return View(
        version=1,
        slots=tuple(range(n)) if slots is None else slots,
        weights=weights,
        in_flight=in_flight or [0] * n,
        latency=latency or [0.0] * n,
    )


def picks(strategy: Strategy, v: View, n: int, key: int | None = None) -> Counter[int]:
    return Counter(strategy.pick(v, c, key) for c in range(n))


def near(count: int, expected: float, sigmas: float = 5.0) -> bool:
    """Within `sigmas` binomial standard deviations: false alarms about one in a million."""
    return abs(count - expected) <= sigmas * max(expected, 1.0) ** 0.5


# Every strategy -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.floats(0.1, 50.0),
            st.integers(0, 20),
            st.sampled_from([0.0, 1e5, 1e6, 1e9]),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    ),
    key=st.none() | st.integers(0, (1 << 64) - 1),
    cursor=st.integers(0, 1 << 40),
)
def test_every_strategy_picks_an_eligible_slot(
    data: list[tuple[float, int, float, bool]], key: int | None, cursor: int
) -> None:
    eligible = tuple(i for i, d in enumerate(data) if d[3]) or (0,)
    v = View(
        version=1,
        slots=eligible,
        weights=[d[0] for d in data],
        in_flight=[d[1] for d in data],
        latency=[d[2] for d in data],
    )
    for name, factory in STRATEGIES.items():
        strategy = factory()
        for _ in range(3):
            assert strategy.pick(v, cursor, key) in eligible, name


def test_registry_names_and_protocol() -> None:
    assert set(STRATEGIES) == {
        "round_robin",
        "random",
        "weighted_round_robin",
        "weighted_random",
        "least_loaded",
        "power_of_two",
        "consistent_hash",
        "peak_ewma",
        "client_side_weighted_round_robin",
    }
    for name, factory in STRATEGIES.items():
        strategy = make_strategy(name)
        assert isinstance(strategy, Strategy)
        assert type(strategy) is factory
        assert type(strategy).name == name  # type: ignore[attr-defined]
    assert ConsistentHash(balance_factor=1.5).balance_factor == 1.5
    for bad in (1.0, 0.5, float("inf"), "2"):
        with pytest.raises(ValueError, match="balance_factor"):
            ConsistentHash(balance_factor=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_pickles_without_caches_and_still_works(name: str) -> None:
    strategy = make_strategy(name)
    v = view([1.0, 2.0, 3.0], [1, 0, 2], [1e6, 2e6, 3e6])
    before = [strategy.pick(v, c, 12345) for c in range(50)]
    data = pickle.dumps(strategy)
    assert len(data) < 200, "caches or generator state were pickled"
    copy = pickle.loads(data)
    assert type(copy) is type(strategy)
    after = [copy.pick(v, c, 12345) for c in range(50)]
    assert set(after) <= {0, 1, 2}
    if name in ("round_robin", "weighted_round_robin", "consistent_hash"):
        assert after == before
    seeded = ConsistentHash(balance_factor=1.25, seed=3)
    clone = pickle.loads(pickle.dumps(seeded))
    assert (clone.balance_factor, clone.seed) == (1.25, 3)


# Deterministic strategies: exact counts ---------------------------------------------------


def test_round_robin_is_exact_and_ignores_weights() -> None:
    v = view([1.0, 3.0, 1.0, 1.0])
    assert picks(S.RoundRobin(), v, 400) == dict.fromkeys(range(4), 100)


def test_weighted_round_robin_one_to_three_is_exact_and_smooth() -> None:
    v = view([1.0, 3.0])
    strategy = WeightedRoundRobin()
    order = [strategy.pick(v, c, None) for c in range(400)]
    assert Counter(order) == {0: 100, 1: 300}
    # Never starves the light one: it is in every window of 4 consecutive picks.
    assert all(order[i : i + 4].count(0) == 1 for i in range(len(order) - 3))


def test_weighted_round_robin_follows_nginx() -> None:
    # The example in NGINX's ngx_http_upstream_round_robin.c: weights 5, 1, 1.
    v = view([5.0, 1.0, 1.0])
    assert [WeightedRoundRobin().pick(v, c, None) for c in range(7)] == [0, 0, 1, 0, 2, 0, 0]
    # Only eligible slots take part, whatever the others weigh.
    v = view([5.0, 1.0, 9.0, 2.0], slots=(1, 3))
    assert picks(WeightedRoundRobin(), v, 300) == {1: 100, 3: 200}


def test_weighted_round_robin_fractional_and_extreme_weights() -> None:
    # Slow start makes fractional weights: 0.5 against 1 is 1:2.
    assert picks(WeightedRoundRobin(), view([1.0, 0.5, 1.0]), 500) == {0: 200, 1: 100, 2: 200}
    # A huge ratio is approximated within a bounded cycle; the light one keeps a turn.
    schedule = S._schedule(view([1.0, 1e6]))
    assert len(schedule) <= S.MAX_SCHEDULE + 2
    assert schedule.count(0) == 1
    assert S.smooth_schedule((7, 8), [2, 1]) == (7, 8, 7)


def test_weighted_round_robin_rebuilds_when_weights_change() -> None:
    strategy = WeightedRoundRobin()
    assert picks(strategy, view([1.0, 1.0]), 100) == {0: 50, 1: 50}
    # Same version, new weights: what a slow-start step looks like.
    assert picks(strategy, view([1.0, 4.0]), 100) == {0: 20, 1: 80}


def test_least_loaded_weighs_and_shares_ties_fairly() -> None:
    strategy = LeastLoaded()
    # 2/1, 3/3 and 5/1: the second wins on load per weight though it has more in flight.
    assert picks(strategy, view([1.0, 3.0, 1.0], [2, 3, 5]), 10) == {1: 10}
    # Two tied idle backends next to two busy ones share evenly (drawn: each pick is a fair
    # coin, so 400 picks stay within 200 +- 60 but once in 10**9 runs).
    shares = picks(strategy, view([1.0] * 4, [0, 0, 9, 9]), 400)
    assert shares.keys() == {0, 1} and abs(shares[0] - 200) <= 60
    # The same when few of many are tied, where most draws miss: 4,000 fair coins stay within
    # 2,000 +- 200 but once in 10**9 runs (taking the first tied one after a miss gave the
    # first of the pair 94%).
    busy = [0 if slot in (10, 11) else 5 for slot in range(64)]
    shares = picks(LeastLoaded(), view([1.0] * 64, busy), 4000)
    assert shares.keys() == {10, 11} and abs(shares[10] - 2000) <= 200
    # Idle backends tie; ties follow weights, which is how slow start acts when idle.
    assert picks(strategy, view([1.0, 3.0]), 400) == {0: 100, 1: 300}
    # A large idle pool is visited in turn, each backend once per cycle.
    assert picks(strategy, view([1.0] * 64), 640) == dict.fromkeys(range(64), 10)


def reference_least_loaded(
    view: View, current: dict[int, float], turns: list[int], shared: bool
) -> int:
    """NGINX's least_conn written plainly: the lowest load; among ties, with equal weights the
    next in turn (``turns[0]``) when all are idle, else one drawn with the generator in
    ``turns[1]`` (the first tied after the last draw when every draw misses); with unequal
    weights smooth weighted round-robin."""
    slots = view.slots
    if len({view.weights[s] for s in slots}) == 1:
        counts = [view.in_flight[s] for s in slots]
        n = len(counts)
        if not any(counts):
            i = turns[0] % n
            turns[0] = i + 1
            return slots[i]
        # An idle backend is drawn for first; when none is, those draws are spent, and the
        # least loaded are drawn for next (where the counts are shared ones). When four
        # draws miss, one of the tied backends is drawn among them.
        searches = [0, min(counts)] if shared and 0 not in counts else [min(counts)]
        for low in searches:
            for _ in range(4):
                turns[1] = (turns[1] * 6364136223846793005 + 1442695040888963407) % 2**63
                i = (turns[1] >> 31) % n
                if counts[i] == low:
                    return slots[i]
            tied = [j for j in range(n) if counts[j] == low]
            if tied:
                turns[1] = (turns[1] * 6364136223846793005 + 1442695040888963407) % 2**63
                return slots[tied[(turns[1] >> 31) % len(tied)]]
    low = min(view.in_flight[s] / view.weights[s] for s in slots)
    tied = [s for s in slots if view.in_flight[s] / view.weights[s] == low]
    for s in tied:
        current[s] += view.weights[s]
    chosen = max(tied, key=lambda s: (current[s], -s))
    current[chosen] -= sum(view.weights[s] for s in tied)
    return chosen


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.sampled_from([1.0, 1.0, 1.0, 0.5, 2.0]), min_size=1, max_size=40),
    equal=st.booleans(),
    shared=st.booleans(),
    eligible=st.data(),
    steps=st.lists(st.tuples(st.sampled_from("hcr"), st.integers(0, 1 << 16)), max_size=200),
    seed=st.integers(0, 1 << 32),
)
def test_least_loaded_is_nginx_least_conn(
    weights: list[float],
    equal: bool,
    shared: bool,
    eligible: st.DataObject,
    steps: list[tuple[str, int]],
    seed: int,
) -> None:
    """Every path of the scan (plain counts, shared counts' bytes, the compiled core's scan
    when it runs) picks exactly what the plain algorithm picks, call after call.

    Steps: pick and hold the call (h), pick for a call that ends at once (c), end a held
    call (r).
    """
    n = len(weights)
    if equal:
        weights = [1.0] * n
    slots = tuple(eligible.draw(st.sets(st.integers(0, n - 1), min_size=1).map(sorted)))
    # Shared counts are a memoryview of 64-bit words, as a segment's are.
    in_flight: Any = memoryview(array("q", [0] * n)) if shared else [0] * n
    contiguous = slots == tuple(range(slots[0], slots[-1] + 1))
    v = View(version=1, slots=slots, weights=weights, in_flight=in_flight, latency=[0.0] * n)
    random.seed(seed)
    current = {s: random.random() * weights[s] for s in slots}
    turns = [random.randrange(len(slots)), random.getrandbits(63)]
    random.seed(seed)
    strategy = LeastLoaded()
    for step, which in steps:
        busy = [s for s in slots if in_flight[s]]
        if step == "r":
            if busy:
                in_flight[busy[which % len(busy)]] -= 1
            continue
        chosen = strategy.pick(v, -1, None)
        assert chosen == reference_least_loaded(v, current, turns, shared and contiguous)
        in_flight[chosen] += step == "h"


def test_least_loaded_shared_by_threads_never_fails() -> None:
    """Threads race on one strategy's tie-break state; every pick still returns a slot."""
    strategy, v = LeastLoaded(), view([1.0] * 8)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(20_000):
                assert strategy.pick(v, -1, None) in v.slots
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


# Random strategies: bounds with a fixed seed ----------------------------------------------


def test_random_is_uniform() -> None:
    counts = picks(Random(seed=1), view([1.0, 5.0, 1.0, 1.0]), 8000)
    assert all(near(counts[s], 2000) for s in range(4)), counts
    assert Random(seed=7).pick(view([1.0] * 5), -1, None) == Random(seed=7).pick(
        view([1.0] * 5), -1, None
    )


def test_weighted_random_follows_weights() -> None:
    counts = picks(WeightedRandom(seed=2), view([1.0, 3.0, 0.5, 0.5]), 10000)
    for slot, share in enumerate([0.2, 0.6, 0.1, 0.1]):
        assert near(counts[slot], 10000 * share), counts


def test_power_of_two_takes_two_distinct_and_the_less_loaded() -> None:
    # With two backends, two distinct candidates always include the idle one.
    assert picks(PowerOfTwo(seed=3), view([1.0, 1.0], [0, 1]), 500) == {0: 500}
    # Loads 0 < 1 < 2: the lightest is in 2 of the 3 pairs, the heaviest never wins.
    counts = picks(PowerOfTwo(seed=4), view([1.0] * 3, [0, 1, 2]), 6000)
    assert counts[2] == 0
    assert near(counts[0], 4000) and near(counts[1], 2000), counts
    # Weighted: 4 in flight on weight 4 is lighter than 2 on weight 1.
    assert picks(PowerOfTwo(seed=5), view([4.0, 1.0], [4, 2]), 300) == {0: 300}
    # Idle: candidates are drawn by weight, so shares follow weights (slow start when idle).
    counts = picks(PowerOfTwo(seed=6), view([1.0, 3.0]), 4000)
    assert near(counts[0], 1000), counts


def test_peak_ewma_prefers_fast_probes_new_and_shuns_failures() -> None:
    ms = 1e6
    # One backend 50x slower: it loses every pair until the others have 50 in flight.
    counts = picks(PeakEwma(seed=8), view([1.0] * 4, [0] * 4, [ms, ms, ms, 50 * ms]), 2000)
    assert counts[3] == 0 and all(near(counts[s], 2000 / 3) for s in range(3)), counts
    # ... but wins every pair it is in (half of them) once the fast ones are busy enough.
    v = view([1.0] * 4, [60, 60, 60, 0], [ms, ms, ms, 50 * ms])
    assert near(picks(PeakEwma(seed=9), v, 600)[3], 300)
    # A new (unmeasured) backend is probed at once while idle ...
    v = view([1.0] * 4, [1, 1, 1, 0], [ms, ms, ms, 0.0])
    assert near(picks(PeakEwma(seed=10), v, 600)[3], 300)
    # ... and not flooded while its first call is in flight.
    v = view([1.0] * 4, [1, 1, 1, 1], [ms, ms, ms, 0.0])
    assert picks(PeakEwma(seed=11), v, 600)[3] == 0
    # A backend that fails fast is scored as a slow answer (>= 1 s), never as a fast one.
    v = view([1.0] * 3, [3, 3, 0], [ms, ms, 1e9])
    assert picks(PeakEwma(seed=12), v, 600)[2] == 0


def test_random_strategies_are_reseeded_in_forked_children() -> None:
    ctx = multiprocessing.get_context("fork")
    strategies: list[Strategy] = [
        Random(seed=1),
        WeightedRandom(seed=1),
        PowerOfTwo(seed=1),
        PeakEwma(seed=1),
        ConsistentHash(seed=1),
    ]
    v = view([1.0] * 16, [0] * 16, [1e6] * 16)
    queue = ctx.Queue()
    children = [ctx.Process(target=_draw, args=(strategies, v, queue)) for _ in range(2)]
    for child in children:
        child.start()
    drawn = [queue.get(timeout=30) for _ in children]
    for child in children:
        child.join(30)
    mine = [[s.pick(v, -1, None) for _ in range(40)] for s in strategies]
    for i in range(len(strategies)):
        assert drawn[0][i] != mine[i], strategies[i]
        assert drawn[0][i] != drawn[1][i], strategies[i]


def _draw(strategies: list[Strategy], v: View, queue: Any) -> None:
    queue.put([[s.pick(v, -1, None) for _ in range(40)] for s in strategies])


# Consistent hashing ----------------------------------------------------------------------


KEYS = [_key_hash(f"user-{i}") for i in range(8000)]


def owners(strategy: Strategy, v: View) -> list[int]:
    return [strategy.pick(v, -1, k) for k in KEYS]


def test_consistent_hash_spreads_keys_and_moves_about_one_nth_on_removal() -> None:
    full = view([1.0] * 8)
    before = owners(ConsistentHash(), full)
    assert before == owners(ConsistentHash(seed=99), full), "must not depend on the instance"
    counts = Counter(before)
    assert all(0.7 * 1000 <= counts[s] <= 1.3 * 1000 for s in range(8)), counts
    after = owners(ConsistentHash(), view([1.0] * 8, slots=(0, 1, 2, 4, 5, 6, 7)))
    moved = [i for i in range(len(KEYS)) if before[i] != after[i]]
    # Only the removed backend's keys move, and those are about 1/8 of them.
    assert all(before[i] == 3 for i in moved)
    assert len(moved) == counts[3]
    assert 0.7 / 8 <= len(moved) / len(KEYS) <= 1.3 / 8
    # Adding it back restores the original mapping.
    assert owners(ConsistentHash(), full) == before


def test_consistent_hash_bounded_load_caps_every_backend() -> None:
    n, factor = 8, 1.25
    strategy = ConsistentHash(balance_factor=factor, seed=1)
    v = view([1.0] * n)
    in_flight = v.in_flight
    assert isinstance(in_flight, list)
    hot = KEYS[:40] * 20  # a few keys, repeated: unbounded, their backends would pile up
    for total, key in enumerate(hot):
        slot = strategy.pick(v, -1, key)
        assert in_flight[slot] + 1 <= -(-factor * (total + 1) // n)
        in_flight[slot] += 1
    assert max(in_flight) <= -(-factor * len(hot) // n)
    unbounded = Counter(ConsistentHash().pick(v, -1, key) for key in hot)
    assert max(unbounded.values()) > 1.5 * len(hot) / n
    # Without load every key keeps its backend.
    idle = view([1.0] * n)
    assert owners(strategy, idle) == owners(ConsistentHash(), idle)


def test_consistent_hash_without_a_key_takes_the_less_loaded_of_two() -> None:
    counts = picks(ConsistentHash(seed=5), view([1.0] * 3, [0, 1, 2]), 3000)
    assert counts[2] == 0 and near(counts[0], 2000), counts


# Through real balancers -------------------------------------------------------------------


def wait_in_flight(balancer: Balancer, total: int) -> None:
    wait_for(lambda: in_flight(balancer) >= total, what=f"{total} calls in flight")


WEIGHTED = {"10.0.2.1:80": 1, "10.0.2.2:80": 1, "10.0.2.3:80": 1, "10.0.2.4:80": 3}


def weighted_balancer(strategy: str) -> Balancer:
    balancer = Balancer(backend_factory=Echo, strategy=strategy, monitor=False)
    for addr, weight in WEIGHTED.items():
        balancer.register(addr, weight)
    return balancer


def check_spread(strategy: str, loads: dict[str, int]) -> None:
    """12 calls held at once on weights 1, 1, 1, 3."""
    assert sum(loads.values()) == 12
    if strategy == "least_loaded":
        # Water-filling by in_flight / weight: exact whatever the order of picks.
        assert loads == {"10.0.2.1:80": 2, "10.0.2.2:80": 2, "10.0.2.3:80": 2, "10.0.2.4:80": 6}
    else:
        # Weighted random choice breaks these bounds in about half of all runs, power of
        # two choices in fewer than 1 in 10,000.
        assert loads["10.0.2.4:80"] >= 3, loads
        assert max(n for a, n in loads.items() if a != "10.0.2.4:80") <= 4, loads


@pytest.mark.parametrize("holders", ["threads", "processes"])
@pytest.mark.parametrize("strategy", ["least_loaded", "power_of_two"])
def test_in_flight_spread(strategy: str, holders: str) -> None:
    """Each holder sees the calls the others hold: 12 threads or forked processes, one call each."""
    ctx = multiprocessing.get_context("fork")
    gate: Any = threading.Event() if holders == "threads" else ctx.Event()
    holder: Any = threading.Thread if holders == "threads" else ctx.Process
    with weighted_balancer(strategy) as balancer:
        runners = [holder(target=hold_one_call, args=(balancer, gate)) for _ in range(12)]
        try:
            for i, runner in enumerate(runners):
                runner.start()
                wait_in_flight(balancer, i + 1)
            check_spread(strategy, in_flight_by_addr(balancer))
        finally:
            gate.set()
            for runner in runners:
                runner.join(30)
        assert in_flight(balancer) == 0


def test_concurrent_threads_keep_in_flight_spread() -> None:
    """Picks racing from 8 threads, calls of random length: no backend runs far ahead."""
    peaks: list[int] = []
    stop = threading.Event()
    with Balancer(
        ADDRS[:4], backend_factory=Echo, strategy="least_loaded", monitor=False
    ) as balancer:

        def watch() -> None:
            while not stop.is_set():
                loads = list(in_flight_by_addr(balancer).values())
                peaks.append(max(loads) - min(loads))
                time.sleep(0.001)

        def work(seed: int) -> None:
            for i in range(60):
                balancer.invoke(0.0005 * ((seed * 7 + i) % 5))

        watcher = threading.Thread(target=watch)
        watcher.start()
        workers = [threading.Thread(target=work, args=(s,)) for s in range(8)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        stop.set()
        watcher.join(30)
        assert in_flight(balancer) == 0
    # 8 calls over 4 backends: a spread of 2 each; racing picks may add one or two more.
    assert peaks and max(peaks) <= 5, Counter(peaks)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_skips_ejected_backends(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCHER_TEST_FAILING", ADDRS[1])
    with Balancer(
        ADDRS[:4], backend_factory=FailingOn, strategy=strategy, failure_threshold=1, monitor=False
    ) as balancer:
        answers = []
        for i in range(60):
            try:
                answers.append(balancer.invoke(None, key=i))
            except ConnectionError:
                answers.append("failed")
        assert answers.count("failed") == 1
        assert set(answers) - {"failed"} <= set(ADDRS[:4]) - {ADDRS[1]}


def sticky_picks(balancer: Balancer, queue: Any) -> None:
    """Spawned child: the backend of each of 50 keys, through the pickled balancer."""
    queue.put([balancer.invoke(None, key=f"session-{i}") for i in range(50)])
    balancer.close()


def test_sticky_keys_are_the_same_in_a_spawned_child() -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    strategy = ConsistentHash(balance_factor=1.25)
    with Balancer(ADDRS, backend_factory=Echo, strategy=strategy, monitor=False) as balancer:
        mine = [balancer.invoke(None, key=f"session-{i}") for i in range(50)]
        assert len(set(mine)) >= 6
        child = ctx.Process(target=sticky_picks, args=(balancer, queue))
        child.start()
        theirs = queue.get(timeout=60)
        child.join(60)
        assert child.exitcode == 0
    assert theirs == mine


def test_keys_move_only_from_a_removed_backend() -> None:
    keys = [f"k{i}" for i in range(1600)]
    with Balancer(
        ADDRS, backend_factory=Echo, strategy="consistent_hash", monitor=False
    ) as balancer:
        before = [balancer.invoke(None, key=k) for k in keys]
        gone = ADDRS[5]
        balancer.unregister(gone)
        after = [balancer.invoke(None, key=k) for k in keys]
    moved = [i for i in range(len(keys)) if before[i] != after[i]]
    assert all(before[i] == gone for i in moved)
    assert len(moved) == before.count(gone)
    assert 0.6 / 8 <= len(moved) / len(keys) <= 1.4 / 8


class Sleepy:
    """One backend (port 84) takes 40 ms; the others answer at once."""

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> str:
        if self.addr.endswith(":84"):
            time.sleep(0.04)
        return self.addr


def test_peak_ewma_avoids_the_slow_backend() -> None:
    addrs = [f"10.0.3.1:{port}" for port in (81, 82, 83, 84)]
    with Balancer(
        addrs, backend_factory=Sleepy, strategy=PeakEwma(seed=1), monitor=False
    ) as balancer:
        counts = Counter(balancer.invoke(None) for _ in range(300))
    # Probed once when new, then it loses every pair: round-robin would give it 75.
    assert counts["10.0.3.1:84"] <= 3, counts
    assert sum(counts.values()) == 300


def test_peak_ewma_avoids_a_backend_that_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_TEST_FAILING", ADDRS[0])
    with Balancer(
        ADDRS[:4],
        backend_factory=FailingOn,
        strategy="peak_ewma",
        failure_threshold=1000,
        monitor=False,
    ) as balancer:
        failed = 0
        for _ in range(300):
            try:
                balancer.invoke(None)
            except ConnectionError:
                failed += 1
    assert failed <= 3


@pytest.mark.parametrize(
    "strategy",
    ["weighted_round_robin", "weighted_random", "least_loaded", "power_of_two", "peak_ewma"],
)
def test_slow_start_ramps_a_new_backend_up(strategy: str) -> None:
    new = "10.0.4.9:80"
    clock = FakeClock()
    with clock.use(
        Balancer(
            ADDRS[:3], backend_factory=Echo, strategy=strategy, slow_start_seconds=10, monitor=False
        )
    ) as balancer:
        clock.advance(60)
        balancer.register(new)
        shares = []
        for elapsed in (0.0, 2.5, 2.5, 5.0):  # 0%, 25%, 50% and 100% of the window
            clock.advance(elapsed)
            shares.append(Counter(balancer.invoke(None) for _ in range(800))[new])
    # Weight 1 against three of weight 1: 10% warmth is a share of 1/31, full is 1/4.
    expected = [800 / 31, 800 * 0.25 / 3.25, 800 * 0.5 / 3.5, 200]
    assert shares[0] < shares[1] < shares[2] < shares[3], shares
    for got, want in zip(shares, expected, strict=True):
        assert near(got, want), (shares, expected)


def test_round_robin_random_and_consistent_hash_ignore_slow_start() -> None:
    new = "10.0.4.9:80"
    for strategy in ("round_robin", "random", "consistent_hash"):
        with FakeClock().use(
            Balancer(
                ADDRS[:3],
                backend_factory=Echo,
                strategy=strategy,
                slow_start_seconds=10,
                monitor=False,
            )
        ) as balancer:
            balancer.register(new)
            answers = Counter(balancer.invoke(None, key=i) for i in range(800))
            assert near(answers[new], 200), (strategy, answers)


# The worked example in docs/strategies.md ------------------------------------------------


def docs_example() -> dict[str, Any]:
    text = DOCS.read_text()
    match = re.search(r"<!-- example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/strategies.md lost its worked example"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), str(DOCS), "exec"), namespace)
    return namespace


def test_docs_custom_strategy_works_through_a_balancer() -> None:
    example = docs_example()
    spillover = example["Spillover"](limit=2)
    assert isinstance(spillover, Strategy)
    gate = threading.Event()
    with Balancer(ADDRS[:3], backend_factory=Echo, strategy=spillover, monitor=False) as balancer:
        # Idle: everything goes to the first backend.
        assert {balancer.invoke(None) for _ in range(20)} == {ADDRS[0]}
        threads = [threading.Thread(target=balancer.invoke, args=(gate,)) for _ in range(5)]
        try:
            for i, thread in enumerate(threads):
                thread.start()
                wait_in_flight(balancer, i + 1)
            # Filled in order, `limit` each, then the least loaded.
            assert in_flight_by_addr(balancer) == {ADDRS[0]: 2, ADDRS[1]: 2, ADDRS[2]: 1}
        finally:
            gate.set()
            for thread in threads:
                thread.join(30)
