"""The compiled core against its reference: the same operations leave the same bytes.

Two balancers in one process (same pid, same clock readings, same random turns), one on the
compiled core and one on the pure Python path, go through the same script: calls that
succeed, fail, nest (so spans are loaded), retry, wait for a held lock, end after their
backend was drained or unregistered, eject a backend and see it return. Their segments must
then be equal word for word, apart from the words that name the segment itself.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

import dispatcher._state
import dispatcher._strategies
from dispatcher import (
    BackendError,
    Balancer,
    LeastLoaded,
    PeakEwma,
    PowerOfTwo,
    RoundRobin,
    Strategy,
)
from dispatcher import _layout as L
from dispatcher._core import CORE, PURE_PYTHON_VARIABLE, speedups
from tests.helpers import FakeClock

pytestmark = pytest.mark.skipif(speedups is None, reason=f"core: {CORE}")

ADDRS = [f"10.0.9.{i}:80" for i in range(1, 7)]
START_NS = 10**15

NAMING_WORDS = {
    *range(L.H_LOCK_NAME, L.H_STRATEGY_NAME),
    *range(L.H_SHARED_NAME, L.H_LATENCY),
    L.H_SCOPE_KEY,
    L.H_SCOPE_KEY + 1,
}
"""Header words that hold the segment's and its lock's names: the only ones that may differ."""


class Scripted:
    """A backend that does what the request says, through the balancer it belongs to."""

    balancer: Balancer
    clock: FakeClock

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> Any:
        self.clock.advance(0.003 + 0.001 * ADDRS.index(self.addr))
        if request == "fail" or (request == "fail-first" and self.addr == ADDRS[0]):
            raise BackendError(self.addr, "failed")
        if request == "nest":
            return [self.addr, self.balancer.invoke("ok")]
        if request == "drain":
            self.balancer.drain(self.addr)
        if request == "unregister":
            self.balancer.unregister(self.addr)
        return self.addr

    def close(self) -> None:
        pass


def script(balancer: Balancer, clock: FakeClock) -> list[Any]:
    """Drive `balancer` through every path of the two holds; what each call returned."""
    Scripted.balancer, Scripted.clock = balancer, clock
    random.seed(11)  # the same draws for the strategies that draw
    seen: list[Any] = []

    def call(request: str, **options: Any) -> None:
        try:
            seen.append(balancer.invoke(request, **options))
        except BackendError as error:
            seen.append(str(error))
        clock.advance(0.001)

    for _ in range(20):
        call("ok")
    for _ in range(6):
        call("nest")
    for _ in range(18):
        call("fail")
    for _ in range(4):
        call("fail-first", retries=2)
    held = threading.Event()
    free = threading.Event()

    def hold() -> None:
        balancer._state.lock.run(lambda: (held.set(), free.wait(5)))

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    threading.Timer(0.05, free.set).start()
    call("ok")  # the lock is taken: both cores wait, then count
    holder.join()
    call("drain")
    call("unregister")
    balancer.register(seen[-1], weight=2)  # the backend the call went to
    clock.advance(40)  # every ejection has ended
    for _ in range(12):
        call("ok")
    return seen


def pair(
    strategy: Callable[[], Strategy], monkeypatch: pytest.MonkeyPatch
) -> tuple[Balancer, Balancer, FakeClock, FakeClock]:
    """A balancer on the compiled core and one on the pure Python path, each on its clock."""
    options: dict[str, Any] = {
        "backend_factory": Scripted,
        "strategy": strategy(),
        "failure_threshold": 3,
        "ejection_seconds": 30,
        "latency": True,
        "monitor": False,
    }
    random.seed(7)
    compiled = Balancer(ADDRS, **options)
    with monkeypatch.context() as patch:
        patch.setattr(dispatcher._state, "speedups", None)
        patch.setattr(dispatcher._strategies, "speedups", None)
        random.seed(7)
        pure = Balancer(ADDRS, **{**options, "strategy": strategy()})
    clocks = FakeClock(START_NS), FakeClock(START_NS)
    return clocks[0].use(compiled), clocks[1].use(pure), *clocks


def differing(a: Balancer, b: Balancer) -> list[int]:
    left, right = a._state.words, b._state.words
    assert len(left) == len(right)
    return [i for i in range(len(left)) if left[i] != right[i] and i not in NAMING_WORDS]


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "least_loaded": LeastLoaded,
    "peak_ewma": lambda: PeakEwma(seed=3),
    "power_of_two": lambda: PowerOfTwo(seed=3),
    "round_robin": RoundRobin,
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_both_cores_leave_the_same_bytes(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled, pure, compiled_clock, pure_clock = pair(STRATEGIES[strategy], monkeypatch)
    with compiled, pure:
        assert type(compiled._state.commit) is not type(pure._state.commit)
        assert script(compiled, compiled_clock) == script(pure, pure_clock)
        assert differing(compiled, pure) == []
        assert sum(s.requests for s in compiled.snapshot()) > 30
        assert any(s.times_ejected for s in compiled.snapshot())


def test_the_version_says_which_core_runs() -> None:
    def version(**env: str) -> str:
        command = [sys.executable, "-m", "dispatcher", "--version"]
        done = subprocess.run(
            command, capture_output=True, text=True, check=True, env={**env, "PATH": ""}
        )
        return done.stdout.strip()

    assert version().endswith("core: compiled")
    assert version(**{PURE_PYTHON_VARIABLE: "1"}).endswith(
        f"core: pure Python ({PURE_PYTHON_VARIABLE} is set)"
    )
