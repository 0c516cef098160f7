"""The Balancer in one process: picks, outcomes, ejection, membership, errors, lifetime."""

from __future__ import annotations

import os
import pickle
import threading
from collections import Counter
from typing import Any

import pytest

from dispatcher import (
    Backend,
    BackendError,
    Balancer,
    CapacityExceeded,
    DispatcherError,
    DuplicateBackend,
    InvalidAddress,
    NoBackendAvailable,
    SegmentError,
    UnknownBackend,
)
from dispatcher._segment import NAME_PREFIX
from tests.helpers import (
    Echo,
    FakeClock,
    in_flight,
    in_flight_by_addr,
    requests_by_addr,
    wait_for,
)

ADDRS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]


def test_balancer_is_a_backend() -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as balancer:
        assert isinstance(balancer, Backend)
        assert balancer.is_owner
        assert balancer.name.startswith(NAME_PREFIX)


def test_round_robin_is_exact_and_in_order() -> None:
    with Balancer(ADDRS, backend_factory=Echo, strategy="round_robin", monitor=False) as balancer:
        answers = [balancer.invoke(None) for _ in range(9)]
        assert answers == ADDRS * 3
        assert requests_by_addr(balancer) == dict.fromkeys(ADDRS, 3)


def test_least_loaded_avoids_busy_backends_and_shares_ties() -> None:
    gate = threading.Event()
    with Balancer(ADDRS, backend_factory=Echo, strategy="least_loaded", monitor=False) as balancer:
        held = threading.Thread(target=balancer.invoke, args=(gate,))
        held.start()
        wait_for(lambda: in_flight(balancer) >= 1, what="the held call")
        busy = next(a for a, n in in_flight_by_addr(balancer).items() if n)
        picks = Counter(balancer.invoke(None) for _ in range(100))
        gate.set()
        held.join()
        assert busy not in picks
        assert all(35 <= n <= 65 for n in picks.values()), picks
        # With nothing in flight every backend ties: ties are shared, not all sent to slot 0.
        shares = Counter(balancer.invoke(None) for _ in range(300))
        assert all(80 <= shares[a] <= 120 for a in ADDRS), shares


def test_least_loaded_weighs_in_flight_by_weight() -> None:
    gates = [threading.Event() for _ in range(3)]
    with Balancer(backend_factory=Echo, strategy="least_loaded", monitor=False) as balancer:
        balancer.register("heavy:1", weight=4)
        balancer.register("light:1", weight=1)
        threads = [threading.Thread(target=balancer.invoke, args=(g,)) for g in gates]
        for t in threads:
            t.start()
        wait_for(lambda: in_flight(balancer) >= 3, what="the held calls")
        # Whatever the first three took, at 3 in flight the weight-4 backend is the lighter.
        assert in_flight_by_addr(balancer)["heavy:1"] >= 2
        for g in gates:
            g.set()
        for t in threads:
            t.join()


def test_exceptions_reach_the_caller_unchanged_and_count_as_failures() -> None:
    with Balancer(ADDRS[:1], backend_factory=Echo, failure_threshold=3, monitor=False) as balancer:
        with pytest.raises(ConnectionError, match="failed on purpose") as info:
            balancer.invoke("fail")
        assert type(info.value) is ConnectionError
        (stats,) = balancer.snapshot()
        assert (stats.requests, stats.failures, stats.consecutive_failures) == (1, 1, 1)
        assert stats.in_flight == 0
        assert stats.last_failure is not None
        balancer.invoke(None)
        (stats,) = balancer.snapshot()
        assert (stats.requests, stats.failures, stats.consecutive_failures) == (2, 1, 0)


def test_cancelled_call_ends_in_flight_without_counting() -> None:
    class Interrupting:
        def __init__(self, addr: str) -> None:
            pass

        def invoke(self, request: Any, *, timeout: float | None = None) -> None:
            raise KeyboardInterrupt

    with Balancer(ADDRS[:1], backend_factory=Interrupting, monitor=False) as balancer:
        with pytest.raises(KeyboardInterrupt):
            balancer.invoke(None)
        (stats,) = balancer.snapshot()
        assert (stats.in_flight, stats.requests, stats.failures) == (0, 0, 0)


