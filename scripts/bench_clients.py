"""Client CPU per HTTP request: HttpBackend and AsyncHttpBackend against the clients they replaced
and the ones users already have.

What it measures: the CPU time (user + system, ``time.process_time()``) that THIS process, the
client, spends per request, over N sequential keep-alive requests to a loopback HTTP/1.1
server that runs in its own process (``_bench_clients_server.py``: a bare asyncio protocol
answering at once with seven headers, ``Vary`` twice, and a 64-byte JSON body).
The server's CPU is never counted. Wall time per request is shown too, but on a shared
two-core machine it mostly says how fast the server and the scheduler were.

Candidates, each making its client fresh in each round and warming it up first:

* ``HttpBackend before (urllib3)``: the call the urllib3-based HttpBackend made (urlopen on an
  ``HTTPConnectionPool``, headers copied): the baseline, over HTTP and HTTPS;
* ``HttpBackend``: ``dispatcher.HttpBackend.invoke`` on its ``http.client``-based client;
  ``HttpClient`` is that client alone;
* ``urllib3 request()`` and ``urllib3 urlopen tuned`` (headers, timeout and retries fixed on
  the pool, no decoding, no header copy); ``http.client`` (one ``HTTPConnection``);
* ``pycurl`` (one ``Curl`` handle reused; header lines collected and parsed, as a backend
  would need them), ``requests.Session``, ``httpx.Client``;
* the adapters: ``requests`` through ``dispatcher.requests.BalancerAdapter`` and ``httpx``
  through ``dispatcher.httpx.BalancerTransport``, each over a one-backend ``Balancer``;
* async, on one event loop: ``aiohttp.ClientSession``, ``httpx.AsyncClient`` and
  ``AsyncHttpBackend`` (on aiohttp), sequential awaits and 16 concurrent tasks;
* 16 threads sharing one ``HttpBackend``;
* end to end through a one-backend ``Balancer`` (``least_loaded``, no monitor): ``invoke``
  with ``HttpBackend`` or the urllib3 one it replaced, ``ainvoke`` with ``AsyncHttpBackend``.

Each runs ``GET /`` and a ``POST /`` with a 46-byte JSON body, over HTTP and HTTPS (a
throwaway CA and certificate from ``trustme``; clients that take an ``ssl.SSLContext`` get
one, pycurl and requests a CA file). Every round runs every case in a new shuffled order; the
table shows medians over rounds, and the ratio column is the median of per-round ratios to
the baseline of the same scheme and method. Clients that are not installed are skipped.

    python scripts/bench_clients.py                 # 7 rounds of 2000 requests a case: ~15 min
    python scripts/bench_clients.py --quick         # 2 rounds of 200: seconds, to check setup
    python scripts/bench_clients.py --only HttpBackend Balancer --no-https --rounds 11
    python scripts/bench_clients.py --json out.json # also keep every round's numbers
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import platform
import random
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import urllib3

from dispatcher import BackendError, Balancer, HttpBackend, HttpRequest, HttpResponse
from dispatcher._http_client import HttpClient

HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "_bench_clients_server.py"
BODY_LEN = 64
POST_BODY = b'{"user":12345,"query":"balance","limit":10}\n'
POST_HEADERS = {"Content-Type": "application/json"}
CONCURRENCY = 16
TIMEOUT = 10.0
BASELINE = {"http": "HttpBackend before (urllib3)", "https": "HttpBackend before (urllib3)"}

Answer = tuple[int, bytes]
SyncCall = Callable[[], Answer]
AsyncCall = Callable[[], Awaitable[Answer]]


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    context: ssl.SSLContext | None = None
    ca_file: str | None = None

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes
    headers: dict[str, str]


@dataclass
class Candidate:
    name: str
    kind: str  # "sync", "async" or "threads"
    make: Callable[..., Any]
    schemes: tuple[str, ...] = ("http", "https")
    concurrency: int = 1
    needs: str | None = None


# Sync clients: make(target, request) -> (call, close) ----------------------------------------


def make_http_backend(target: Target, req: Request) -> tuple[SyncCall, Callable[[], None]]:
    backend = HttpBackend(
        f"{target.host}:{target.port}", ssl_context=target.context, timeout=TIMEOUT
    )
    request = HttpRequest(req.method, req.path, req.headers or None, req.body)

    def call() -> Answer:
        answer = backend.invoke(request)
        return answer.status, answer.body

    return call, backend.close


def _urllib3_pool(target: Target, **kwargs: Any) -> urllib3.HTTPConnectionPool:
    if target.scheme == "https":
        return urllib3.HTTPSConnectionPool(
            target.host, target.port, ssl_context=target.context, **kwargs
        )
    return urllib3.HTTPConnectionPool(target.host, target.port, **kwargs)


def make_urllib3_as_backend(target: Target, req: Request) -> tuple[SyncCall, Callable[[], None]]:
    """Exactly the urlopen call and copies the urllib3-based HttpBackend.invoke made."""
    pool = _urllib3_pool(target, maxsize=16, block=False, retries=False, timeout=TIMEOUT)

    def call() -> Answer:
        answer = pool.urlopen(
            req.method,
            req.path,
            body=req.body or None,
            headers=dict(req.headers),
            retries=False,
            redirect=False,
            timeout=TIMEOUT,
        )
        dict(answer.headers)
        return answer.status, answer.data

    return call, pool.close


def make_urllib3_request(target: Target, req: Request) -> tuple[SyncCall, Callable[[], None]]:
    pool = _urllib3_pool(target, maxsize=16, block=False, retries=False, timeout=TIMEOUT)

    def call() -> Answer:
        answer = pool.request(
            req.method, req.path, body=req.body or None, headers=req.headers, redirect=False
        )
        return answer.status, answer.data

    return call, pool.close


def make_urllib3_tuned(target: Target, req: Request) -> tuple[SyncCall, Callable[[], None]]:
    """Everything constant set once on the pool; no decoding, no copy of the headers."""
    pool = _urllib3_pool(
        target, maxsize=16, block=False, retries=False, timeout=TIMEOUT, headers=req.headers
    )
    body = req.body or None

    def call() -> Answer:
        answer = pool.urlopen(req.method, req.path, body=body, redirect=False, decode_content=False)
        return answer.status, answer.data

    return call, pool.close


def make_http_client(target: Target, req: Request) -> tuple[SyncCall, Callable[[], None]]:
    import http.client

    def connect() -> http.client.HTTPConnection:
        if target.scheme == "https":
            return http.client.HTTPSConnection(
                target.host, target.port, timeout=TIMEOUT, context=target.context
            )
        return http.client.HTTPConnection(target.host, target.port, timeout=TIMEOUT)

    conn = connect()
    body = req.body or None

    def call() -> Answer:
        try:
            conn.request(req.method, req.path, body, req.headers)
            answer = conn.getresponse()
            data = answer.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            raise
        return answer.status, data

    return call, conn.close


def make_client(target: Target, req: Request) -> tuple[SyncCall, Callable[[], None]]:
    client = HttpClient(target.host, target.port, ssl_context=target.context, timeout=TIMEOUT)

    def call() -> Answer:
        answer = client.request(req.method, req.path, body=req.body, headers=req.headers)
        return answer.status, answer.body

    return call, client.close


def make_pycurl(target: Target, req: Request) -> tuple[SyncCall, Callable[[], None]]:
    import pycurl

    curl = pycurl.Curl()
    curl.setopt(pycurl.NOSIGNAL, 1)
    curl.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
    curl.setopt(pycurl.TIMEOUT_MS, int(TIMEOUT * 1000))
    if target.ca_file:
        curl.setopt(pycurl.CAINFO, target.ca_file)
    url = target.base + req.path
    header_lines = [f"{k}: {v}" for k, v in req.headers.items()] + ["Expect:"]

    def call() -> Answer:
        chunks: list[bytes] = []
        raw_headers: list[bytes] = []
        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.HTTPHEADER, header_lines)
        if req.body:
            curl.setopt(pycurl.POSTFIELDS, req.body)
        else:
            curl.setopt(pycurl.HTTPGET, 1)
        curl.setopt(pycurl.WRITEFUNCTION, chunks.append)
        curl.setopt(pycurl.HEADERFUNCTION, raw_headers.append)
        curl.perform()
        headers: dict[str, str] = {}
        for line in raw_headers[1:]:
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                headers[name.lower()] = value.strip()
        return curl.getinfo(pycurl.RESPONSE_CODE), b"".join(chunks)

    return call, curl.close


def make_requests(target: Target, req: Request) -> tuple[SyncCall, Callable[[], None]]:
    import requests

    session = requests.Session()
    session.trust_env = False  # no proxy look-up in the environment on every request
    url = target.base + req.path
    verify: str | bool = target.ca_file or True

    def call() -> Answer:
        answer = session.request(
            req.method, url, data=req.body or None, headers=req.headers, timeout=TIMEOUT,
            verify=verify, allow_redirects=False,
        )  # fmt: skip
        return answer.status_code, answer.content

    return call, session.close


def make_httpx(target: Target, req: Request) -> tuple[SyncCall, Callable[[], None]]:
    import httpx

    client = httpx.Client(
        base_url=target.base,
        timeout=TIMEOUT,
        trust_env=False,
        follow_redirects=False,
        verify=target.context or True,
    )

    def call() -> Answer:
        answer = client.request(req.method, req.path, content=req.body or None, headers=req.headers)
        return answer.status_code, answer.content

    return call, client.close


def _one_backend(target: Target) -> Balancer:
    def factory(addr: str) -> HttpBackend:
        return HttpBackend(addr, ssl_context=target.context, timeout=TIMEOUT)

    return _balancer(target, factory)


def make_requests_adapter(target: Target, req: Request) -> tuple[SyncCall, Callable[[], None]]:
    import requests

    from dispatcher.requests import BalancerAdapter

    balancer = _one_backend(target)
    session = requests.Session()
    session.trust_env = False
    session.mount("http://svc/", BalancerAdapter(balancer))

    def call() -> Answer:
        answer = session.request(
            req.method, "http://svc" + req.path, data=req.body or None, headers=req.headers,
            timeout=TIMEOUT, allow_redirects=False,
        )  # fmt: skip
        return answer.status_code, answer.content

    def close() -> None:
        session.close()
        balancer.close()

    return call, close


def make_httpx_transport(target: Target, req: Request) -> tuple[SyncCall, Callable[[], None]]:
    import httpx

    from dispatcher.httpx import BalancerTransport

    balancer = _one_backend(target)
    client = httpx.Client(
        transport=BalancerTransport(balancer), base_url="http://svc", timeout=TIMEOUT
    )

    def call() -> Answer:
        answer = client.request(req.method, req.path, content=req.body or None, headers=req.headers)
        return answer.status_code, answer.content

    def close() -> None:
        client.close()
        balancer.close()

    return call, close


# Async clients: await make(target, request) -> (call, aclose) --------------------------------


async def make_aiohttp(target: Target, req: Request) -> tuple[AsyncCall, Any]:
    import aiohttp

    session = aiohttp.ClientSession(
        target.base,
        connector=aiohttp.TCPConnector(limit=CONCURRENCY, ssl=target.context or True),
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
        auto_decompress=False,
    )
    body = req.body or None

    async def call() -> Answer:
        async with session.request(req.method, req.path, data=body, headers=req.headers) as r:
            return r.status, await r.read()

    return call, session.close


async def make_httpx_async(target: Target, req: Request) -> tuple[AsyncCall, Any]:
    import httpx

    client = httpx.AsyncClient(
        base_url=target.base,
        timeout=TIMEOUT,
        trust_env=False,
        follow_redirects=False,
        verify=target.context or True,
        limits=httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY),
    )

    async def call() -> Answer:
        answer = await client.request(
            req.method, req.path, content=req.body or None, headers=req.headers
        )
        return answer.status_code, answer.content

    return call, client.aclose


async def make_async_http_backend(target: Target, req: Request) -> tuple[AsyncCall, Any]:
    from dispatcher.aio import AsyncHttpBackend

    backend = AsyncHttpBackend(
        f"{target.host}:{target.port}", ssl_context=target.context, timeout=TIMEOUT
    )
    request = HttpRequest(req.method, req.path, req.headers or None, req.body)

    async def call() -> Answer:
        answer = await backend.ainvoke(request)
        return answer.status, answer.body

    return call, backend.aclose


# Through a Balancer: invoke with a sync backend, ainvoke with an async one ----------------------


class Urllib3Backend:
    """HttpBackend as it was on urllib3 (keep-alive pool per process, no TLS), to compare."""

    def __init__(self, addr: str, *, timeout: float | None = TIMEOUT) -> None:
        self.addr = addr
        host, _, port = addr.rpartition(":")
        self._pool = urllib3.HTTPConnectionPool(
            host, int(port), maxsize=16, block=False, retries=False, timeout=timeout
        )
        self._timeout = timeout

    def invoke(self, request: HttpRequest, *, timeout: float | None = None) -> HttpResponse:
        try:
            answer = self._pool.urlopen(
                request.method,
                request.path,
                body=request.body or None,
                headers=dict(request.headers or {}),
                retries=False,
                redirect=False,
                timeout=self._timeout if timeout is None else timeout,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise BackendError(self.addr, f"{type(exc).__name__}: {exc}") from exc
        if answer.status >= 500:
            raise BackendError(self.addr, f"HTTP {answer.status}", status=answer.status)
        return HttpResponse(answer.status, dict(answer.headers), answer.data)

    def close(self) -> None:
        self._pool.close()


def _balancer(target: Target, factory: Callable[[str], Any]) -> Balancer:
    return Balancer(
        [f"{target.host}:{target.port}"],
        backend_factory=factory,
        strategy="least_loaded",
        monitor=False,
    )


def balancer_invoke(factory: Callable[[str], Any] | None = None) -> Callable[..., Any]:
    """`Balancer.invoke` over one backend: `factory`'s, or an `HttpBackend` for the target."""

    def make(target: Target, req: Request) -> tuple[SyncCall, Callable[[], None]]:
        balancer = _one_backend(target) if factory is None else _balancer(target, factory)
        request = HttpRequest(req.method, req.path, req.headers or None, req.body)

        def call() -> Answer:
            answer = balancer.invoke(request)
            return answer.status, answer.body

        return call, balancer.close

    return make


