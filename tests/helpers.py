"""What the tests share: waiting, counting, loopback HTTP servers, a clock, backends and
child-process bodies (importable by spawned children, so nothing here imports pytest)."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from dispatcher import Balancer, _segment
from dispatcher import _layout as L

# Waiting and counting -------------------------------------------------------------------------


def wait_for(
    condition: Callable[[], object], timeout: float = 30.0, what: str = "the condition"
) -> float:
    """Poll `condition` until it holds; return how many seconds that took.

    `timeout` bounds a test that fails; it is a checked duration only where a test says so.
    """
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - started


class Totals(NamedTuple):
    """Sums over every backend of a balancer, as every attached process sees them."""

    requests: int
    failures: int
    in_flight: int


def totals(balancer: Balancer) -> Totals:
    stats = balancer.snapshot()
    return Totals(
        sum(s.requests for s in stats),
        sum(s.failures for s in stats),
        sum(s.in_flight for s in stats),
    )


def in_flight(balancer: Balancer) -> int:
    """Calls in flight on every backend together."""
    return sum(s.in_flight for s in balancer.snapshot())


def in_flight_by_addr(balancer: Balancer) -> dict[str, int]:
    return {s.addr: s.in_flight for s in balancer.snapshot()}


def requests_by_addr(balancer: Balancer) -> dict[str, int]:
    return {s.addr: s.requests for s in balancer.snapshot()}


# Loopback HTTP servers ------------------------------------------------------------------------


class LoopbackServer(http.server.ThreadingHTTPServer):
    """An HTTP server on a free loopback port, serving from a daemon thread until `stop`.

    `attributes` are set on the server before it serves (handlers read them as
    ``self.server.<name>``). It polls for `stop` every 10 ms, not every 0.5 s, so stopping
    takes no noticeable time.
    """

    daemon_threads = True

    def __init__(
        self, handler: type[http.server.BaseHTTPRequestHandler], **attributes: Any
    ) -> None:
        vars(self).update(attributes)
        super().__init__(("127.0.0.1", 0), handler)
        self.port = self.server_port
        self.addr = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.serve_forever, args=(0.01,), daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class TlsServer(LoopbackServer):
    """A `LoopbackServer` that speaks HTTPS with its `context` attribute (``serve(Handler,
    cls=TlsServer, context=server_context(ca, "127.0.0.1"))``). Each handshake happens in the
    handler's thread; one that fails (a client that does not trust the certificate) is quiet."""

    context: ssl.SSLContext

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def server_context(ca: Any, *names: str) -> ssl.SSLContext:
    """A server's TLS context with a certificate for `names` from `ca` (a ``trustme.CA``)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


def client_context(ca: Any) -> ssl.SSLContext:
    """A client's TLS context that trusts `ca` (a ``trustme.CA``) and nothing else."""
    return ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())


def trusting_file(cafile: str) -> ssl.SSLContext:
    """A client's TLS context that trusts the CA in `cafile`: with ``functools.partial``, an
    ``ssl_context_factory`` a health check can pickle into its monitor process."""
    return ssl.create_default_context(cafile=cafile)


# Backends -------------------------------------------------------------------------------------


class Echo:
    """Answers with its own address; fails (a ConnectionError) when asked to; waits on a gate
    if given one."""

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> str:
        if request == "fail":
            raise ConnectionError(f"{self.addr} failed on purpose")
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
    lock = balancer._state.lock

    def hold() -> None:
        ready.set()
        time.sleep(seconds)

    if write_holder:
        lock.run(hold)
    else:
        lock.semaphore.acquire()
        hold()
        lock.semaphore.release()


def hold_retries(balancer: Balancer, count: int, held: Any, release: Any) -> None:
    """Have `count` retries of the shared budget under way in this process until `release`
    is set, as another worker's retries would be."""
    balancer._segment.claim_row()
    state = balancer._state
    if not all(state.take_retry(count) for _ in range(count)):
        raise AssertionError(f"{count} retries did not fit the budget")
    held.set()
    release.wait(30)
    for _ in range(count):
        state.return_retry()
    balancer.close()


def hold_one_call_attached(name: str, gate: Any) -> None:
    """Like `hold_one_call`, in a process that attached by name."""
    balancer = Balancer.attach(name, backend_factory=Echo)
    balancer.invoke(gate)