def test_consecutive_failures_eject_then_the_backend_returns() -> None:
    clock = FakeClock()
    balancer = Balancer(
        ADDRS,
        backend_factory=Echo,
        strategy="round_robin",  # the test steers its failures to ADDRS[0] with the cursor
        failure_threshold=2,
        ejection_seconds=30,
        monitor=False,
    )
    with clock.use(balancer) as b:
        bad = ADDRS[0]
        for _ in range(2):
            while b.invoke(None) != ADDRS[2]:
                pass
            with pytest.raises(ConnectionError):
                b.invoke("fail")  # the cursor now points at ADDRS[0]
        stats = {s.addr: s for s in b.snapshot()}
        assert stats[bad].ejected and stats[bad].times_ejected == 1
        assert stats[bad].ejected_until == pytest.approx(clock.now / 1e9 + 30, abs=1e-6)
        assert bad not in {b.invoke(None) for _ in range(20)}
        clock.advance(29.999)
        assert bad not in {b.invoke(None) for _ in range(20)}
        clock.advance(0.001)
        assert bad in {b.invoke(None) for _ in range(20)}
        stats = {s.addr: s for s in b.snapshot()}
        assert not stats[bad].ejected
        assert stats[bad].consecutive_failures == 0  # one success cleared them


def test_repeated_ejections_grow_up_to_the_cap() -> None:
    clock = FakeClock()
    balancer = Balancer(
        ADDRS,
        backend_factory=Echo,
        strategy="round_robin",  # the test steers its failures to ADDRS[0] with the cursor
        failure_threshold=1,
        ejection_seconds=0.05,
        max_ejection_seconds=0.12,
        monitor=False,
    )
    with clock.use(balancer) as b:
        durations = []
        for _ in range(3):
            # The backend comes back from its ejection still failing: the first answer ejects it.
            while b.invoke(None) != ADDRS[2]:
                pass
            with pytest.raises(ConnectionError):
                b.invoke("fail")
            stats = {s.addr: s for s in b.snapshot()}[ADDRS[0]]
            assert stats.ejected and stats.ejected_until is not None
            durations.append(stats.ejected_until - clock.now / 1e9)
            # Out until the very end of its ejection, back at it.
            clock.advance(durations[-1] - 1e-9)
            assert {s.addr: s for s in b.snapshot()}[ADDRS[0]].ejected
            clock.advance(1e-9)
            assert not {s.addr: s for s in b.snapshot()}[ADDRS[0]].ejected
        assert durations == pytest.approx([0.05, 0.10, 0.12], abs=1e-6)


def test_never_ejects_the_last_eligible_backend() -> None:
    with Balancer(ADDRS[:2], backend_factory=Echo, failure_threshold=1, monitor=False) as b:
        for _ in range(10):
            with pytest.raises(ConnectionError):
                b.invoke("fail")
        stats = b.snapshot()
        assert [s.ejected for s in stats].count(True) == 1
        (left,) = [s.addr for s in stats if not s.ejected]
        assert [b.invoke(None) for _ in range(3)] == [left] * 3


def test_max_ejected_percent_caps_ejections() -> None:
    addrs = [f"10.0.1.{i}:80" for i in range(1, 5)]
    with Balancer(
        addrs, backend_factory=Echo, failure_threshold=1, max_ejected_percent=25, monitor=False
    ) as b:
        for _ in range(12):
            with pytest.raises(ConnectionError):
                b.invoke("fail")
        assert [s.ejected for s in b.snapshot()].count(True) == 1


def test_no_backend_available() -> None:
    with Balancer(backend_factory=Echo, monitor=False) as b:
        with pytest.raises(NoBackendAvailable, match="no backend is registered"):
            b.invoke(None)
        b.register("h:1")
        assert b.invoke(None) == "h:1"
        b.unregister("h:1")
        with pytest.raises(NoBackendAvailable):
            b.invoke(None)


def test_register_and_unregister_at_runtime() -> None:
    with Balancer(backend_factory=Echo, capacity=2, monitor=False) as b:
        b.register("A.example:80", weight=3)
        b.register("[::1]:81")
        with pytest.raises(DuplicateBackend):
            b.register("a.example:80")
        with pytest.raises(CapacityExceeded, match="capacity"):
            b.register("c:1")
        assert [(s.addr, s.weight) for s in b.snapshot()] == [
            ("a.example:80", 3),
            ("[::1]:81", 1),
        ]
        b.unregister("a.example:80")
        with pytest.raises(UnknownBackend):
            b.unregister("a.example:80")
        b.register("c:1")  # the freed slot is reused
        assert sorted(s.addr for s in b.snapshot()) == ["[::1]:81", "c:1"]
        assert {s.slot for s in b.snapshot()} == {0, 1}