async def balancer_ainvoke(target: Target, req: Request) -> tuple[AsyncCall, Any]:
    """`Balancer.ainvoke` over one `AsyncHttpBackend`."""
    from dispatcher.aio import AsyncHttpBackend, aclose

    def factory(addr: str) -> AsyncHttpBackend:
        return AsyncHttpBackend(addr, ssl_context=target.context, timeout=TIMEOUT)

    balancer = _balancer(target, factory)
    request = HttpRequest(req.method, req.path, req.headers or None, req.body)

    async def call() -> Answer:
        answer = await balancer.ainvoke(request)
        return answer.status, answer.body

    async def close() -> None:
        await aclose(balancer)
        balancer.close()

    return call, close


CANDIDATES = [
    Candidate("HttpBackend before (urllib3)", "sync", make_urllib3_as_backend),
    Candidate("HttpBackend", "sync", make_http_backend),
    Candidate("HttpClient", "sync", make_client),
    Candidate("urllib3 request()", "sync", make_urllib3_request),
    Candidate("urllib3 urlopen tuned", "sync", make_urllib3_tuned),
    Candidate("http.client", "sync", make_http_client),
    Candidate("pycurl", "sync", make_pycurl, needs="pycurl"),
    Candidate("requests.Session", "sync", make_requests, needs="requests"),
    Candidate("requests + BalancerAdapter", "sync", make_requests_adapter, needs="requests"),
    Candidate("httpx.Client", "sync", make_httpx, needs="httpx"),
    Candidate("httpx + BalancerTransport", "sync", make_httpx_transport, needs="httpx"),
    Candidate("aiohttp seq", "async", make_aiohttp, needs="aiohttp"),
    Candidate("httpx.AsyncClient seq", "async", make_httpx_async, needs="httpx"),
    Candidate("AsyncHttpBackend seq", "async", make_async_http_backend, needs="aiohttp"),
    Candidate("aiohttp x16 tasks", "async", make_aiohttp, concurrency=CONCURRENCY, needs="aiohttp"),
    Candidate(
        "httpx.AsyncClient x16 tasks",
        "async",
        make_httpx_async,
        concurrency=CONCURRENCY,
        needs="httpx",
    ),
    Candidate(
        "AsyncHttpBackend x16 tasks",
        "async",
        make_async_http_backend,
        concurrency=CONCURRENCY,
        needs="aiohttp",
    ),
    Candidate("HttpBackend x16 threads", "threads", make_http_backend, concurrency=CONCURRENCY),
    Candidate(
        "Balancer.invoke, urllib3 backend before",
        "sync",
        balancer_invoke(Urllib3Backend),
        schemes=("http",),
    ),
    Candidate("Balancer.invoke, HttpBackend", "sync", balancer_invoke()),
    Candidate("Balancer.ainvoke, AsyncHttpBackend", "async", balancer_ainvoke, needs="aiohttp"),
]


