"""The keep-alive client under HttpBackend (`dispatcher._http_client`) against real loopback
servers.

HTTP and HTTPS servers are ``http.server`` ones in threads of this process; the HTTPS ones
use certificates from a throwaway ``trustme`` CA (the HTTPS tests skip without trustme).
Which connection served a request is told by the server: ``/peer`` answers with the client's
port, so the same port twice is the same kept-alive connection.
"""

from __future__ import annotations

import http.server
import json
import os
import pickle
import select
import signal
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dispatcher import (
    BackendError,
    ConnectError,
    ConnectTimeout,
    HttpHeaders,
    InvalidRequest,
    ProtocolError,
    ReadTimeout,
    TLSError,
)
from dispatcher._http_client import HttpClient, _Connection
from tests.helpers import free_port


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    context: ssl.SSLContext | None = None

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[tuple[str, str, bytes]] = []
        self.sni: list[str | None] = []
        self.idle_timeout = 5.0

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up on a handshake or a read is what some tests do


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes
    server: Server
    drop_next = False

    def setup(self) -> None:
        self.request.settimeout(self.server.idle_timeout)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        with self.server.lock:
            self.server.connections += 1
        super().setup()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.route()

    def do_POST(self) -> None:
        self.route()

    def do_HEAD(self) -> None:
        self.route()

    def answer(self, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def route(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.requests.append((self.command, self.path, body))
        if self.drop_next:  # the server "closes the idle connection" as the request comes
            self.close_connection = True
            return
        path, _, arg = self.path.partition("?")
        if path == "/":
            self.send_response(200)
            self.send_header("Set-Cookie", "a=1; Path=/")
            self.send_header("X-Mixed-Case", "yes")
            self.send_header("set-cookie", "b=2; Path=/")
            self.send_header("Content-Length", "5")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(b"hello")
        elif path == "/peer":
            self.answer(str(self.client_address[1]).encode())
        elif path == "/echo":
            seen = {"method": self.command, "body": body.decode(), "headers": self.headers.items()}
            self.answer(json.dumps(seen).encode(), headers={"Content-Type": "application/json"})
        elif path == "/slow":
            time.sleep(float(arg))
            self.answer(b"late")
        elif path == "/status":
            self.answer(b"", int(arg))
        elif path == "/close":
            self.answer(b"bye", headers={"Connection": "close"})
            self.close_connection = True
        elif path == "/http10":
            self.protocol_version = "HTTP/1.0"
            self.answer(b"old")
            self.close_connection = True
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        elif path == "/partial":  # headers and part of the body, then nothing for a while
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            time.sleep(float(arg or 1))
            self.close_connection = True
        elif path == "/short":  # a body cut short by the server closing
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.close_connection = True
        elif path == "/eof":  # no length, not chunked: the body ends when the connection does
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"until the end")
            self.close_connection = True
        elif path == "/early":  # 103 Early Hints before the answer
            self.send_response_only(103)
            self.send_header("Link", "</style.css>; rel=preload")
            self.end_headers()
            self.answer(b"after hints")
        elif path == "/two-lengths":
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"abcd")
            self.close_connection = True
        elif path == "/drop":  # no answer at all
            self.close_connection = True
        elif path == "/then-drop":  # answer; then take the next request and close unanswered
            self.answer(b"ok")
            self.drop_next = True
        elif path == "/then-reset":  # answer; a moment later close with a reset (RST)
            self.answer(b"ok")
            self.wfile.flush()
            time.sleep(0.2)
            self.request.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            self.close_connection = True
        else:
            self.answer(b"not found", 404)


def start(context: ssl.SSLContext | None = None) -> Server:
    server = Server()
    server.context = context
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def stop(server: Server) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    started = start()
    yield started
    stop(started)


@pytest.fixture
def client(server: Server) -> Iterator[HttpClient]:
    with HttpClient("127.0.0.1", server.server_port, timeout=5.0) as made:
        yield made


