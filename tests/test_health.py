"""Active health checks, outlier limits and retries, against real HTTP servers on loopback."""

from __future__ import annotations

import contextlib
import http.server
import multiprocessing
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from dispatcher import (
    BackendError,
    Balancer,
    HealthCheck,
    HttpRequest,
    NoBackendAvailable,
)
from dispatcher._health import HealthTracker
from tests import helpers
from tests.helpers import Echo, LoopbackServer, totals, wait_for


class Server(LoopbackServer):
    """A loopback HTTP server whose health endpoint and answers can be switched."""

    healthy = True
    failing = False


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def do_GET(self) -> None:
        if self.path == "/healthz":
            status = 200 if self.server.healthy else 503
        else:
            status = 500 if self.server.failing else 200
        body = str(self.server.port).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def servers(serve: Callable[..., Server]) -> list[Server]:
    return [serve(Handler, cls=Server) for _ in range(3)]


def stats_of(b: Balancer) -> dict[str, Any]:
    return {s.addr: s for s in b.snapshot()}


def test_tracker_needs_fall_failures_to_go_down_and_rise_passes_to_come_back() -> None:
    tracker = HealthTracker(rise=2, fall=3)
    seen = [tracker.observe("a", passed) for passed in [False, False, True, False, False, False]]
    assert seen == [False, False, False, False, False, True]
    seen = [tracker.observe("a", passed) for passed in [True, False, True, True]]
    assert seen == [True, True, True, False]
    tracker.forget(set())
    assert tracker.observe("a", False) is False


@pytest.mark.parametrize(
    "kwargs",
    [{"path": "healthz"}, {"interval": 0}, {"rise": 0}, {"fall": -1}, {"timeout": float("nan")}],
)
def test_health_check_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        HealthCheck(**kwargs)


@pytest.mark.monitor
def test_failing_health_checks_take_a_backend_out_and_passing_ones_bring_it_back(
    servers: list[Server],
) -> None:
    check = HealthCheck(path="/healthz", interval=0.05, rise=2, fall=2, timeout=1.0)
    sick = servers[0]
    with Balancer([s.addr for s in servers], health_check=check) as b:
        sick.healthy = False
        wait_for(lambda: stats_of(b)[sick.addr].down)
        ports = {b.invoke(HttpRequest("GET", "/")).body for _ in range(20)}
        assert str(sick.port).encode() not in ports and len(ports) == 2
        sick.healthy = True
        wait_for(lambda: not stats_of(b)[sick.addr].down)
        ports = {b.invoke(HttpRequest("GET", "/")).body for _ in range(20)}
        assert str(sick.port).encode() in ports


@pytest.mark.monitor
def test_a_passing_health_check_ends_a_passive_ejection(servers: list[Server]) -> None:
    check = HealthCheck(path="/healthz", interval=0.05)
    bad = servers[0]
    with Balancer(
        [s.addr for s in servers], health_check=check, failure_threshold=1, ejection_seconds=300
    ) as b:
        bad.failing = True
        ejected = False
        for _ in range(100):
            ejected = stats_of(b)[bad.addr].ejected
            if ejected:
                break
            with contextlib.suppress(BackendError):
                b.invoke(HttpRequest("GET", "/"))
        assert ejected
        # Its health endpoint still answers 200: the next probe un-ejects it.
        wait_for(lambda: not stats_of(b)[bad.addr].ejected)


@pytest.mark.monitor
def test_user_callable_health_check(servers: list[Server]) -> None:
    check = HealthCheck(interval=0.05, fall=1, check=helpers.always_false)
    with Balancer([s.addr for s in servers], health_check=check, panic_percent=0) as b:
        wait_for(lambda: all(s.down for s in b.snapshot()))
        with pytest.raises(NoBackendAvailable, match="none of the 3"):
            b.invoke(HttpRequest("GET", "/"))


def test_panic_routes_to_every_backend_when_too_few_are_eligible() -> None:
    addrs = [f"10.0.2.{i}:80" for i in range(1, 5)]
    with Balancer(
        addrs, backend_factory=Echo, failure_threshold=1, max_ejected_percent=100, monitor=False
    ) as b:
        for _ in range(3):  # three different backends fail once each: 1 of 4 left
            with pytest.raises(ConnectionError):
                b.invoke("fail")
        assert sum(s.ejected for s in b.snapshot()) == 3
        # Below 50% eligible: every registered backend takes calls again.
        assert Counter(b.invoke(None) for _ in range(8)) == dict.fromkeys(addrs, 2)


def test_retries_go_to_different_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    addrs = [f"10.0.3.{i}:80" for i in range(1, 6)]
    monkeypatch.setenv("DISPATCHER_TEST_FAILING", ",".join(addrs[:3]))
    with Balancer(
        addrs,
        backend_factory=helpers.FailingOn,
        strategy="round_robin",  # each failing backend comes first in turn
        failure_threshold=100,
        monitor=False,
    ) as b:
        for _ in range(10):
            assert b.invoke(None, retries=3) in addrs[3:]
            assert b._state.retries() == 0  # every retry gave its budget back
        failures = [stats_of(b)[a].failures for a in addrs]
        assert failures[3:] == [0, 0] and min(failures[:3]) >= 1
        monkeypatch.setenv("DISPATCHER_TEST_FAILING", ",".join(addrs))
        with pytest.raises(ConnectionError):
            b.invoke(None, retries=10)
        before = sum(failures)
        # Ten retries allowed, but only five distinct backends to try.
        assert sum(s.failures for s in b.snapshot()) == before + 5
        assert b._state.retries() == 0


def test_retry_budget_is_shared_and_bounds_concurrent_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    addrs = [f"10.0.4.{i}:80" for i in range(1, 4)]
    monkeypatch.setenv("DISPATCHER_TEST_FAILING", ",".join(addrs))
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    with Balancer(
        addrs, backend_factory=helpers.FailingOn, failure_threshold=100, monitor=False
    ) as b:
        # Another process has the budget's floor under way: three retries at once, anywhere.
        other = ctx.Process(target=helpers.hold_retries, args=(b, 3, held, release))
        other.start()
        try:
            assert held.wait(30)
            assert b._state.retries() == 3
            with pytest.raises(ConnectionError):
                b.invoke(None, retries=2)
            assert totals(b) == (1, 1, 0)  # no retry was allowed
        finally:
            release.set()
            other.join(30)
        assert other.exitcode == 0
        assert b._state.retries() == 0
        # With the budget free again, the same call is retried.
        with pytest.raises(ConnectionError):
            b.invoke(None, retries=2)
        assert totals(b) == (4, 4, 0)
        assert b._state.retries() == 0


def test_retries_stop_at_the_deadline() -> None:
    addrs = [f"10.0.5.{i}:80" for i in range(1, 11)]
    with Balancer(
        addrs, backend_factory=helpers.SlowFail, failure_threshold=100, monitor=False
    ) as b:
        with pytest.raises(TimeoutError):
            b.invoke(None, timeout=0.12, retries=50)
        attempts = sum(s.requests for s in b.snapshot())
        assert 1 <= attempts < 10  # each attempt takes 0.05 s: the deadline ends them early
