"""Backends and child-process bodies shared by the tests (importable by spawned children)."""

from __future__ import annotations

import os
import time
from typing import Any

from dispatcher import Balancer


class Echo:
    """Answers with its own address; raises when asked to fail; waits on a gate if given one."""

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> str:
        if request == "fail":
            raise RuntimeError(f"{self.addr} failed on purpose")
        if hasattr(request, "wait"):
            request.wait(30)
        elif isinstance(request, float):
            time.sleep(request)
        return self.addr


class FailingOn:
    """Fails every call to the addresses in $DISPATCHER_TEST_FAILING (comma-separated)."""

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> str:
        if self.addr in os.environ.get("DISPATCHER_TEST_FAILING", "").split(","):
            raise ConnectionError(f"{self.addr} is down")
        return self.addr


def call_many(balancer: Balancer, calls: int) -> None:
    for _ in range(calls):
        balancer.invoke(None)
    balancer.close()


def call_many_attached(name: str, calls: int) -> None:
    with Balancer.attach(name, backend_factory=Echo) as balancer:
        for _ in range(calls):
            balancer.invoke(None)


def hold_one_call(balancer: Balancer, gate: Any) -> None:
    balancer.invoke(gate)


def register_from_child(balancer: Balancer, addr: str) -> None:
    balancer.register(addr)
    balancer.close()


def picks_after_change(balancer: Balancer, ready: Any, go: Any, out: Any) -> None:
    """Report picks before and after the parent changes membership."""
    out.put(sorted({balancer.invoke(None) for _ in range(6)}))
    ready.set()
    go.wait(30)
    out.put(sorted({balancer.invoke(None) for _ in range(6)}))
    balancer.close()


def hold_the_lock(balancer: Balancer, ready: Any, write_holder: bool, seconds: float) -> None:
    """Take the balancer's shared lock and keep it, as a process that hangs or dies in it."""
    state = balancer._state
    if write_holder:
        state._lock(time.monotonic_ns())
    else:
        state.lock.acquire()
    ready.set()
    time.sleep(seconds)
    state._unlock()
