"""HttpBackend and a Balancer of them against real HTTP servers on loopback."""

from __future__ import annotations

import http.server
import time
from collections.abc import Callable
from typing import Any

import pytest

from dispatcher import BackendError, Balancer, HttpBackend, HttpRequest, HttpResponse
from tests.helpers import free_port


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        status = int(self.path.strip("/").split("/")[0] or 200)
        if self.path.endswith("/slow"):
            time.sleep(0.5)
        body = f"{status} from {self.server.server_port}".encode()  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Port", str(self.server.server_port))  # type: ignore[attr-defined]
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def servers(serve: Callable[..., Any]) -> list[str]:
    return [serve(Handler).addr for _ in range(2)]


def test_ok_answer_and_keep_alive(servers: list[str]) -> None:
    backend = HttpBackend(servers[0])
    try:
        for _ in range(3):
            answer = backend.invoke(HttpRequest("GET", "/200"))
            assert isinstance(answer, HttpResponse)
            assert answer.status == 200
            assert answer.body == f"200 from {servers[0].split(':')[1]}".encode()
        pool = backend._connections()
        assert pool.num_connections == 1  # one connection, reused
        posted = backend.invoke(HttpRequest("POST", "/", {"X-A": "1"}, b"hello"))
        assert posted.body == b"hello"
    finally:
        backend.close()


def test_4xx_is_an_answer_5xx_is_a_failure(servers: list[str]) -> None:
    backend = HttpBackend(servers[0])
    try:
        assert backend.invoke(HttpRequest("GET", "/404")).status == 404
        with pytest.raises(BackendError) as info:
            backend.invoke(HttpRequest("GET", "/503"))
        assert info.value.status == 503
        assert info.value.addr == servers[0]
    finally:
        backend.close()


def test_nothing_listening_and_timeouts_are_backend_errors(servers: list[str]) -> None:
    with pytest.raises(BackendError, match=r"127\.0\.0\.1"):
        HttpBackend(f"127.0.0.1:{free_port()}").invoke(HttpRequest("GET", "/"))
    backend = HttpBackend(servers[0])
    try:
        with pytest.raises(BackendError, match="Timeout"):
            backend.invoke(HttpRequest("GET", "/200/slow"), timeout=0.05)
    finally:
        backend.close()
    with pytest.raises(TypeError):
        HttpBackend(servers[0]).invoke("GET /")


def test_balancer_over_real_servers(servers: list[str]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with Balancer([*servers, dead], failure_threshold=2, ejection_seconds=30, monitor=False) as b:
        ports = []
        failures = 0
        for _ in range(12):
            try:
                ports.append(b.invoke(HttpRequest("GET", "/200")).headers["X-Port"])
            except BackendError:
                failures += 1
        assert failures == 2  # two connection failures eject the dead one
        assert sorted(set(ports)) == sorted(a.split(":")[1] for a in servers)
        stats = {s.addr: s for s in b.snapshot()}
        assert stats[dead].ejected and stats[dead].failures == 2
        assert sum(s.requests for s in stats.values()) == 12
        assert all(s.in_flight == 0 for s in stats.values())
        with pytest.raises(BackendError):
            b.invoke(HttpRequest("GET", "/503"))
        assert b.invoke(HttpRequest("GET", "/404")).status == 404