# Running one case ----------------------------------------------------------------------------


def check(answer: Answer, name: str) -> None:
    status, body = answer
    if status != 200 or len(body) != BODY_LEN:
        raise RuntimeError(f"{name}: got {status} with {len(body)} bytes")


def run_sync(
    cand: Candidate, target: Target, req: Request, n: int, warmup: int
) -> tuple[float, float]:
    call, close = cand.make(target, req)
    try:
        for _ in range(warmup):
            check(call(), cand.name)
        gc.collect()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(n):
            call()
        return time.process_time() - cpu, time.perf_counter() - wall
    finally:
        close()


def run_threads(
    cand: Candidate, target: Target, req: Request, n: int, warmup: int
) -> tuple[float, float]:
    call, close = cand.make(target, req)
    each = max(1, n // cand.concurrency)
    start = threading.Barrier(cand.concurrency + 1)
    errors: list[BaseException] = []

    def worker(count: int) -> None:
        try:
            for _ in range(warmup // cand.concurrency + 1):
                check(call(), cand.name)
            start.wait()
            start.wait()
            for _ in range(count):
                call()
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=worker, args=(each,)) for _ in range(cand.concurrency)]
    try:
        for thread in threads:
            thread.start()
        start.wait()
        gc.collect()
        cpu, wall = time.process_time(), time.perf_counter()
        start.wait()
        for thread in threads:
            thread.join()
        spent = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        close()
    if errors:
        raise errors[0]
    return spent[0] * n / (each * cand.concurrency), spent[1] * n / (each * cand.concurrency)


