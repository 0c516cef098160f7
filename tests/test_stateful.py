"""Random sequences of membership changes, calls, failures and time, checked against a model.

Hypothesis drives one real shared-memory balancer (the monitor off, so the test owns time and
reaping) with register, unregister, drain, calls that succeed or fail, calls held in flight on
other threads and released later, and a settable clock. A plain Python model predicts, from
the backend each call reached, every number the balancer must show; after every step the
words of the segment are read directly to check what no snapshot shows: worker rows, free
slots, and that global in-flight is exactly the sum of the rows. Bad input, from invalid
addresses to NaN timeouts, must raise its typed error and leave every word as it was.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import dispatcher._balancer
from dispatcher import Balancer
from dispatcher import _layout as L
from dispatcher._address import parse_address
from dispatcher._strategies import (
    ConsistentHash,
    LeastLoaded,
    PeakEwma,
    PowerOfTwo,
    Random,
    RoundRobin,
    Strategy,
    WeightedRandom,
    WeightedRoundRobin,
)
from dispatcher.errors import (
    CapacityExceeded,
    DuplicateBackend,
    InvalidAddress,
    NoBackendAvailable,
    UnknownBackend,
)
from tests.helpers import FakeClock

NS = 1_000_000_000
CAPACITY = 4
MAX_WORKERS = 4
MAX_HELD = 3

LONGEST = "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 57 + ":65535"
"""A valid address of exactly 255 bytes: the most a slot holds."""

SPELLINGS = {
    "10.0.0.1:80": ["10.0.0.1:80"],
    "10.0.0.2:65535": ["10.0.0.2:65535"],
    "backend-a.example:8080": ["backend-a.example:8080", "Backend-A.Example.:8080"],
    "[2001:db8::1]:443": ["[2001:db8::1]:443", "[2001:DB8:0::1]:443"],
    "localhost:1": ["localhost:1", "LOCALHOST:1"],
    "b:9": ["b:9"],
    LONGEST: [LONGEST, LONGEST.upper()],
}
"""Seven backends, more than the capacity, each under every spelling that must mean it."""
ADDRESSES = [spelling for spellings in SPELLINGS.values() for spelling in spellings]

BAD_ADDRESSES = [
    "a" * 300 + ":80",
    LONGEST + "5",
    "d" + LONGEST,
    "10.0.0.1\x00:80",
    "10.0.0\x00.1:80",
    "h\u00e9llo:80",
    "\udcff:80",
    "10.0.0.1:\uff18\uff10",
    "10.0.0.1:0",
    "10.0.0.1:65536",
    "10.0.0.1:-1",
    "10.0.0.1:",
    "10.0.0.1",
    ":80",
    "",
    "10.0.0.1:80 ",
    "[::1:80",
    "[zz::1]:80",
    "300.0.0.1:80",
    "-bad.example:80",
    "a..b:80",
]
NOT_STRINGS = [b"10.0.0.1:80", None, 80, ("10.0.0.1", 80)]
BAD_WEIGHTS: list[object] = [0, -1, -(10**30), dispatcher._balancer.MAX_WEIGHT + 1, 10**30]
BAD_WEIGHTS += [math.nan, math.inf, -math.inf, 1.5, 1.0, True, "1", None]
BAD_TIMEOUTS = [math.nan, -1.0, -1, 0, 0.0, math.inf, -math.inf, 1e10, "1", True, [1.0]]
BAD_RETRIES = [-1, dispatcher._balancer.MAX_RETRIES + 1, 10**30, 1.5, math.nan, True, "1"]
BAD_KEYS = [1.5, math.nan, True, object(), [1], ("a",)]

STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "least_loaded": LeastLoaded,
    "random": lambda: Random(seed=7),
    "weighted_random": lambda: WeightedRandom(seed=7),
    "power_of_two": lambda: PowerOfTwo(seed=7),
    "consistent_hash": lambda: ConsistentHash(seed=7),
    "peak_ewma": lambda: PeakEwma(seed=7),
}


@dataclass
class Call:
    """A request: whether the backend fails it, and optionally a gate it waits on."""

    fail: bool
    gate: threading.Event | None = None
    entered: threading.Event = field(default_factory=threading.Event)
    addr: str = ""


class Scripted:
    """A backend whose answer the request decides; it logs every call it receives."""

    def __init__(self, addr: str, log: list[str]) -> None:
        self.addr = addr
        self.log = log

    def invoke(self, request: Call, *, timeout: float | None = None) -> str:
        self.log.append(self.addr)
        request.addr = self.addr
        request.entered.set()
        if request.gate is not None:
            request.gate.wait(30)
        if request.fail:
            raise ConnectionError(f"{self.addr} failed on purpose")
        return self.addr


@dataclass
class Model:
    """What the balancer must show for one registration of one backend."""

    weight: int
    epoch: int
    draining: bool = False
    in_flight: int = 0
    successes: int = 0
    failures: int = 0
    consecutive: int = 0
    times_ejected: int = 0
    ejected_until: int = 0


@dataclass
class Held:
    call: Call
    thread: threading.Thread
    addr: str
    epoch: int
    outcome: list[Any] = field(default_factory=list)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def comparable(b: Balancer) -> bytes:
    """Every byte of the segment except the lock holder's record, which any locked read moves."""
    data = bytearray(b._state.buffer)
    word = L.H_LOCK_PID
    data[word * L.WORD : (word + 1) * L.WORD] = bytes(L.WORD)
    return bytes(data)


class BalancerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(1_000 * NS)
        self.balancer: Balancer | None = None
        self.log: list[str] = []
        self.model: dict[str, Model] = {}
        self.held: list[Held] = []
        self.epochs = 0

    @property
    def now(self) -> int:
        return self.clock.now

    def teardown(self) -> None:
        for held in self.held:
            assert held.call.gate is not None
            held.call.gate.set()
        for held in self.held:
            held.thread.join(30)
        if self.balancer is not None:
            self.balancer.close()

    @property
    def b(self) -> Balancer:
        assert self.balancer is not None
        return self.balancer

    @initialize(
        strategy=st.sampled_from(sorted(STRATEGIES)),
        threshold=st.integers(1, 4),
        max_ejected_percent=st.sampled_from([0, 50, 100]),
        panic_percent=st.sampled_from([0, 50, 100]),
        slow_start=st.sampled_from([0.0, 10.0]),
        latency=st.booleans(),
        addrs=st.lists(st.sampled_from(ADDRESSES), max_size=CAPACITY, unique_by=parse_address),
    )
    def start(
        self,
        addrs: list[str],
        strategy: str,
        threshold: int,
        max_ejected_percent: int,
        panic_percent: int,
        slow_start: float,
        latency: bool,
    ) -> None:
        self.threshold = threshold
        self.latency = latency
        self.max_ejected_percent = max_ejected_percent
        self.panic_percent = panic_percent
        self.base_ns, self.max_ns = 10 * NS, 25 * NS
        self.balancer = Balancer(
            addrs,
            backend_factory=lambda addr: Scripted(addr, self.log),
            strategy=STRATEGIES[strategy](),
            capacity=CAPACITY,
            max_workers=MAX_WORKERS,
            failure_threshold=threshold,
            ejection_seconds=self.base_ns / NS,
            max_ejection_seconds=self.max_ns / NS,
            max_ejected_percent=max_ejected_percent,
            panic_percent=panic_percent,
            slow_start_seconds=slow_start,
            latency=latency,
            monitor=False,
        )
        self.clock.use(self.balancer)
        for addr in addrs:
            self.epochs += 1
            self.model[parse_address(addr)] = Model(1, self.epochs)

    # The model's predictions ----------------------------------------------------------------

    def eligible(self) -> set[str]:
        """Where the next pick may go: live and not ejected, or every live one in a panic."""
        rotation = {a for a, m in self.model.items() if not m.draining}
        eligible = {a for a in rotation if self.model[a].ejected_until <= self.now}
        if len(eligible) * 100 < self.panic_percent * len(rotation):
            event("panic")
            return rotation
        return eligible

    def may_eject(self, live: int, ejected: int) -> bool:
        if live - ejected <= 1:
            return False
        return ejected == 0 or (ejected + 1) * 100 <= self.max_ejected_percent * live

    def record(self, addr: str, failed: bool) -> None:
        """A call on the current registration of `addr` ended with this outcome."""
        m = self.model[addr]
        if not failed:
            m.successes += 1
            m.consecutive = 0
            return
        m.failures += 1
        m.consecutive += 1
        if m.consecutive < self.threshold or m.ejected_until > self.now:
            return
        live = [o for o in self.model.values() if not o.draining]
        ejected = sum(o.ejected_until > self.now for o in live)
        if self.may_eject(len(live), ejected):
            event("ejected")
            m.times_ejected += 1
            m.ejected_until = self.now + min(self.base_ns * m.times_ejected, self.max_ns)

    def unchanged_after(self, error: type[BaseException], action: Any) -> None:
        """`action` raises `error` and leaves every word of the segment as it was."""
        before = comparable(self.b)
        calls = len(self.log)
        with pytest.raises(error):
            action()
        assert comparable(self.b) == before
        assert len(self.log) == calls

    # Membership -------------------------------------------------------------------------------

    @rule(spelling=st.sampled_from(ADDRESSES), weight=st.sampled_from([1, 2, 5, 1_000_000]))
    def register(self, spelling: str, weight: int) -> None:
        addr = parse_address(spelling)
        m = self.model.get(addr)
        if m is not None and not m.draining:
            self.unchanged_after(DuplicateBackend, lambda: self.b.register(spelling, weight))
        elif m is not None:
            self.b.register(spelling, weight)
            m.draining, m.weight = False, weight
        elif len(self.model) == CAPACITY:
            event("capacity exceeded")
            self.unchanged_after(CapacityExceeded, lambda: self.b.register(spelling, weight))
        else:
            self.b.register(spelling, weight)
            self.epochs += 1
            self.model[addr] = Model(weight, self.epochs)

    @rule(spelling=st.sampled_from(ADDRESSES))
    def unregister(self, spelling: str) -> None:
        addr = parse_address(spelling)
        if addr not in self.model:
            self.unchanged_after(UnknownBackend, lambda: self.b.unregister(spelling))
            return
        self.b.unregister(spelling)
        del self.model[addr]

    @rule(spelling=st.sampled_from(ADDRESSES))
    def drain(self, spelling: str) -> None:
        addr = parse_address(spelling)
        if addr not in self.model:
            self.unchanged_after(UnknownBackend, lambda: self.b.drain(spelling))
            return
        self.b.drain(spelling)
        if self.model[addr].in_flight == 0:
            del self.model[addr]
        else:
            self.model[addr].draining = True

    # Calls ----------------------------------------------------------------------------------

    @rule(
        fail=st.booleans(),
        key=st.none() | st.integers(-(2**70), 2**70) | st.text(max_size=8) | st.binary(max_size=8),
        retries=st.sampled_from([0, 0, 1, 3]),
        timeout=st.sampled_from([None, 30.0, 10**9]),
    )
    def invoke(self, fail: bool, key: object, retries: int, timeout: float | None) -> None:
        start = len(self.log)
        try:
            answer = self.b.invoke(Call(fail), key=key, retries=retries, timeout=timeout)
        except ConnectionError:
            raised: type[BaseException] | None = ConnectionError
        except NoBackendAvailable:
            raised = NoBackendAvailable
        else:
            raised = None
        attempts = self.log[start:]
        assert self.b._state.retries() == 0
        if not attempts:
            event("no backend available")
            assert raised is NoBackendAvailable and not self.eligible()
            return
        tried: set[str] = set()
        for attempt, addr in enumerate(attempts):
            assert addr in self.eligible() - tried, (addr, self.eligible(), tried)
            tried.add(addr)
            self.record(addr, fail)
            if not fail:
                assert attempt == len(attempts) - 1
        if not fail:
            assert raised is None and answer == attempts[-1]
            return
        # A failing call is tried again, each time elsewhere, while anywhere else is eligible.
        assert len(attempts) == len(tried)
        event(f"failed after {len(attempts)} attempts")
        assert len(attempts) == retries + 1 or not self.eligible() - tried
        assert raised is ConnectionError

    @precondition(lambda self: len(self.held) < MAX_HELD)
    @rule(fail=st.booleans())
    def hold(self, fail: bool) -> None:
        """Start a call on another thread and keep it in flight until `release`."""
        if not self.eligible():
            return
        call = Call(fail, gate=threading.Event())
        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append(self.b.invoke(call))
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert call.entered.wait(10), outcome
        assert call.addr in self.eligible()
        m = self.model[call.addr]
        m.in_flight += 1
        self.held.append(Held(call, thread, call.addr, m.epoch, outcome))

    @precondition(lambda self: self.held)
    @rule(which=st.integers(0, MAX_HELD - 1))
    def release(self, which: int) -> None:
        held = self.held.pop(which % len(self.held))
        assert held.call.gate is not None
        held.call.gate.set()
        held.thread.join(10)
        assert not held.thread.is_alive()
        if held.call.fail:
            assert isinstance(held.outcome[0], ConnectionError)
        else:
            assert held.outcome == [held.addr]
        m = self.model.get(held.addr)
        if m is None or m.epoch != held.epoch:
            event("a held call ended after its backend was unregistered")
            return  # unregistered (and maybe registered again) meanwhile: no trace
        m.in_flight -= 1
        if m.draining and m.in_flight == 0:
            event("a held call ended a drain")
            del self.model[held.addr]
            return
        self.record(held.addr, held.call.fail)

    @rule(seconds=st.sampled_from([0.001, 1.0, 5.0, 9.999, 10.0, 30.0, 400.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def reap_finds_no_dead_worker(self) -> None:
        assert self.b.reap() == 0

    @rule()
    def repair_changes_no_count(self) -> None:
        before = self.b.snapshot()
        self.b._state.repair()
        assert self.b.snapshot() == before

    # Bad input ------------------------------------------------------------------------------

    @rule(
        case=st.one_of(
            st.tuples(st.sampled_from(BAD_ADDRESSES + NOT_STRINGS), st.sampled_from([1, 0])),
            st.tuples(st.sampled_from(ADDRESSES), st.sampled_from(BAD_WEIGHTS)),
        )
    )
    def register_bad_input(self, case: tuple[Any, Any]) -> None:
        addr, weight = case
        if not isinstance(addr, str):
            error: type[Exception] = TypeError
        elif addr in BAD_ADDRESSES:
            error = InvalidAddress
        else:
            error = ValueError if is_int(weight) else TypeError
        self.unchanged_after(error, lambda: self.b.register(addr, weight))

    @rule(addr=st.sampled_from(BAD_ADDRESSES + NOT_STRINGS), drain=st.booleans())
    def unregister_or_drain_bad_input(self, addr: Any, drain: bool) -> None:
        error = InvalidAddress if isinstance(addr, str) else TypeError
        change = self.b.drain if drain else self.b.unregister
        self.unchanged_after(error, lambda: change(addr))

    @rule(
        case=st.one_of(
            st.tuples(st.just("timeout"), st.sampled_from(BAD_TIMEOUTS)),
            st.tuples(st.just("retries"), st.sampled_from(BAD_RETRIES)),
            st.tuples(st.just("key"), st.sampled_from(BAD_KEYS)),
        ),
        fail=st.booleans(),
    )
    def invoke_bad_input(self, case: tuple[str, Any], fail: bool) -> None:
        argument, value = case
        if argument == "key":
            error: type[Exception] = TypeError
        else:
            numeric = is_int(value) or (argument == "timeout" and isinstance(value, float))
            error = ValueError if numeric else TypeError
        self.unchanged_after(error, lambda: self.b.invoke(Call(fail), **{argument: value}))

    # Invariants -----------------------------------------------------------------------------

    @invariant()
    def words_are_consistent(self) -> None:
        """What only the raw words show: signs, rows, free slots, addresses."""
        if self.balancer is None:
            return
        state = self.b._state
        words, lay, c = state.words, state.layout, state.layout.capacity

        def run(field: int) -> list[int]:
            return list(words[lay.field(field) : lay.field(field) + c])

        states, in_flight = run(L.STATE), run(L.IN_FLIGHT)
        counts = [
            run(f)
            for f in (L.REQUESTS, L.FAILURES, L.CONSECUTIVE_FAILURES, L.TIMES_EJECTED, L.WEIGHT)
        ]
        assert min(in_flight) >= 0 and all(min(r) >= 0 for r in counts)
        assert min(words[lay.histogram : lay.histogram + c * L.BUCKETS]) >= 0
        assert words[L.H_RETRIES] == 0

        rows = [list(words[state.row_base(r) : state.row_base(r) + c]) for r in range(MAX_WORKERS)]
        heads = [state.row_base(r) - L.W_HEADER for r in range(MAX_WORKERS)]
        claimed = [r for r, h in enumerate(heads) if words[h + L.W_PID]]
        assert [words[heads[r] + L.W_PID] for r in claimed] in ([], [os.getpid()])
        for r, row in enumerate(rows):
            assert min(row) >= 0
            assert words[heads[r] + L.W_RETRIES] == 0
            if r not in claimed:
                assert not any(row), (r, row)
        for slot in range(c):
            assert in_flight[slot] == sum(row[slot] for row in rows), (slot, in_flight, rows)
            assert states[slot] in (L.FREE, L.LIVE, L.DRAINING)
            if states[slot] == L.FREE:
                assert in_flight[slot] == 0

        buf, seen = state.buffer, []
        for slot in range(c):
            if states[slot] == L.FREE:
                continue
            offset = lay.addresses + slot * L.ADDRESS_BYTES
            addr = bytes(buf[offset + 1 : offset + 1 + buf[offset]]).decode("ascii")
            assert parse_address(addr) == addr
            seen.append(addr)
        assert len(seen) == len(set(seen))
        assert sorted(seen) == sorted(self.model)

    @invariant()
    def numbers_match_the_model(self) -> None:
        if self.balancer is None:
            return
        stats = {s.addr: s for s in self.b.snapshot()}
        assert stats.keys() == self.model.keys()
        for addr, m in self.model.items():
            s = stats[addr]
            assert s.requests == m.successes + m.failures, (addr, s, m)
            assert s.failures == m.failures, (addr, s, m)
            assert sum(s.histogram) == (s.requests if self.latency else 0)
            assert s.consecutive_failures == m.consecutive, (addr, s, m)
            assert s.in_flight == m.in_flight, (addr, s, m)
            assert s.draining == m.draining and s.weight == m.weight
            assert s.times_ejected == m.times_ejected, (addr, s, m)
            assert s.ejected == (m.ejected_until > self.now), (addr, s, m)


BalancerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_balancer_against_a_model = BalancerMachine.TestCase