def owner_until_stdin_closes(addrs: list[str]) -> None:
    """An owner process: create a balancer, print its name, serve until told or killed."""
    import sys

    balancer = Balancer(addrs, backend_factory=Echo)
    print(balancer.name, flush=True)
    sys.stdin.read()
    balancer.close()


@contextlib.contextmanager
def as_another_process(balancer: Balancer) -> Iterator[None]:
    """Attach to `balancer` as a process that never opened its segment would: this process's
    own handle on it is put aside meanwhile (a process opens each segment only once)."""
    saved = _segment._open.pop(balancer.name)
    try:
        yield
    finally:
        _segment._open[balancer.name] = saved


class FakeClock:
    """A monotonic clock that moves only when told: `use` gives it to a balancer.

    The one way a test controls time: the balancer's state stamps everything it stores with
    ``state.clock()`` (ejections, latencies, slow start), and the balancer reads the same clock.
    """

    def __init__(self, now: int | None = None) -> None:
        self.now = time.monotonic_ns() if now is None else now

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1e9)

    def use(self, balancer: Balancer) -> Balancer:
        """Give the clock to `balancer`, which must have no monitor process: a monitor stamps
        the same segment from its own clock, the real one."""
        if balancer._state.words[L.H_MONITOR]:
            raise ValueError("a balancer on a FakeClock needs monitor=False")
        balancer._state.clock = self
        return balancer


def always_false(addr: str) -> bool:
    return False


def send_load(balancer: Balancer, stop: Any, out: Any, seconds: float) -> None:
    """Call the balancer until `stop` is set (at most `seconds`); report picks and errors."""
    seen: dict[str, int] = {}
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            addr = balancer.invoke(None)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        else:
            seen[addr] = seen.get(addr, 0) + 1
        time.sleep(0.001)
    out.put((seen, errors))
    balancer.close()


def run_discovery(balancer: Balancer, resolver: Any, stop: Any) -> None:
    """Follow `resolver` from this process until `stop` is set, as a monitor process would."""
    from dispatcher.discovery import Discovery

    with Discovery(balancer, resolver):
        stop.wait(30)
    balancer.close()


def localhost_lookup(name: str, rdtype: str) -> list[Any]:
    """A module-level (so picklable) DNS lookup that answers 127.0.0.1 for anything."""
    from dispatcher.discovery import DnsRecord

    return [DnsRecord("127.0.0.1", 80, ttl=5.0)]


# Apps served by real gunicorn and uvicorn in tests/test_servers.py -------------------------


def _backend_request(path: str) -> Any:
    from dispatcher import HttpRequest

    return HttpRequest("GET", path, headers={"X-Worker": str(os.getpid())})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """/name: the balancer's segment name; anything else: that path, called on a backend.

    The answer is ``<worker pid> <backend's answer>``.
    """
    from dispatcher.servers import attach_from_env

    balancer = attach_from_env()
    path = environ["PATH_INFO"]
    if path == "/name":
        body = balancer.name.encode()
    else:
        answer = balancer.invoke(_backend_request(path), timeout=30)
        body = f"{os.getpid()} ".encode() + answer.body
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """`wsgi_app` for asyncio: the same answers, through ``await balancer.ainvoke``."""
    from dispatcher.aio import AsyncHttpBackend, aclose
    from dispatcher.servers import attach_from_env

    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await aclose(attach_from_env(backend_factory=AsyncHttpBackend))
                await send({"type": "lifespan.shutdown.complete"})
                return
    balancer = attach_from_env(backend_factory=AsyncHttpBackend)
    path = scope["path"]
    if path == "/name":
        body = balancer.name.encode()
    else:
        answer = await balancer.ainvoke(_backend_request(path), timeout=30)
        body = f"{os.getpid()} ".encode() + answer.body
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class SlowFail:
    """Fails every call after a short wait, so deadlines can run out between attempts."""

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> str:
        time.sleep(0.05)
        raise TimeoutError(f"{self.addr} is slow and failing")


def own_balancer(addrs: list[str], calls: int) -> None:
    """A server stand-in for `top`: own a balancer, make `calls` calls, print the balancer's
    name, and keep it open until stdin closes."""
    with Balancer(addrs, backend_factory=Echo) as balancer:
        for _ in range(calls):
            balancer.invoke(None)
        print(balancer.name, flush=True)
        sys.stdin.read()


