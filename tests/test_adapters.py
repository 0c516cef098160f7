"""The clients users already have, through a Balancer: the `requests` adapter and the `httpx`
transports, with the real libraries against real loopback HTTP and HTTPS servers."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.server
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dispatcher import Balancer, HttpBackend
from tests.helpers import TlsServer, client_context, free_port, server_context, totals

requests = pytest.importorskip("requests")
httpx = pytest.importorskip("httpx")


class Handler(http.server.BaseHTTPRequestHandler):
    """``/echo``: what came, and which server got it; ``/slow``; ``/gzip``; ``/cookie``. A
    server made with ``failing=True`` answers 503 to everything."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.route(b"")

    def do_POST(self) -> None:
        self.route(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def route(self, body: bytes) -> None:
        port = str(self.server.server_address[1])
        if getattr(self.server, "failing", False):
            self.answer(503, b"down", [("X-Port", port)])
        elif self.path == "/slow":
            time.sleep(0.5)
            self.answer(200, b"late", [])
        elif self.path == "/gzip":
            self.answer(200, gzip.compress(b"squeezed"), [("Content-Encoding", "gzip")])
        elif self.path == "/cookie":
            self.answer(200, b"", [("Set-Cookie", "session=s1; Path=/")])
        else:
            seen = {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body.decode(),
                "port": port,
            }
            self.answer(200, json.dumps(seen).encode(), [("Content-Type", "application/json")])

    def answer(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
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
def addrs(serve: Callable[..., Any]) -> list[str]:
    return [serve(Handler).addr for _ in range(2)]


@pytest.fixture
def failing(serve: Callable[..., Any]) -> str:
    return str(serve(Handler, failing=True).addr)


@pytest.fixture(scope="module")
def ca() -> Any:
    return pytest.importorskip("trustme").CA()


def balancer_of(addrs: list[str], **options: Any) -> Balancer:
    """Round robin, and no ejection: every call to a failing backend shows in the counts."""
    options = {"strategy": "round_robin", "failure_threshold": 1000, **options}
    return Balancer(addrs, monitor=False, **options)


# requests ---------------------------------------------------------------------------------------


@pytest.fixture
def session() -> Iterator[Any]:
    with requests.Session() as made:
        yield made


def test_requests_through_the_balancer(session: Any, addrs: list[str]) -> None:
    from dispatcher.requests import BalancerAdapter

    with balancer_of(addrs) as balancer:
        session.mount("http://payments/", BalancerAdapter(balancer))
        seen = [session.get("http://payments/echo?x=1", timeout=5).json() for _ in range(4)]
        assert Counter(s["port"] for s in seen) == {a.split(":")[1]: 2 for a in addrs}
        assert seen[0]["path"] == "/echo?x=1"
        assert seen[0]["headers"]["host"] == addrs[0]  # the backend's, not "payments"
        posted = session.post("http://payments/echo", json={"a": 1}, headers={"X-B": "2"})
        assert posted.ok and posted.headers["content-type"] == "application/json"
        assert json.loads(posted.json()["body"]) == {"a": 1}
        assert posted.json()["headers"]["x-b"] == "2"
        assert posted.json()["headers"]["content-type"] == "application/json"
        assert session.get("http://payments/gzip").content == b"squeezed"
        session.get("http://payments/cookie")
        assert session.cookies.get("session") == "s1"
        assert session.get("http://payments/echo").json()["headers"]["cookie"] == "session=s1"
        assert totals(balancer) == (8, 0, 0)


def test_requests_failures_retries_and_keys(session: Any, addrs: list[str], failing: str) -> None:
    from dispatcher.requests import KEY_HEADER, RETRIES_HEADER, BalancerAdapter

    with balancer_of([failing, addrs[0]]) as balancer:
        session.mount("http://payments/", BalancerAdapter(balancer))
        statuses = [session.get("http://payments/echo").status_code for _ in range(2)]
        assert sorted(statuses) == [200, 503]  # a 5xx is the caller's to see...
        assert totals(balancer) == (2, 1, 0)  # ...and the backend's failure
        session.mount("http://payments/", BalancerAdapter(balancer, retries=1))
        for _ in range(4):
            answer = session.get("http://payments/echo")
            assert answer.status_code == 200 and RETRIES_HEADER.lower() not in answer.json()
        posts = [session.post("http://payments/echo", data=b"x").status_code for _ in range(2)]
        assert sorted(posts) == [200, 503]  # the adapter's retries are for idempotent methods
        before = totals(balancer).failures
        again = {RETRIES_HEADER: "1"}
        assert all(
            session.post("http://payments/echo", data=b"x", headers=again).ok for _ in range(2)
        )
        assert totals(balancer).failures == before + 2
    with balancer_of(addrs, strategy="consistent_hash") as balancer:
        session.mount("http://payments/", BalancerAdapter(balancer))
        for user in ("u1", "u2", "u3", "u4"):
            ports = {
                session.get("http://payments/echo", headers={KEY_HEADER: user}).json()["port"]
                for _ in range(3)
            }
            assert len(ports) == 1  # sticky
        sent = session.get("http://payments/echo", headers={KEY_HEADER: "u1"}).json()
        assert KEY_HEADER.lower() not in sent["headers"]


def test_requests_errors_are_requests_errors(session: Any, addrs: list[str], ca: Any) -> None:
    from dispatcher.requests import BalancerAdapter

    dead = f"127.0.0.1:{free_port()}"
    with balancer_of([dead, addrs[0]]) as balancer:
        session.mount("http://payments/", BalancerAdapter(balancer))
        with pytest.raises(requests.exceptions.ConnectionError):
            while True:
                session.get("http://payments/echo")
        balancer.unregister(dead)
        with pytest.raises(requests.exceptions.ReadTimeout):
            session.get("http://payments/slow", timeout=(0.05, 0.05))
        balancer.unregister(addrs[0])
        with pytest.raises(requests.exceptions.ConnectionError, match="no backend"):
            session.get("http://payments/echo")
        assert totals(balancer) == (0, 0, 0)


def test_requests_over_https(session: Any, serve: Callable[..., Any], ca: Any) -> None:
    from dispatcher.requests import BalancerAdapter

    addr = serve(Handler, cls=TlsServer, context=server_context(ca, "127.0.0.1")).addr
    stranger = client_context(pytest.importorskip("trustme").CA())
    trusted = client_context(ca)
    for context, works in [(trusted, True), (stranger, False)]:

        def factory(a: str, context: Any = context) -> HttpBackend:
            return HttpBackend(a, ssl_context=context)

        with balancer_of([addr], backend_factory=factory) as balancer:
            session.mount("https://payments/", BalancerAdapter(balancer))
            if works:
                assert session.get("https://payments/echo").json()["port"] == addr.split(":")[1]
            else:
                with pytest.raises(requests.exceptions.SSLError):
                    session.get("https://payments/echo")
            assert totals(balancer).failures == (0 if works else 1)


# httpx ------------------------------------------------------------------------------------------


def test_httpx_through_the_balancer(addrs: list[str], failing: str) -> None:
    from dispatcher.httpx import KEY_HEADER, BalancerTransport

    with balancer_of(addrs) as balancer:
        transport = BalancerTransport(balancer)
        with httpx.Client(transport=transport, base_url="http://payments") as client:
            seen = [client.get("/echo?x=1").json() for _ in range(4)]
            assert Counter(s["port"] for s in seen) == {a.split(":")[1]: 2 for a in addrs}
            assert seen[0]["path"] == "/echo?x=1"
            assert seen[0]["headers"]["host"] == addrs[0]
            posted = client.post("/echo", json={"a": 1})
            assert json.loads(posted.json()["body"]) == {"a": 1}
            assert client.get("/gzip").content == b"squeezed"
            client.get("/cookie")
            assert client.get("/echo").json()["headers"]["cookie"] == "session=s1"
            sent = client.get("/echo", headers={KEY_HEADER: "u1"}).json()
            assert KEY_HEADER.lower() not in sent["headers"]
        assert totals(balancer) == (9, 0, 0)
    with balancer_of([failing, addrs[0]]) as balancer:
        with httpx.Client(transport=BalancerTransport(balancer)) as client:
            assert sorted(client.get("http://payments/").status_code for _ in range(2)) == [
                200,
                503,
            ]
        with httpx.Client(transport=BalancerTransport(balancer, retries=1)) as client:
            assert all(client.get("http://payments/").status_code == 200 for _ in range(4))
        assert totals(balancer).failures == 1 + 4  # each retried call tried the failing one


def test_httpx_over_https(serve: Callable[..., Any], ca: Any) -> None:
    from dispatcher.httpx import BalancerTransport

    addr = serve(Handler, cls=TlsServer, context=server_context(ca, "127.0.0.1")).addr
    stranger = client_context(pytest.importorskip("trustme").CA())
    for context, works in [(client_context(ca), True), (stranger, False)]:

        def factory(a: str, context: Any = context) -> HttpBackend:
            return HttpBackend(a, ssl_context=context)

        with (
            balancer_of([addr], backend_factory=factory) as balancer,
            httpx.Client(transport=BalancerTransport(balancer)) as client,
        ):
            if works:
                assert client.get("https://payments/echo").json()["port"] == addr.split(":")[1]
            else:
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    client.get("https://payments/echo")
            assert totals(balancer).failures == (0 if works else 1)


def test_httpx_errors_are_httpx_errors(addrs: list[str]) -> None:
    from dispatcher.httpx import BalancerTransport

    dead = f"127.0.0.1:{free_port()}"
    with (
        balancer_of([dead, addrs[0]]) as balancer,
        httpx.Client(transport=BalancerTransport(balancer), base_url="http://payments") as client,
    ):
        with pytest.raises(httpx.ConnectError):
            while True:
                client.get("/echo")
        with pytest.raises(httpx.ReadTimeout):
            while True:
                client.get("/slow", timeout=0.05)


def test_httpx_async_through_the_balancer(
    addrs: list[str], failing: str, serve: Callable[..., Any], ca: Any
) -> None:
    pytest.importorskip("aiohttp")
    from dispatcher.aio import AsyncHttpBackend
    from dispatcher.httpx import KEY_HEADER, AsyncBalancerTransport

    tls = serve(Handler, cls=TlsServer, context=server_context(ca, "127.0.0.1")).addr
    trusted = client_context(ca)

    def factory(addr: str) -> AsyncHttpBackend:
        return AsyncHttpBackend(addr, ssl_context=trusted if addr == tls else None)

    with Balancer(
        [*addrs, tls], backend_factory=factory, strategy="consistent_hash", monitor=False
    ) as balancer:

        async def main() -> list[str]:
            transport = AsyncBalancerTransport(balancer)
            async with httpx.AsyncClient(transport=transport, base_url="http://payments") as c:
                answers = await asyncio.gather(
                    *(c.get("/echo", headers={KEY_HEADER: f"u{i % 4}"}) for i in range(12))
                )
                assert all(a.status_code == 200 for a in answers)
                by_key: dict[str, set[str]] = {}
                for i, a in enumerate(answers):
                    by_key.setdefault(f"u{i % 4}", set()).add(a.json()["port"])
                assert all(len(ports) == 1 for ports in by_key.values())  # sticky
                posted = await c.post("/echo", content=b"hi", headers={KEY_HEADER: "u0"})
                return [posted.json()["body"]]

        assert asyncio.run(main()) == ["hi"]
        assert totals(balancer) == (13, 0, 0)
        assert {s.addr for s in balancer.snapshot() if s.requests} <= {*addrs, tls}

    with balancer_of([failing, addrs[0]], backend_factory=AsyncHttpBackend) as balancer:

        async def retried() -> list[int]:
            transport = AsyncBalancerTransport(balancer, retries=1)
            async with httpx.AsyncClient(transport=transport, base_url="http://payments") as c:
                return [(await c.get("/echo")).status_code for _ in range(4)]

        assert asyncio.run(retried()) == [200] * 4
        assert totals(balancer) == (8, 4, 0)  # each call tried the failing one first