def test_call_in_flight_on_an_unregistered_backend_leaves_no_count() -> None:
    gate = threading.Event()
    with Balancer(["old:1"], backend_factory=Echo, monitor=False) as b:
        call = threading.Thread(target=b.invoke, args=(gate,))
        call.start()
        wait_for(lambda: in_flight_by_addr(b) == {"old:1": 1}, what="the held call")
        b.unregister("old:1")
        b.register("new:1")  # takes the same slot
        gate.set()
        call.join()
        (stats,) = b.snapshot()
        assert (stats.addr, stats.in_flight, stats.requests) == ("new:1", 0, 0)
        assert b.invoke(None) == "new:1"


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda b: b.register(""), InvalidAddress),
        (lambda b: b.register("localhost"), InvalidAddress),
        (lambda b: b.register("h:0"), InvalidAddress),
        (lambda b: b.register("h:70000"), InvalidAddress),
        (lambda b: b.register("h:http"), InvalidAddress),
        (lambda b: b.register("a b:80"), InvalidAddress),
        (lambda b: b.register("h\x00:80"), InvalidAddress),
        (lambda b: b.register("x" * 1000 + ":80"), InvalidAddress),
        (lambda b: b.register(b"h:80"), TypeError),
        (lambda b: b.register("h:80", weight=0), ValueError),
        (lambda b: b.register("h:80", weight=-1), ValueError),
        (lambda b: b.register("h:80", weight=float("nan")), TypeError),
        (lambda b: b.register("h:80", weight=10**12), ValueError),
        (lambda b: b.register("h:80", weight=True), TypeError),
        (lambda b: b.register("10.0.0.1:80"), DuplicateBackend),
        (lambda b: b.unregister("nothere:80"), UnknownBackend),
        (lambda b: b.unregister("nothere"), InvalidAddress),
        (lambda b: b.invoke(None, timeout=float("nan")), ValueError),
        (lambda b: b.invoke(None, timeout=-1), ValueError),
        (lambda b: b.invoke(None, timeout=0), ValueError),
        (lambda b: b.invoke(None, timeout="1"), TypeError),
        (lambda b: b.invoke(None, key=1.5), TypeError),
    ],
)
def test_bad_input_is_a_typed_error_and_changes_nothing(call: Any, error: type) -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as b:
        b.invoke(None)
        before = b.snapshot()
        with pytest.raises(error):
            call(b)
        assert b.snapshot() == before


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"capacity": 0}, ValueError),
        ({"capacity": 2.5}, TypeError),
        ({"max_workers": 0}, ValueError),
        ({"failure_threshold": 0}, ValueError),
        ({"ejection_seconds": float("nan")}, ValueError),
        ({"ejection_seconds": -1}, ValueError),
        ({"slow_start_seconds": -1}, ValueError),
        ({"strategy": "fastest"}, ValueError),
        ({"strategy": 42}, TypeError),
        ({"backend_factory": "HttpBackend"}, TypeError),
        ({"addrs": "h:80"}, TypeError),
        ({"addrs": ["h:80", "H:80"]}, DuplicateBackend),
        ({"addrs": ["h:80", "bad"]}, InvalidAddress),
        ({"addrs": ["a:1", "b:1", "c:1"], "capacity": 2}, CapacityExceeded),
    ],
)
def test_bad_constructor_arguments_create_no_segment(kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        Balancer(**kwargs)


def test_errors_pickle() -> None:
    for error in [
        DuplicateBackend("h:1"),
        UnknownBackend("h:1"),
        BackendError("h:1", "HTTP 503", status=503),
        NoBackendAvailable("none"),
        CapacityExceeded("full"),
        InvalidAddress("bad"),
        SegmentError("gone"),
    ]:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert copy.__dict__ == error.__dict__
        assert isinstance(copy, DispatcherError)


def test_keys_are_accepted_and_hashed_stably() -> None:
    from dispatcher._balancer import key_hash_of as _key_hash

    assert _key_hash("user-1") == _key_hash(b"user-1")
    assert _key_hash(1) != _key_hash(2)
    assert 0 <= _key_hash(-(2**70)) < 2**64
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as b:
        assert b.invoke(None, key="user-1") in ADDRS


def test_close_unlinks_in_the_owner_and_later_calls_fail_clearly() -> None:
    b = Balancer(ADDRS, backend_factory=Echo, monitor=False)
    name = b.name
    assert os.path.exists(f"/dev/shm/{name}")
    b.close()
    b.close()
    assert not os.path.exists(f"/dev/shm/{name}")
    with pytest.raises(SegmentError, match="closed"):
        b.invoke(None)
    with pytest.raises(SegmentError):
        b.snapshot()
    with pytest.raises(SegmentError):
        Balancer.attach(name)


def test_attached_close_only_detaches_and_owner_close_stops_attached() -> None:
    # Round robin: one cursor for the owner and every handle attached to it.
    with Balancer(ADDRS, backend_factory=Echo, strategy="round_robin", monitor=False) as owner:
        attached = Balancer.attach(owner.name, backend_factory=Echo)
        assert not attached.is_owner
        assert attached.invoke(None) == ADDRS[0]
        attached.close()
        assert owner.invoke(None) == ADDRS[1]
        again = pickle.loads(pickle.dumps(owner))
        assert again.invoke(None) == ADDRS[2]
    with pytest.raises(SegmentError, match="closed by its owner"):
        again.invoke(None)
    again.close()


def test_attach_rejects_what_is_not_ours() -> None:
    from multiprocessing import shared_memory

    for name in ["", "a/b", "no-such-segment-here", "x\0y"]:
        with pytest.raises(SegmentError):
            Balancer.attach(name)
    other = shared_memory.SharedMemory(NAME_PREFIX + "foreign", create=True, size=4096)
    try:
        other.buf[:8] = b"notours!"
        with pytest.raises(SegmentError, match="not a dispatcher segment"):
            Balancer.attach(other.name)
    finally:
        other.close()
        other.unlink()


def test_segment_is_owner_only() -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as b:
        assert os.stat(f"/dev/shm/{b.name}").st_mode & 0o777 == 0o600


def test_unshared_balancer_works_in_one_process_and_refuses_to_pickle() -> None:
    with Balancer(ADDRS, backend_factory=Echo, strategy="round_robin", shared=False) as b:
        assert [b.invoke(None) for _ in range(3)] == ADDRS
        assert b.name == ""
        with pytest.raises(TypeError, match="one process"):
            pickle.dumps(b)


def test_custom_strategy_object() -> None:
    class Last:
        uses_cursor = False

        def pick(self, view: Any, cursor: int, key: int | None) -> int:
            return int(view.slots[-1])

    class Wrong:
        uses_cursor = False

        def pick(self, view: Any, cursor: int, key: int | None) -> int:
            return 99

    with Balancer(ADDRS, backend_factory=Echo, strategy=Last(), monitor=False) as b:
        assert {b.invoke(None) for _ in range(5)} == {ADDRS[-1]}
    with Balancer(ADDRS, backend_factory=Echo, strategy=Wrong(), monitor=False) as b:
        with pytest.raises(DispatcherError, match="chose 99"):
            b.invoke(None)
        assert in_flight(b) == 0


def test_drain_stops_new_calls_and_frees_the_slot_when_calls_end() -> None:
    gate = threading.Event()
    with Balancer(
        ["old:1", "other:1"], backend_factory=Echo, strategy="least_loaded", monitor=False
    ) as b:
        b.drain("other:1")  # nothing in flight: freed at once
        assert [s.addr for s in b.snapshot()] == ["old:1"]
        b.register("other:1")
        call = threading.Thread(target=b.invoke, args=(gate,))
        call.start()
        wait_for(lambda: in_flight(b) >= 1, what="the held call")
        busy = next(a for a, n in in_flight_by_addr(b).items() if n)
        b.drain(busy)
        stats = {s.addr: s for s in b.snapshot()}
        assert stats[busy].draining and stats[busy].in_flight == 1
        idle = next(a for a in stats if a != busy)
        assert {b.invoke(None) for _ in range(10)} == {idle}
        gate.set()
        call.join()
        assert [(s.addr, s.in_flight) for s in b.snapshot()] == [(idle, 0)]


def test_registering_a_draining_backend_puts_it_back() -> None:
    gate = threading.Event()
    with Balancer(["a:1"], backend_factory=Echo, monitor=False) as b:
        call = threading.Thread(target=b.invoke, args=(gate,))
        call.start()
        wait_for(lambda: in_flight(b) >= 1, what="the held call")
        b.drain("a:1")
        with pytest.raises(NoBackendAvailable):
            b.invoke(None)
        b.register("a:1", weight=2)
        (stats,) = b.snapshot()
        assert (stats.draining, stats.weight, stats.in_flight) == (False, 2, 1)
        gate.set()
        call.join()
        assert b.invoke(None) == "a:1"
        (stats,) = b.snapshot()
        assert (stats.in_flight, stats.requests) == (0, 2)


def test_slow_start_applies_to_backends_added_later_not_to_the_first_ones() -> None:
    clock = FakeClock()
    balancer = Balancer(["first:1"], backend_factory=Echo, slow_start_seconds=60, monitor=False)
    with clock.use(balancer) as b:
        b.register("later:1", weight=10)
        stats = {s.addr: s for s in b.snapshot()}
        assert stats["first:1"].effective_weight == 1
        assert stats["later:1"].effective_weight == pytest.approx(1.0)  # 10% of 10: just added
        clock.advance(30)
        stats = {s.addr: s for s in b.snapshot()}
        assert stats["first:1"].effective_weight == 1
        assert stats["later:1"].effective_weight == pytest.approx(5.0)  # halfway through
        clock.advance(30)
        assert {s.addr: s.effective_weight for s in b.snapshot()} == {"first:1": 1, "later:1": 10}
