"""HttpBackend and a Balancer of them against real HTTP and HTTPS servers on loopback: answers,
failures that keep their answer, headers, TLS, health checks over HTTPS, caller mistakes that
count nothing, and the rule for what counts as a backend's failure."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher import (
    BackendError,
    Balancer,
    ConnectError,
    HealthCheck,
    HttpBackend,
    HttpHeaders,
    HttpRequest,
    HttpResponse,
    InvalidRequest,
    ReadTimeout,
    TLSError,
)
from tests.helpers import (
    TlsServer,
    client_context,
    free_port,
    server_context,
    totals,
    trusting_file,
    wait_for,
)


class Handler(http.server.BaseHTTPRequestHandler):
    """``GET /<status>[/slow]``; ``/peer`` answers with the client's port (the same port twice
    is one kept-alive connection); ``/headers`` repeats headers in odd cases; ``/orca?V``
    reports load V; ``/echo`` gives back what it got."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        getattr(self.server, "hits", []).append(self.path)
        path, _, arg = self.path.partition("?")
        if path == "/peer":
            self.answer(200, str(self.client_address[1]).encode())
        elif path == "/headers":
            self.answer(
                200,
                b"{}",
                [
                    ("Content-type", "application/json"),
                    ("Set-Cookie", "a=1"),
                    ("set-cookie", "b=2"),
                ],
            )
        elif path == "/orca":
            self.answer(200, b"", [("Endpoint-Load-Metrics", arg.replace("+", " "))])
        elif path == "/echo":
            seen = {"path": self.path, "headers": dict(self.headers.items())}
            self.answer(200, json.dumps(seen).encode())
        else:
            status = int(path.strip("/").split("/")[0] or 200)
            if path.endswith("/slow"):
                time.sleep(0.5)
            self.answer(status, f"{status} from {self.server.server_port}".encode())  # type: ignore[attr-defined]

    def do_POST(self) -> None:
        self.answer(200, self.rfile.read(int(self.headers["Content-Length"])))

    def answer(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(ConnectionError):  # a client that timed out has gone
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def servers(serve: Callable[..., Any]) -> list[str]:
    return [serve(Handler).addr for _ in range(2)]


@pytest.fixture(scope="module")
def ca() -> Any:
    return pytest.importorskip("trustme").CA()


@pytest.fixture
def https(serve: Callable[..., Any], ca: Any) -> str:
    return str(serve(Handler, cls=TlsServer, context=server_context(ca, "127.0.0.1")).addr)


@pytest.fixture
def backend(servers: list[str]) -> Iterator[HttpBackend]:
    made = HttpBackend(servers[0])
    yield made
    made.close()


# Answers ---------------------------------------------------------------------------------------


def test_answers_and_keep_alive(backend: HttpBackend) -> None:
    answer = backend.invoke(HttpRequest("GET", "/200"))
    assert isinstance(answer, HttpResponse) and answer.status == 200
    assert answer.body == f"200 from {backend.addr.split(':')[1]}".encode()
    assert len({backend.invoke(HttpRequest("GET", "/peer")).body for _ in range(5)}) == 1
    assert backend.invoke(HttpRequest("POST", "/", {"X-A": "1"}, b"hello")).body == b"hello"
    assert backend.invoke(HttpRequest("GET", "/404")).status == 404  # an answer, not a failure


def test_headers_are_case_insensitive_and_keep_repeats(backend: HttpBackend) -> None:
    headers = backend.invoke(HttpRequest("GET", "/headers")).headers
    assert isinstance(headers, HttpHeaders)
    assert headers.get("content-type") == headers["CONTENT-TYPE"] == "application/json"
    assert headers.get_all("set-cookie") == ["a=1", "b=2"]
    assert headers["Set-Cookie"] == "a=1, b=2"
    made = HttpResponse(200, {"Content-type": "text/plain"})
    assert isinstance(made.headers, HttpHeaders) and made.headers["content-type"] == "text/plain"


def test_a_load_report_is_read_from_the_orca_header(backend: HttpBackend) -> None:
    def report(value: str) -> Any:
        return backend.invoke(HttpRequest("GET", f"/orca?{value.replace(' ', '+')}")).load_report

    got = report("TEXT cpu_utilization=0.5,rps_fractional=120,named_metrics.queue=3")
    assert got is not None
    assert (got.cpu_utilization, got.rps_fractional, dict(got.named_metrics)) == (
        0.5,
        120.0,
        {"queue": 3.0},
    )
    assert report('JSON {"application_utilization": 0.25}').load == 0.25  # type: ignore[union-attr]
    assert report("TEXT cpu_utilization=nope") is None
    assert backend.invoke(HttpRequest("GET", "/200")).load_report is None


def test_a_failure_status_raises_with_its_answer(backend: HttpBackend) -> None:
    with pytest.raises(BackendError) as failed:
        backend.invoke(HttpRequest("GET", "/503"))
    error = failed.value
    assert (error.addr, error.status) == (backend.addr, 503)
    assert error.response is not None and error.response.status == 503
    assert error.response.body == f"503 from {backend.addr.split(':')[1]}".encode()
    assert error.response.headers["content-length"] == str(len(error.response.body))
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.response, str(copy)) == (BackendError, error.response, str(error))

    picky = HttpBackend(backend.addr, failure_statuses={429, 502})
    try:
        assert picky.invoke(HttpRequest("GET", "/503")).status == 503
        with pytest.raises(BackendError) as limited:
            picky.invoke(HttpRequest("GET", "/429"))
        assert limited.value.response.status == 429
    finally:
        picky.close()