def run_async(
    cand: Candidate,
    target: Target,
    req: Request,
    n: int,
    warmup: int,
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> tuple[float, float]:
    loop = new_loop()
    try:
        call, aclose = loop.run_until_complete(cand.make(target, req))

        async def worker(count: int) -> None:
            for _ in range(count):
                await call()

        async def warm() -> None:
            for _ in range(warmup):
                check(await call(), cand.name)
            # open every connection the concurrent run will use
            await asyncio.gather(*(call() for _ in range(cand.concurrency)))

        each = max(1, n // cand.concurrency)
        loop.run_until_complete(warm())
        gc.collect()
        cpu, wall = time.process_time(), time.perf_counter()
        if cand.concurrency == 1:
            loop.run_until_complete(worker(n))
        else:

            async def many() -> None:
                await asyncio.gather(*(worker(each) for _ in range(cand.concurrency)))

            loop.run_until_complete(many())
        spent = time.process_time() - cpu, time.perf_counter() - wall
        loop.run_until_complete(aclose())
        loop.run_until_complete(asyncio.sleep(0.01))  # let closed transports finish
        done = each * cand.concurrency if cand.concurrency > 1 else n
        return spent[0] * n / done, spent[1] * n / done
    finally:
        loop.close()


# Servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(extra: list[str]) -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), "--port", str(port), *extra],
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bench server did not start listening on port {port}")
            time.sleep(0.05)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def targets(https: bool) -> Iterator[list[Target]]:
    with contextlib.ExitStack() as stack:
        found = [Target("http", "127.0.0.1", stack.enter_context(server([])))]
        if https:
            try:
                import trustme
            except ImportError:
                print("trustme is not installed: no HTTPS cases", file=sys.stderr)
            else:
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                ca = trustme.CA()
                cert = ca.issue_cert("127.0.0.1", "localhost")
                cert.private_key_and_cert_chain_pem.write_to_path(folder / "server.pem")
                ca.cert_pem.write_to_path(folder / "ca.pem")
                pem = str(folder / "server.pem")
                port = stack.enter_context(server(["--cert", pem, "--key", pem]))
                context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
                found.append(Target("https", "127.0.0.1", port, context, str(folder / "ca.pem")))
        yield found


# Main ----------------------------------------------------------------------------------------


@dataclass
class Case:
    cand: Candidate
    target: Target
    req: Request
    cpu: list[float] = field(default_factory=list)  # us per request, one per round
    wall: list[float] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.target.scheme, self.req.method, self.cand.name)


def versions() -> str:
    found = []
    for name in (
        "urllib3",
        "requests",
        "httpx",
        "httpcore",
        "anyio",
        "sniffio",
        "aiohttp",
        "pycurl",
        "uvloop",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    with contextlib.suppress(ImportError):
        import pycurl

        found.append(pycurl.version.split()[1])
    if not installed("sniffio"):
        found.append("no sniffio (httpcore retries a failed import of it on every request)")
    return f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}; " + ", ".join(found)


def installed(module: str | None) -> bool:
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def table(cases: list[Case], scheme: str, methods: list[str]) -> str:
    by_key = {case.key: case for case in cases}
    names = list(dict.fromkeys(c.cand.name for c in cases if c.target.scheme == scheme))
    base_name = BASELINE[scheme]
    cols = []
    for method in methods:
        cols += [f"{method} CPU us", "x base", f"{method} wall us"]
    width = max(len(name) for name in names)
    header = f"| {'client':<{width}} | " + " | ".join(f"{c:>12}" for c in cols) + " |"
    lines = [header, "|" + "-" * (width + 2) + "|" + "|".join(["-" * 13 + ":"] * len(cols)) + "|"]
    for name in names:
        cells = []
        for method in methods:
            case, base = by_key.get((scheme, method, name)), by_key.get((scheme, method, base_name))
            if case is None or not case.cpu:
                cells += ["-", "-", "-"]
                continue
            cpu = statistics.median(case.cpu)
            ratio = "-"
            if base is not None and base.cpu:
                ratios = [a / b for a, b in zip(case.cpu, base.cpu, strict=True)]
                ratio = f"{statistics.median(ratios):.2f}x"
            cells += [f"{cpu:.0f}", ratio, f"{statistics.median(case.wall):.0f}"]
        lines.append(f"| {name:<{width}} | " + " | ".join(f"{c:>12}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Rerun: python scripts/bench_clients.py [--quick]; see the module docstring.",
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("-n", "--requests", type=int, default=2000, help="per case and round")
    parser.add_argument("--warmup", type=int, default=100, help="requests before measuring")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 200: seconds")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="candidates naming any TEXT")
    parser.add_argument("--no-https", action="store_true", help="HTTP only")
    parser.add_argument("--no-post", action="store_true", help="GET only")
    parser.add_argument("--uvloop", action="store_true", help="async cases on uvloop")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every round's numbers here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests, args.warmup = 2, 200, 20

    new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if args.uvloop:
        import uvloop

        new_loop = uvloop.new_event_loop

    methods = ["GET"] if args.no_post else ["GET", "POST"]
    requests_ = {
        "GET": Request("GET", "/", b"", {}),
        "POST": Request("POST", "/", POST_BODY, POST_HEADERS),
    }
    chosen = []
    for cand in CANDIDATES:
        if args.only and not any(text.lower() in cand.name.lower() for text in args.only):
            continue
        if not installed(cand.needs):
            print(f"skipped {cand.name}: {cand.needs} is not installed", file=sys.stderr)
            continue
        chosen.append(cand)

    print(f"# {versions()}")
    print(
        f"# {args.rounds} rounds x {args.requests} requests per case, warm-up {args.warmup}, "
        f"loop: {'uvloop' if args.uvloop else 'asyncio'}, "
        f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores"
    )
    with targets(not args.no_https) as found:
        cases = [
            Case(cand, target, requests_[method])
            for target in found
            for method in methods
            for cand in chosen
            if target.scheme in cand.schemes
        ]
        # every baseline runs, even when --only leaves it out of the chosen ones
        for target in found:
            base = next(c for c in CANDIDATES if c.name == BASELINE[target.scheme])
            for method in methods:
                if not any(c.key == (target.scheme, method, base.name) for c in cases):
                    cases.append(Case(base, target, requests_[method]))
        shuffle = random.Random(args.seed)
        started = time.monotonic()
        for round_ in range(args.rounds):
            order = cases[:]
            shuffle.shuffle(order)
            for case in order:
                n, warm = args.requests, args.warmup
                if case.cand.kind == "sync":
                    cpu, wall = run_sync(case.cand, case.target, case.req, n, warm)
                elif case.cand.kind == "threads":
                    cpu, wall = run_threads(case.cand, case.target, case.req, n, warm)
                else:
                    cpu, wall = run_async(case.cand, case.target, case.req, n, warm, new_loop)
                case.cpu.append(cpu / n * 1e6)
                case.wall.append(wall / n * 1e6)
            print(
                f"# round {round_ + 1}/{args.rounds} done, {time.monotonic() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    for target in found:
        print(
            f"\n## {target.scheme.upper()}: client CPU per request, median of {args.rounds} "
            f"rounds; x base = median per-round ratio to {BASELINE[target.scheme]}\n"
        )
        print(table(cases, target.scheme, methods))
    if args.json:
        rows = [
            {"scheme": s, "method": m, "client": name, "cpu_us": c.cpu, "wall_us": c.wall}
            for c in cases
            for s, m, name in [c.key]
        ]
        args.json.write_text(json.dumps({"versions": versions(), "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