def check_until_released(addr: str) -> bool:
    """A health check that lasts until the test lets it end, far longer than the reaper's
    interval: it creates $DISPATCHER_TEST_PROBING, then passes once $DISPATCHER_TEST_RELEASE
    exists (or after 30 s)."""
    open(os.environ["DISPATCHER_TEST_PROBING"], "a").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(os.environ["DISPATCHER_TEST_RELEASE"]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def run_python(script: str) -> subprocess.CompletedProcess[str]:
    """Run `script` in a fresh interpreter from the repository root, warnings as errors."""
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def free_port() -> int:
    """A loopback port free at this moment, for a server that cannot bind port 0 itself."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Metrics ------------------------------------------------------------------------------------


def scrape(name: str, label: str = "test") -> str:
    """The Prometheus text a registry holding a `BalancerCollector` of `name` serves here;
    with $PROMETHEUS_MULTIPROC_DIR set, the registry also holds a ``MultiProcessCollector``,
    as a gunicorn app in multiprocess mode has it."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    from dispatcher.prometheus import BalancerCollector

    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    collector = BalancerCollector(name, label=label)
    registry.register(collector)
    try:
        return generate_latest(registry).decode()
    finally:
        collector.close()


def call_then_scrape(balancer: Balancer, calls: int, others_done: Any, out: Any) -> None:
    """A worker that makes `calls` calls (every third one fails), then, once the other
    workers are done, scrapes the balancer's metrics itself."""
    for i in range(calls):
        with contextlib.suppress(ConnectionError):
            balancer.invoke("fail" if i % 3 == 0 else None)
    others_done.wait(30)
    out.put(scrape(balancer.name))
    balancer.close()


def call_with_failures(balancer: Balancer, calls: int) -> None:
    for i in range(calls):
        with contextlib.suppress(ConnectionError):
            balancer.invoke("fail" if i % 3 == 0 else None)
    balancer.close()


_metrics_apps: dict[str, Any] = {}


def wsgi_app_with_metrics(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """`wsgi_app`, and ``/metrics``: prometheus_client's WSGI app for a registry holding a
    `BalancerCollector` of the server's balancer (and a ``MultiProcessCollector`` with
    $PROMETHEUS_MULTIPROC_DIR set). Every answer names the worker that served it in
    ``X-Worker``."""
    if environ["PATH_INFO"] != "/metrics":
        return wsgi_app(environ, start_response)
    app = _metrics_apps.get("app")
    if app is None:
        from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

        from dispatcher.prometheus import BalancerCollector
        from dispatcher.servers import attach_from_env

        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.MultiProcessCollector(registry)
        registry.register(BalancerCollector(attach_from_env(), label="app"))
        app = _metrics_apps["app"] = make_wsgi_app(registry)

    def start(status: str, headers: list[tuple[str, str]], *rest: Any) -> Any:
        return start_response(status, [*headers, ("X-Worker", str(os.getpid()))], *rest)

    return list(app(environ, start))


# Events ---------------------------------------------------------------------------------------

events_seen: list[Any] = []
"""What `record_event` received in this process."""


def record_event(event: Any) -> None:
    """An ``on_event`` callback: keeps the event here, and appends it as a line of JSON to
    $DISPATCHER_TEST_EVENTS if set (the monitor's events reach the test that way), with the
    pid of the process that reported it."""
    import dataclasses
    import json

    events_seen.append(event)
    path = os.environ.get("DISPATCHER_TEST_EVENTS")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({**dataclasses.asdict(event), "pid": os.getpid()}) + "\n")


def read_events(path: str) -> list[dict[str, Any]]:
    import json

    try:
        with open(path) as lines:
            return [json.loads(line) for line in lines]
    except FileNotFoundError:
        return []


def probe_env(addr: str) -> bool:
    """A health check: fails for the addresses in $DISPATCHER_TEST_FAILING, read from the
    file $DISPATCHER_TEST_FAILING_FILE if set (so a test can change it for the monitor)."""
    path = os.environ.get("DISPATCHER_TEST_FAILING_FILE")
    if path:
        with open(path) as text:
            return addr not in text.read().split(",")
    return addr not in os.environ.get("DISPATCHER_TEST_FAILING", "").split(",")


def fail_many(balancer: Balancer, calls: int) -> None:
    """`calls` calls that fail (`Echo` raises on "fail")."""
    for _ in range(calls):
        with contextlib.suppress(ConnectionError):
            balancer.invoke("fail")
    balancer.close()
