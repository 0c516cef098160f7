"""Backends for asyncio: what ``await balancer.ainvoke(...)`` calls.

`Balancer.ainvoke` never blocks its event loop on the shared lock (see `Balancer.ainvoke`);
the backends it calls come from the balancer's ordinary ``backend_factory``, and must have
``async def ainvoke(request, *, timeout=None)``, such as `AsyncHttpBackend`::

    balancer = Balancer(addrs, backend_factory=AsyncHttpBackend, strategy="least_loaded")
    response = await balancer.ainvoke(HttpRequest("GET", "/"), timeout=2.0)

Async clients belong to one event loop: call `aclose` before a loop ends (an ASGI lifespan
shutdown, the end of a test), so no connection is left for the garbage collector to find open.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import weakref
from collections.abc import Container, Iterable
from typing import Any, Protocol, runtime_checkable

from ._address import parse_address
from ._backends import FAILURE_STATUSES, HttpRequest, HttpResponse, statuses_of
from ._balancer import Balancer
from ._http_client import HttpHeaders
from .errors import (
    BackendError,
    ConnectError,
    ConnectTimeout,
    ProtocolError,
    ReadTimeout,
    TLSError,
)

try:
    import aiohttp
except ModuleNotFoundError:
    aiohttp = None  # type: ignore[assignment]


@runtime_checkable
class AsyncBackend(Protocol):
    """One instance of a downstream service, called from an event loop."""

    async def ainvoke(self, request: Any, *, timeout: float | None = None) -> Any: ...


async def aclose(balancer: Balancer) -> None:
    """Close this process's async backend clients of `balancer` that belong to this loop."""
    for backend in balancer.backends():
        close = getattr(backend, "aclose", None)
        if close is not None:
            await close()


class AsyncHttpBackend:
    """One HTTP/1.1 server, called through an ``aiohttp.ClientSession`` with keep-alive.

    As `HttpBackend`, with the same arguments: connection errors, timeouts and answers whose
    status is in `failure_statuses` (5xx by default) raise `BackendError` (the answer as its
    ``response``), every other answer is returned; with `ssl_context` it speaks HTTPS and
    verifies the certificate against `server_hostname` (default: the host of `addr`), also
    sent as SNI and in ``Host``; `timeout` bounds connecting and each wait for the answer
    (not the whole call). A session is made lazily for each event loop it is used from (a
    session's connections belong to one loop), and never crosses a fork; it keeps at most
    `pool_size` connections, and calls beyond that wait for one. Needs the ``aio`` extra
    (aiohttp).
    """

    def __init__(
        self,
        addr: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        pool_size: int = 16,
        timeout: float | None = 10.0,
        failure_statuses: Iterable[int] | Container[int] = FAILURE_STATUSES,
    ) -> None:
        if aiohttp is None:
            raise ModuleNotFoundError(
                "AsyncHttpBackend needs aiohttp: pip install 'dispatcher-lb[aio]'", name="aiohttp"
            )
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext, not {ssl_context!r}")
        self.addr = parse_address(addr)
        self._failure_statuses = statuses_of(failure_statuses)
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else False
        self._server_hostname = server_hostname
        self._base = f"{'http' if ssl_context is None else 'https'}://{self.addr}"
        self._headers: dict[str, str] = {}
        if server_hostname is not None:
            port = int(self.addr.rpartition(":")[2])
            name = f"[{server_hostname}]" if ":" in server_hostname else server_hostname
            self._headers["Host"] = name if port == 443 else f"{name}:{port}"
        self._pool_size = pool_size
        self._timeout = _timeout(timeout)
        self._pid = os.getpid()
        self._sessions: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, aiohttp.ClientSession
        ] = weakref.WeakKeyDictionary()

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._pid != os.getpid():
            self._pid, self._sessions = os.getpid(), weakref.WeakKeyDictionary()
        session = self._sessions.get(loop)
        if session is None:
            session = aiohttp.ClientSession(
                self._base,
                connector=aiohttp.TCPConnector(limit=self._pool_size, ssl=self._ssl),
                timeout=self._timeout,
                headers=self._headers,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
            self._sessions[loop] = session
        return session

    async def ainvoke(self, request: HttpRequest, *, timeout: float | None = None) -> HttpResponse:
        if not isinstance(request, HttpRequest):
            raise TypeError(f"AsyncHttpBackend needs an HttpRequest, not {type(request).__name__}")
        session = self._session()
        try:
            async with session.request(
                request.method,
                request.path,
                data=request.body or None,
                headers=request.headers,
                timeout=self._timeout if timeout is None else _timeout(timeout),
                allow_redirects=False,
                server_hostname=self._server_hostname,
            ) as answer:
                body = await answer.read()
        except Exception as exc:
            error = _backend_error(self.addr, exc)
            if error is None:
                raise
            raise error from exc
        response = HttpResponse(answer.status, HttpHeaders(answer.headers.items()), body)
        if answer.status in self._failure_statuses:
            raise BackendError(
                self.addr, f"HTTP {answer.status}", status=answer.status, response=response
            )
        return response

    async def aclose(self) -> None:
        """Close the session of the running loop."""
        if self._pid != os.getpid():
            return
        session = self._sessions.pop(asyncio.get_running_loop(), None)
        if session is not None:
            await session.close()

    def close(self) -> None:
        """Close what can be closed without a running loop; drop the sessions of other loops.

        A session whose loop is running is closed by a task on that loop; one whose loop has
        ended can only be dropped (prefer `aclose` from the loop before it ends).
        """
        if self._pid != os.getpid():
            self._sessions = weakref.WeakKeyDictionary()
            return
        sessions, self._sessions = list(self._sessions.items()), weakref.WeakKeyDictionary()
        for loop, session in sessions:
            if loop.is_closed():
                continue
            if loop.is_running():
                loop.call_soon_threadsafe(_close_on, loop, session)
            else:
                loop.run_until_complete(session.close())

    def __repr__(self) -> str:
        return f"AsyncHttpBackend({self._base})"


def _timeout(seconds: float | None) -> aiohttp.ClientTimeout:
    """Each socket wait bounded (connecting, then each read), as `HttpBackend`'s timeout."""
    return aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)


def _backend_error(addr: str, exc: Exception) -> BackendError | None:
    """The `BackendError` for what aiohttp raised; None for what is not a call's failure."""
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ClientSSLError):
        return TLSError(addr, message)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectTimeout(addr, message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectError(addr, message)
    if isinstance(exc, TimeoutError):
        return ReadTimeout(addr, message)
    if isinstance(exc, aiohttp.ClientError | OSError):
        return ProtocolError(addr, message)
    return None


_closing: set[asyncio.Task[None]] = set()


def _close_on(loop: asyncio.AbstractEventLoop, session: aiohttp.ClientSession) -> None:
    task = loop.create_task(session.close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)