def test_no_connection_and_timeouts_are_backend_errors(backend: HttpBackend) -> None:
    with pytest.raises(ConnectError, match=r"127\.0\.0\.1") as refused:
        HttpBackend(f"127.0.0.1:{free_port()}").invoke(HttpRequest("GET", "/"))
    assert isinstance(refused.value, BackendError) and refused.value.response is None
    with pytest.raises(ReadTimeout) as late:
        backend.invoke(HttpRequest("GET", "/200/slow"), timeout=0.05)
    assert isinstance(late.value, BackendError | TimeoutError)
    with pytest.raises(TypeError):
        backend.invoke("GET /")  # type: ignore[arg-type]


# What counts as a backend's failure ------------------------------------------------------------


def test_a_malformed_request_is_the_callers_mistake_and_counts_nothing(
    servers: list[str],
) -> None:
    with Balancer(servers, failure_threshold=2, monitor=False) as balancer:
        balancer.invoke(HttpRequest("GET", "/200"))
        before = balancer.snapshot()
        for _ in range(15):
            with pytest.raises(InvalidRequest) as bad:
                balancer.invoke(HttpRequest("GET", "users"))
            assert isinstance(bad.value, ValueError)
        for method, path, headers in [
            ("GET", "/a b", None),
            ("GE T", "/", None),
            ("GET", "/", {"X-Evil": "a\r\nInjected: 1"}),
            ("GET", "/", {"Bad Name": "x"}),
        ]:
            with pytest.raises(InvalidRequest):
                balancer.invoke(HttpRequest(method, path, headers))
        assert balancer.snapshot() == before
        assert not any(s.ejected for s in before)


