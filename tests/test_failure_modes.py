"""Strategies under the failures that motivate them, against real HTTP backends on loopback.

The backends are `scripts/_bench_http_backend.py` processes (asyncio, a few requests served at
a time, the rest queued), made to fail fast, answer slowly for a while, or report their load.
The calls come from several forked worker processes sharing one balancer, as a pre-fork server
makes them. `scripts/failure_modes.py` runs the same scenarios longer, at Linkerd's scale, and
prints the tables of docs/strategies.md.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher import (
    BackendError,
    Balancer,
    ClientSideWeightedRoundRobin,
    ConsistentHash,
    HttpBackend,
    HttpRequest,
    _strategies,
)
from dispatcher._orca import HEADER, parse_load_report
from tests.helpers import free_port, wait_for

BACKEND = Path(__file__).resolve().parent.parent / "scripts" / "_bench_http_backend.py"
NO_EJECTION = 10**9
"""A `failure_threshold` no backend reaches: ejection off, so the strategy alone decides."""

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def backends(
    count: int, *, mean_ms: float = 5.0, slots: int = 4, orca: bool = False
) -> Iterator[list[str]]:
    """`count` backend processes on loopback; their addresses, in id order."""
    ports = [free_port() for _ in range(count)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(BACKEND), "--port", str(port), "--id", str(i)]
            + ["--mean-ms", str(mean_ms), "--slots", str(slots), "--seed", str(i)]
            + (["--orca"] if orca else []),
            stdout=subprocess.DEVNULL,
        )
        for i, port in enumerate(ports)
    ]
    try:
        for port in ports:
            wait_for(lambda port=port: _listening(port), what=f"backend on {port}")
        yield [f"127.0.0.1:{port}" for port in ports]
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _listening(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def behave(addr: str, **query: object) -> None:
    """Set `addr`'s failure mode (see `_bench_http_backend.py`)."""
    args = "&".join(f"{k}={v}" for k, v in query.items())
    with urllib.request.urlopen(f"http://{addr}/_behave?{args}", timeout=5) as answer:
        assert answer.status == 200


class Reporting(HttpBackend):
    """`HttpBackend` whose answers carry the backend's load report, as HTTP clients read it."""

    def invoke(self, request: HttpRequest, *, timeout: float | None = None) -> Any:
        answer = super().invoke(request, timeout=timeout)
        value = answer.headers.get(HEADER)
        return _Answer(answer.body, parse_load_report(value) if value else None)


class _Answer:
    def __init__(self, body: bytes, load_report: Any) -> None:
        self.body = body
        self.load_report = load_report