def peer(client: HttpClient) -> int:
    return int(client.request("GET", "/peer").body)


# Answers -------------------------------------------------------------------------------------


def test_an_answer_with_repeated_headers_read_without_regard_to_case(client: HttpClient) -> None:
    answer = client.request("GET", "/")
    assert (answer.status, answer.reason, answer.body) == (200, "OK", b"hello")
    headers = answer.headers
    assert headers.get_all("SET-COOKIE") == ["a=1; Path=/", "b=2; Path=/"]
    assert headers["set-cookie"] == "a=1; Path=/, b=2; Path=/"
    assert headers["x-mixed-case"] == headers["X-MIXED-CASE"] == "yes"
    assert "content-LENGTH" in headers and "nope" not in headers
    assert headers.get("nope") is None and headers.get("nope", "x") == "x"
    assert list(headers)[-3:] == ["Set-Cookie", "X-Mixed-Case", "Content-Length"]
    assert dict(headers)["Set-Cookie"] == "a=1; Path=/, b=2; Path=/"
    assert ("set-cookie", "b=2; Path=/") in headers.multi_items()


def test_headers_alone() -> None:
    headers = HttpHeaders([("A", "1"), ("b", "2"), ("a", "3")])
    assert len(headers) == 2 and list(headers) == ["A", "b"]
    assert headers["a"] == "1, 3" and headers.get_all("A") == ["1", "3"]
    with pytest.raises(KeyError):
        headers["c"]
    copy = pickle.loads(pickle.dumps(headers))
    assert copy.multi_items() == headers.multi_items() and copy == headers
    assert HttpHeaders({"Content-Type": "text/plain"})["content-type"] == "text/plain"


def test_post_body_and_headers_reach_the_server(client: HttpClient) -> None:
    answer = client.request(
        "POST", "/echo", body=b'{"x": 1}', headers={"Content-Type": "application/json"}
    )
    seen = json.loads(answer.body)
    names = {name.lower(): value for name, value in seen["headers"]}
    assert seen["method"] == "POST" and seen["body"] == '{"x": 1}'
    assert names["content-type"] == "application/json" and names["content-length"] == "8"
    assert names["host"] == f"127.0.0.1:{client.port}"
    assert names["accept-encoding"] == "identity"
    assert answer.headers["content-type"] == "application/json"


def test_a_host_header_given_is_the_one_sent(client: HttpClient) -> None:
    seen = json.loads(client.request("GET", "/echo", headers={"host": "svc.local"}).body)
    assert [v for k, v in seen["headers"] if k.lower() == "host"] == ["svc.local"]


def test_any_status_is_an_answer(client: HttpClient) -> None:
    assert client.request("GET", "/status?503").status == 503
    assert client.request("GET", "/missing").status == 404
    assert client.request("GET", "/status?204").body == b""


def test_head_chunked_and_http10_answers(client: HttpClient) -> None:
    head = client.request("HEAD", "/")
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == "5"
    assert client.request("GET", "/chunked").body == b"hello world"
    first = peer(client)
    assert client.request("GET", "/http10").body == b"old"
    assert peer(client) != first  # an HTTP/1.0 answer without keep-alive closes


def test_bodies_framed_by_close_interim_answers_and_conflicting_lengths(
    server: Server, client: HttpClient
) -> None:
    assert client.request("GET", "/eof").body == b"until the end"
    early = client.request("GET", "/early")
    assert (early.status, early.body) == (200, b"after hints") and "link" not in early.headers
    with pytest.raises(ProtocolError, match="Content-Length"):
        client.request("GET", "/two-lengths")
    assert client.request("GET", "/").body == b"hello"


def ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_host_in_brackets() -> None:
    class Server6(Server):
        address_family = socket.AF_INET6

        def __init__(self) -> None:
            http.server.ThreadingHTTPServer.__init__(self, ("::1", 0), Handler)
            self.lock = threading.Lock()
            self.connections = 0
            self.requests = []
            self.idle_timeout = 5.0

    server = Server6()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with HttpClient("[::1]", server.server_port) as client:
            seen = json.loads(client.request("GET", "/echo").body)
        assert [v for k, v in seen["headers"] if k.lower() == "host"] == [
            f"[::1]:{server.server_port}"
        ]
    finally:
        stop(server)


def test_a_request_that_cannot_be_sent_is_refused_before_sending(
    server: Server, client: HttpClient
) -> None:
    for method, path, headers in [
        ("GET", "/ HTTP/1.1\r\nX: y", None),
        ("GET", "/a b", None),
        ("GE T", "/", None),
        ("GET", "/", {"X-Evil": "a\r\nInjected: 1"}),
        ("GET", "/", {"Bad Name": "x"}),
        ("GET", "users", None),
    ]:
        with pytest.raises(InvalidRequest):
            client.request(method, path, headers=headers)
    assert client.request("GET", "/").status == 200
    assert server.requests == [("GET", "/", b"")]


# Keep-alive ----------------------------------------------------------------------------------


def test_keep_alive_reuses_one_connection(server: Server, client: HttpClient) -> None:
    ports = {peer(client) for _ in range(10)}
    assert len(ports) == 1 and server.connections == 1


def test_idle_connections_are_reused_last_in_first_out(server: Server, client: HttpClient) -> None:
    threads = [threading.Thread(target=client.request, args=("GET", "/slow?0.2")) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert server.connections == 2 and len(client._idle.conns) == 2
    ports = [peer(client) for _ in range(6)]
    assert len(set(ports)) == 1  # first in first out would alternate between the two
    assert server.connections == 2


def test_a_connection_the_server_asked_to_close_is_not_reused(
    server: Server, client: HttpClient
) -> None:
    assert client.request("GET", "/close").body == b"bye"
    peer(client)
    assert server.connections == 2 and len(client._idle.conns) == 1


def test_server_closing_idle_connections(server: Server, client: HttpClient) -> None:
    server.idle_timeout = 0.2
    first = peer(client)
    time.sleep(0.6)  # the server has closed it meanwhile
    second = peer(client)
    assert second != first and server.connections == 2
    assert len(server.requests) == 2  # found closed before use: nothing was sent on it


def test_a_reused_connection_dropped_as_a_get_went_out_is_retried_once(
    server: Server, client: HttpClient
) -> None:
    client.request("GET", "/then-drop")
    answer = client.request("GET", "/peer")
    assert answer.status == 200 and server.connections == 2
    assert [path for _, path, _ in server.requests] == ["/then-drop", "/peer", "/peer"]


def test_a_post_that_may_have_arrived_is_not_sent_twice(server: Server, client: HttpClient) -> None:
    client.request("GET", "/then-drop")
    with pytest.raises(ProtocolError):
        client.request("POST", "/echo", body=b"once")
    assert [m for m, _, _ in server.requests] == ["GET", "POST"]
    client.request("GET", "/then-drop")
    assert client.request("POST", "/echo", body=b"twice", idempotent=True).status == 200
    assert [m for m, _, _ in server.requests[2:]] == ["GET", "POST", "POST"]


def test_a_post_that_provably_was_not_sent_is_sent_again(
    server: Server, client: HttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.request("GET", "/then-reset")
    time.sleep(0.5)  # the reset has come
    monkeypatch.setattr(_Connection, "dropped", lambda self: False)  # as if it came just after
    answer = client.request("POST", "/echo", body=b"once")
    assert json.loads(answer.body)["body"] == "once"
    assert [m for m, _, _ in server.requests] == ["GET", "POST"] and server.connections == 2


def test_a_fresh_connection_is_never_retried(server: Server, client: HttpClient) -> None:
    with pytest.raises(ProtocolError, match="RemoteDisconnected"):
        client.request("GET", "/drop")
    assert len(server.requests) == 1


def test_a_body_cut_short_is_an_error_and_the_connection_is_dropped(
    server: Server, client: HttpClient
) -> None:
    first = peer(client)
    with pytest.raises(ProtocolError, match="IncompleteRead"):
        client.request("GET", "/short")
    assert peer(client) != first


def test_close_then_use_again(server: Server, client: HttpClient) -> None:
    first = peer(client)
    client.close()
    assert client._idle.conns == []
    assert peer(client) != first


# Timeouts and connection errors --------------------------------------------------------------


def test_read_timeout_drops_the_connection_with_the_unread_answer(
    server: Server, client: HttpClient
) -> None:
    first = peer(client)
    started = time.monotonic()
    with pytest.raises(ReadTimeout) as caught:
        client.request("GET", "/partial?1", timeout=0.2)
    assert time.monotonic() - started < 0.9
    assert isinstance(caught.value, TimeoutError) and not isinstance(caught.value, ConnectError)
    assert peer(client) != first  # the half-read one was not put back
    with pytest.raises(ReadTimeout):
        client.request("GET", "/slow?0.6", timeout=0.2)
    assert client.request("GET", "/slow?0.1", timeout=2).body == b"late"


def test_connection_refused_is_a_connect_error() -> None:
    with HttpClient("127.0.0.1", free_port(), timeout=2) as client:
        with pytest.raises(ConnectError) as caught:
            client.request("GET", "/")
        assert not isinstance(caught.value, TimeoutError)


def test_a_tls_handshake_that_never_ends_is_a_connect_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        with HttpClient("127.0.0.1", port, ssl_context=ssl.create_default_context()) as client:
            started = time.monotonic()
            with pytest.raises(ConnectTimeout) as caught:
                client.request("GET", "/", timeout=0.3)
            assert time.monotonic() - started < 2
            assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, ConnectError)


def test_errors_are_backend_errors_naming_the_server_and_pickle() -> None:
    client = HttpClient("127.0.0.1", free_port(), timeout=2, addr="svc:1")
    with client, pytest.raises(ConnectError) as caught:
        client.request("GET", "/")
    assert caught.value.addr == "svc:1" and str(caught.value).startswith("svc:1: connecting")
    for error in [
        ConnectError("h:1", "a"),
        ConnectTimeout("h:1", "b"),
        TLSError("h:1", "c"),
        ReadTimeout("h:1", "d"),
        ProtocolError("h:1", "e"),
    ]:
        assert isinstance(error, BackendError)
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)