def test_real_servers_a_dead_one_is_ejected_a_5xx_counts_a_4xx_is_an_answer(
    servers: list[str],
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with Balancer([*servers, dead], failure_threshold=2, ejection_seconds=30, monitor=False) as b:
        ports, failures = [], 0
        for _ in range(12):
            try:
                ports.append(b.invoke(HttpRequest("GET", "/200")).body.split()[-1])
            except BackendError:
                failures += 1
        assert failures == 2  # two connection failures eject the dead one
        assert sorted(set(ports)) == sorted(a.split(":")[1].encode() for a in servers)
        stats = {s.addr: s for s in b.snapshot()}
        assert stats[dead].ejected and stats[dead].failures == 2
        assert totals(b) == (12, 2, 0)
        with pytest.raises(BackendError) as failed:
            b.invoke(HttpRequest("GET", "/503"))
        assert failed.value.response.status == 503
        assert b.invoke(HttpRequest("GET", "/404")).status == 404
        assert totals(b) == (14, 3, 0)


class Refusing:
    """A backend that answers with an exception about the request (a LookupError)."""

    calls = 0

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> str:
        Refusing.calls += 1
        if request == "missing":
            raise LookupError(f"{self.addr}: no such record")
        if request == "down":
            raise ConnectionError(f"{self.addr} is down")
        return self.addr


def not_a_lookup(exc: Exception) -> bool:
    return not isinstance(exc, LookupError)


def test_the_default_rule_counts_connection_errors_and_not_other_exceptions() -> None:
    addrs = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    with Balancer(addrs, backend_factory=Refusing, failure_threshold=2, monitor=False) as b:
        Refusing.calls = 0
        for _ in range(6):
            with pytest.raises(LookupError):
                b.invoke("missing", retries=2)
        assert Refusing.calls == 6  # not the backend's failure: not retried either
        assert totals(b) == (6, 0, 0)  # each one is the backend's answer
        assert not any(s.ejected for s in b.snapshot())
    with Balancer(addrs[:1], backend_factory=Refusing, failure_threshold=3, monitor=False) as b:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                b.invoke("down")
        assert b.snapshot()[0].consecutive_failures == 2
        with pytest.raises(LookupError):
            b.invoke("missing")
        (stats,) = b.snapshot()  # an answer: counted, and the failure streak is over
        assert (stats.requests, stats.failures, stats.consecutive_failures) == (3, 2, 0)


def test_the_rule_is_configurable_and_travels_with_the_balancer(servers: list[str]) -> None:
    with Balancer(
        ["10.0.0.1:80"], backend_factory=Refusing, counts_as_failure=LookupError, monitor=False
    ) as b:
        with pytest.raises(LookupError):
            b.invoke("missing")
        with pytest.raises(ConnectionError):
            b.invoke("down")
        assert totals(b) == (2, 1, 0)  # only the LookupError counted
        copy = pickle.loads(pickle.dumps(b))
        try:
            with pytest.raises(LookupError):
                copy.invoke("missing")
            assert totals(b) == (3, 2, 0)
        finally:
            copy.close()

    def no_503(exc: Exception) -> bool:
        return not (isinstance(exc, BackendError) and exc.status == 503)

    with Balancer(servers[:1], counts_as_failure=no_503, monitor=False) as b:
        with pytest.raises(BackendError):
            b.invoke(HttpRequest("GET", "/503"))
        with pytest.raises(BackendError):
            b.invoke(HttpRequest("GET", "/500"))
        assert totals(b) == (2, 1, 0)

    with Balancer(["10.0.0.1:80"], backend_factory=Refusing, counts_as_failure=not_a_lookup,
                  monitor=False) as b:  # fmt: skip
        assert pickle.loads(pickle.dumps(b)).close() is None  # a module-level rule pickles


def test_a_rule_that_raises_counts_the_failure_and_ends_the_call() -> None:
    def broken(exc: Exception) -> bool:
        raise RuntimeError("rule bug")

    with Balancer(
        ["10.0.0.1:80"], backend_factory=Refusing, counts_as_failure=broken, monitor=False
    ) as b:
        with pytest.raises(LookupError) as caught:
            b.invoke("missing")
        assert any("counts_as_failure raised" in note for note in caught.value.__notes__)
        assert totals(b) == (1, 1, 0)


@pytest.mark.parametrize("rule", [("not a type",), (ValueError, 42), 42, "ValueError"])
def test_a_rule_that_is_not_one_is_refused(rule: Any) -> None:
    with pytest.raises(TypeError, match="counts_as_failure"):
        Balancer(["10.0.0.1:80"], counts_as_failure=rule, monitor=False)


# TLS --------------------------------------------------------------------------------------------


def test_https_answers_keep_alive_and_failures(https: str, ca: Any) -> None:
    backend = HttpBackend(https, ssl_context=client_context(ca))
    try:
        assert backend.scheme == "https"
        assert backend.invoke(HttpRequest("GET", "/200")).status == 200
        assert len({backend.invoke(HttpRequest("GET", "/peer")).body for _ in range(5)}) == 1
        assert backend.invoke(HttpRequest("POST", "/", body=b"x" * 100_000)).body == b"x" * 100_000
        with pytest.raises(BackendError) as failed:
            backend.invoke(HttpRequest("GET", "/502"))
        assert failed.value.response.status == 502
    finally:
        backend.close()
    plain = HttpBackend(https)  # HTTP spoken to an HTTPS server
    with pytest.raises(BackendError):
        plain.invoke(HttpRequest("GET", "/200"), timeout=2)


def test_server_hostname_is_verified_and_sent(serve: Callable[..., Any], ca: Any) -> None:
    addr = serve(Handler, cls=TlsServer, context=server_context(ca, "api.test")).addr
    named = HttpBackend(addr, ssl_context=client_context(ca), server_hostname="api.test")
    try:
        seen = json.loads(named.invoke(HttpRequest("GET", "/echo")).body)
        assert seen["headers"]["Host"] == f"api.test:{addr.split(':')[1]}"
    finally:
        named.close()
    with pytest.raises(TLSError, match="match"):  # the certificate does not name 127.0.0.1
        HttpBackend(addr, ssl_context=client_context(ca)).invoke(HttpRequest("GET", "/"))


def test_a_certificate_that_does_not_verify_is_the_backends_failure(
    servers: list[str], https: str
) -> None:
    stranger = client_context(pytest.importorskip("trustme").CA())

    def factory(addr: str) -> HttpBackend:
        return HttpBackend(addr, ssl_context=stranger if addr == https else None)

    with Balancer(
        [https, servers[0]], backend_factory=factory, failure_threshold=2, monitor=False
    ) as b:
        failures = 0
        while failures < 2:
            try:
                b.invoke(HttpRequest("GET", "/200"))
            except TLSError as exc:
                assert isinstance(exc, BackendError) and exc.addr == https
                assert "CERTIFICATE_VERIFY_FAILED" in str(exc)
                failures += 1
        stats = {s.addr: s for s in b.snapshot()}[https]
        assert (stats.requests, stats.failures) == (2, 2) and stats.ejected


def test_health_probes_speak_https(https: str, ca: Any, tmp_path: Path) -> None:
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    check = HealthCheck(
        path="/200", ssl_context_factory=functools.partial(trusting_file, str(cafile))
    )
    in_monitor = pickle.loads(pickle.dumps(check))  # what the monitor process gets
    assert in_monitor.probe(https)
    assert not in_monitor.probe(f"127.0.0.1:{free_port()}")
    other = tmp_path / "other.pem"
    pytest.importorskip("trustme").CA().cert_pem.write_to_path(str(other))
    assert not HealthCheck(ssl_context_factory=functools.partial(trusting_file, str(other))).probe(
        https
    )
    assert not HealthCheck(path="/503", ssl_context_factory=check.ssl_context_factory).probe(https)
    assert not HealthCheck(path="/200").probe(https)  # plain HTTP to an HTTPS server
    with pytest.raises(TypeError, match="picklable"):
        HealthCheck(ssl_context_factory=lambda: client_context(ca))


@pytest.mark.monitor
def test_the_monitor_probes_over_https(serve: Callable[..., Any], ca: Any, tmp_path: Path) -> None:
    good = serve(Handler, cls=TlsServer, context=server_context(ca, "127.0.0.1"), hits=[])
    wrong = serve(Handler, cls=TlsServer, context=server_context(ca, "elsewhere.test")).addr
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    check = HealthCheck(
        path="/200",
        interval=0.05,
        fall=1,
        ssl_context_factory=functools.partial(trusting_file, str(cafile)),
    )
    with Balancer([good.addr, wrong], health_check=check, max_ejected_percent=100) as b:
        wait_for(lambda: {s.addr: s.down for s in b.snapshot()}[wrong], what="wrong one down")
        wait_for(lambda: len(good.hits) >= 3, what="probes of the good one")
        assert not {s.addr: s.down for s in b.snapshot()}[good.addr]