def call_for(balancer: Balancer, seconds: float, threads: int, out: Any) -> None:
    """A worker process: `threads` threads call in a closed loop for `seconds`; report
    (time, backend id or -1 for a failure) for every call."""
    seen: list[tuple[float, int]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run() -> None:
        request = HttpRequest("GET", "/")
        while time.monotonic() < deadline:
            try:
                body = balancer.invoke(request, timeout=1.0).body
                answer = int(body)
            except BackendError:
                answer = -1
            with lock:
                seen.append((time.monotonic(), answer))

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    balancer.close()
    out.put(seen)


def drive(
    balancer: Balancer, seconds: float, processes: int = 3, threads: int = 6
) -> list[tuple[float, int]]:
    """Calls from `processes` forked workers sharing `balancer`; every (time, answer)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    workers = [
        ctx.Process(target=call_for, args=(balancer, seconds, threads, out))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    calls = [entry for _ in workers for entry in out.get(timeout=seconds + 60)]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    return calls


@pytest.mark.parametrize("strategy", ["least_loaded", "power_of_two", "peak_ewma"])
def test_a_backend_that_fails_fast_gets_no_more_than_its_share(strategy: str) -> None:
    """It answers 503 at once, so it always looks idle: counted as calls in flight, its recent
    failures keep it from drawing the calls the others are busy with. Ejection is off."""
    with backends(4, mean_ms=10.0, slots=2) as addrs:
        behave(addrs[0], mode="fail")
        with Balancer(
            addrs, strategy=strategy, failure_threshold=NO_EJECTION, monitor=False
        ) as balancer:
            calls = drive(balancer, seconds=2.0)
    failed = sum(answer == -1 for _, answer in calls)
    # Fair share is a quarter; with failures counted as load it gets a few percent. Without,
    # least_loaded sent it most calls (it is the only backend with nothing in flight).
    assert failed / len(calls) < 0.25, (failed, len(calls))


def test_peak_ewma_comes_back_to_a_backend_that_is_fast_again() -> None:
    """One slow spell must not cost a backend its share for good: with nothing new to go by,
    its average is not trusted after `_latency.STALE_NS` (2 s), it is tried again, and its
    fast answers bring it back to its share."""
    with backends(4, mean_ms=5.0, slots=4) as addrs:
        start = time.monotonic_ns()
        recovered = start + 1_500_000_000
        behave(addrs[0], mode="slow", ms=500, until=recovered)
        with Balancer(
            addrs, strategy="peak_ewma", failure_threshold=NO_EJECTION, monitor=False
        ) as balancer:
            calls = drive(balancer, seconds=6.0, processes=2, threads=4)
    late = [answer for t, answer in calls if t * 1e9 >= recovered + 3_000_000_000]
    share = Counter(late)[0] / len(late)
    # Fair share is a quarter; half of it is far out of reach of chance over hundreds of
    # calls. Before, the once-slow backend got no call at all after it recovered.
    assert share > 0.125, (share, len(late))


def test_a_held_backend_costs_a_few_timeouts_not_one_a_second() -> None:
    """A backend that holds calls past the timeout: a timeout costs more than any answer, so
    after its first timeouts nothing more goes to it (Linkerd's 99.9% experiment)."""
    with backends(4, mean_ms=5.0, slots=4) as addrs:
        behave(addrs[0], mode="hold", ms=2000)
        with Balancer(
            addrs, strategy="peak_ewma", failure_threshold=NO_EJECTION, monitor=False
        ) as balancer:
            calls = drive(balancer, seconds=4.0, processes=2, threads=4)
    failed = [t for t, answer in calls if answer == -1]
    # The first call to the unmeasured backend waits out its 1 s timeout; whatever else was
    # sent before that timeout was known, nothing after it.
    assert len(failed) <= 4, (len(failed), len(calls))
    assert 1 - len(failed) / len(calls) >= 0.995


def test_a_ring_is_built_once_per_registration_not_per_ejection() -> None:
    """Ejections and health changes only mask the ring's points; a registration moves one
    slot's points in or out, and leaves the ring as a full build would make it."""
    addrs = [f"10.0.{i // 250}.{i % 250 + 1}:80" for i in range(60)]

    class Flaky:
        def __init__(self, addr: str) -> None:
            self.addr = addr

        def invoke(self, request: Any, *, timeout: float | None = None) -> str:
            if request == self.addr:
                raise ConnectionError(f"{self.addr} is down")
            return self.addr

    strategy = ConsistentHash()
    with Balancer(
        addrs, backend_factory=Flaky, strategy=strategy, failure_threshold=1, monitor=False
    ) as balancer:
        keys = [f"user-{i}" for i in range(300)]
        before = {key: balancer.invoke(None, key=key) for key in keys}
        ring = strategy._ring
        victim = before[keys[0]]
        with pytest.raises(ConnectionError):
            balancer.invoke(victim, key=keys[0])  # one failure ejects it
        assert sum(s.ejected for s in balancer.snapshot()) == 1
        after = {key: balancer.invoke(None, key=key) for key in keys}
        assert strategy._ring is ring  # masked, not rebuilt
        moved = {key for key in keys if after[key] != before[key]}
        assert moved == {key for key in keys if before[key] == victim}
        balancer.register("10.9.9.9:80")
        balancer.invoke(None, key=keys[0])
        members = strategy._ring.members
        assert strategy._ring.points == sorted(
            point for slot in members for point in _strategies._points(slot)
        )


def test_two_hosts_share_a_backends_load_through_its_reports() -> None:
    """Two hosts (two owners, two segments) call the same backends. Host A keeps backend 0
    busy; host B balances on the backends' own reports, so it sends backend 0 less."""
    with backends(3, mean_ms=20.0, slots=2, orca=True) as addrs:
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        host_a = Balancer([addrs[0]], monitor=False)
        try:
            busy = ctx.Process(target=call_for, args=(host_a, 6.0, 8, out))
            busy.start()
            strategy = ClientSideWeightedRoundRobin(blackout_seconds=0.5)
            with Balancer(
                addrs, backend_factory=Reporting, strategy=strategy, monitor=False
            ) as host_b:
                time.sleep(0.5)
                calls = drive(host_b, seconds=4.5, processes=2, threads=2)
            out.get(timeout=60)
            busy.join(30)
        finally:
            host_a.close()
    start = min(t for t, _ in calls)
    late = [answer for t, answer in calls if t >= start + 2.5]
    share = Counter(late)[0] / len(late)
    # An even split gives backend 0 a third. Its reports (queue per slot about 4, from host
    # A's eight threads on two slots) weigh it near a fifth of the others: about 10%.
    assert share < 0.25, (share, Counter(late))