# Threads and fork ----------------------------------------------------------------------------


def test_threads_share_one_pool(server: Server) -> None:
    errors: list[BaseException] = []
    with HttpClient("127.0.0.1", server.server_port, pool_size=4) as client:

        def calls() -> None:
            try:
                for i in range(40):
                    answer = client.request("POST", "/echo", body=str(i).encode())
                    assert json.loads(answer.body)["body"] == str(i)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=calls) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert len(server.requests) == 320
        assert server.connections <= 8 + 8  # never more than the calls in flight, reopened
        assert len(client._idle.conns) <= 4


def in_forked_child(work: Callable[[], str]) -> str:
    """Run `work` in a forked child; give back what it returned (or its error)."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(read)
            out = work()
        except BaseException as exc:
            out, code = f"{type(exc).__name__}: {exc}", 1
        os.write(write, out.encode())
        os._exit(code)
    os.close(write)
    chunks = []
    deadline = time.monotonic() + 30
    with os.fdopen(read, "rb", buffering=0) as pipe:
        while True:  # bounded: a child stuck on a lock some thread held at fork fails, not hangs
            if not select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child did not finish in 30 s")
            chunk = pipe.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
    out = b"".join(chunks).decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


def test_a_forked_child_gets_a_fresh_pool(server: Server, client: HttpClient) -> None:
    parent = peer(client)

    def child() -> str:
        port = peer(client)
        fresh = client._idle.pid == os.getpid() and len(client._idle.conns) == 1
        client.close()
        return f"{port} {fresh}"

    port, fresh = in_forked_child(child).split()
    assert int(port) != parent and fresh == "True"
    assert peer(client) == parent  # the parent's connection was neither used nor closed
    assert server.connections == 2


# HTTPS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> Any:
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


def tls_server(ca: Any, *names: str) -> Server:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    server = start(context)

    def sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        server.sni.append(name)

    context.sni_callback = sni  # type: ignore[assignment]
    return server


def trusting(ca: Any) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def https(ca: Any) -> Iterator[Server]:
    server = tls_server(ca, "127.0.0.1", "localhost")
    yield server
    stop(server)


def test_https_keep_alive_and_answers(https: Server, ca: Any) -> None:
    with HttpClient("127.0.0.1", https.server_port, ssl_context=trusting(ca)) as client:
        assert client.request("GET", "/").headers.get_all("set-cookie") == [
            "a=1; Path=/",
            "b=2; Path=/",
        ]
        assert client.request("POST", "/echo", body=b"x" * 100_000).status == 200
        assert client.request("GET", "/chunked").body == b"hello world"
        assert len({peer(client) for _ in range(5)}) == 1
        assert https.connections == 1


def test_https_server_closing_idle_connections(https: Server, ca: Any) -> None:
    https.idle_timeout = 0.2
    with HttpClient("127.0.0.1", https.server_port, ssl_context=trusting(ca)) as client:
        first = peer(client)
        time.sleep(0.6)
        assert peer(client) != first
        assert len(https.requests) == 2


def test_https_stale_get_is_retried(https: Server, ca: Any) -> None:
    with HttpClient("127.0.0.1", https.server_port, ssl_context=trusting(ca)) as client:
        client.request("GET", "/then-drop")
        assert client.request("GET", "/").body == b"hello"
        assert https.connections == 2


def test_a_certificate_from_another_ca_fails_verification(https: Server) -> None:
    other = pytest.importorskip("trustme").CA()
    with HttpClient("127.0.0.1", https.server_port, ssl_context=trusting(other)) as client:
        with pytest.raises(TLSError) as caught:
            client.request("GET", "/")
        assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
        assert isinstance(caught.value, ConnectError)


def test_server_hostname_is_sent_as_sni_and_verified(ca: Any) -> None:
    server = tls_server(ca, "api.test")
    try:
        context = trusting(ca)
        with HttpClient(
            "127.0.0.1", server.server_port, ssl_context=context, server_hostname="api.test"
        ) as client:
            seen = json.loads(client.request("GET", "/echo").body)
        assert server.sni == ["api.test"]
        assert [v for k, v in seen["headers"] if k.lower() == "host"] == [
            f"api.test:{server.server_port}"
        ]
        by_ip = HttpClient("127.0.0.1", server.server_port, ssl_context=context)
        with by_ip, pytest.raises(TLSError, match=r"match|mismatch"):
            by_ip.request("GET", "/")  # the certificate is not for 127.0.0.1
        other = HttpClient(
            "127.0.0.1", server.server_port, ssl_context=context, server_hostname="other.test"
        )
        with other, pytest.raises(TLSError):
            other.request("GET", "/")
    finally:
        stop(server)


def test_https_threads_and_fork(https: Server, ca: Any) -> None:
    with HttpClient("127.0.0.1", https.server_port, ssl_context=trusting(ca)) as client:
        parent = peer(client)
        threads = [threading.Thread(target=peer, args=(client,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(0.1)  # the server's threads back to waiting, not inside OpenSSL, at the fork

        def child() -> str:
            port = peer(client)
            client.close()
            return str(port)

        assert int(in_forked_child(child)) != parent
        assert client.request("GET", "/").body == b"hello"  # the parent's TLS still works
