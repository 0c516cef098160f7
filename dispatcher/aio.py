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
import weakref
from typing import Any, Protocol, runtime_checkable

from ._address import parse_address
from ._backends import HttpRequest, HttpResponse
from ._balancer import Balancer
from .errors import BackendError

try:
    import httpx
except ModuleNotFoundError:
    httpx = None  # type: ignore[assignment]


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
    """One HTTP/1.1 server, called through an ``httpx.AsyncClient`` with keep-alive.

    As `HttpBackend`: connection errors, timeouts and 5xx answers raise `BackendError`, a 4xx
    is returned. A client is made lazily for each event loop it is used from (a client's
    connections belong to one loop), and never crosses a fork.
    """

    def __init__(self, addr: str, *, pool_size: int = 16, timeout: float | None = 10.0) -> None:
        self.addr = parse_address(addr)
        self._base = f"http://{self.addr}"
        self._pool_size = pool_size
        self._timeout = timeout
        self._pid = os.getpid()
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._pid != os.getpid():
            self._pid, self._clients = os.getpid(), weakref.WeakKeyDictionary()
        client = self._clients.get(loop)
        if client is None:
            if httpx is None:
                raise ModuleNotFoundError(
                    "AsyncHttpBackend needs httpx: pip install 'dispatcher-lb[aio]'", name="httpx"
                )
            client = httpx.AsyncClient(
                base_url=self._base,
                limits=httpx.Limits(
                    max_connections=self._pool_size, max_keepalive_connections=self._pool_size
                ),
                timeout=self._timeout,
                follow_redirects=False,
                trust_env=False,
            )
            self._clients[loop] = client
        return client

    async def ainvoke(self, request: HttpRequest, *, timeout: float | None = None) -> HttpResponse:
        if not isinstance(request, HttpRequest):
            raise TypeError(f"AsyncHttpBackend needs an HttpRequest, not {type(request).__name__}")
        client = self._client()
        try:
            answer = await client.request(
                request.method,
                request.path,
                content=request.body or None,
                headers=dict(request.headers or {}),
                timeout=self._timeout if timeout is None else timeout,
            )
        except httpx.HTTPError as exc:
            raise BackendError(self.addr, f"{type(exc).__name__}: {exc}") from exc
        if answer.status_code >= 500:
            raise BackendError(self.addr, f"HTTP {answer.status_code}", status=answer.status_code)
        return HttpResponse(answer.status_code, dict(answer.headers), answer.content)

    async def aclose(self) -> None:
        """Close the client of the running loop."""
        if self._pid != os.getpid():
            return
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def close(self) -> None:
        """Close what can be closed without a running loop; drop the clients of other loops.

        A client whose loop is running is closed by a task on that loop; one whose loop has
        ended can only be dropped (prefer `aclose` from the loop before it ends).
        """
        if self._pid != os.getpid():
            self._clients = weakref.WeakKeyDictionary()
            return
        clients, self._clients = list(self._clients.items()), weakref.WeakKeyDictionary()
        for loop, client in clients:
            if loop.is_closed():
                continue
            if loop.is_running():
                loop.call_soon_threadsafe(_close_on, loop, client)
            else:
                loop.run_until_complete(client.aclose())

    def __repr__(self) -> str:
        return f"AsyncHttpBackend({self.addr!r})"


_closing: set[asyncio.Task[None]] = set()


def _close_on(loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient) -> None:
    task = loop.create_task(client.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)
