"""asyncio: ``await ainvoke(balancer, request)`` without ever stalling the event loop.

A call has three parts. The pick and the end of the call each take the shared lock for well
under a microsecond, so they run inline on the loop. When the lock stays taken for a few tries
(a busy neighbour, a holder that was descheduled or died in it), they move to a small thread
pool of this process, so a waiting loop keeps serving its other tasks. The backend call in
between is awaited with no lock held.

Async backends come from the balancer's ordinary ``backend_factory``: pass one whose backends
have ``async def ainvoke(request, *, timeout=None)``, such as `AsyncHttpBackend`::

    balancer = Balancer(addrs, backend_factory=AsyncHttpBackend, strategy="least_loaded")
    response = await balancer.ainvoke(HttpRequest("GET", "/"), timeout=2.0)

A cancelled call (``asyncio.CancelledError``: a client went away, a timeout around the await)
counts as cancelled, not as a failure of the backend: it only ends its in-flight count.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Callable
from time import monotonic_ns
from typing import Any, Protocol, runtime_checkable

from .address import parse_address
from .backends import HttpRequest, HttpResponse
from .balancer import Balancer, _key_hash
from .checks import check_seconds
from .errors import BackendError
from .state import CANCELLED, FAILURE, SUCCESS, LockBusy, SharedState

try:
    import httpx
except ModuleNotFoundError:
    httpx = None  # type: ignore[assignment]

THREADS = 2
"""Threads per process that wait on a contended lock for the event loops of that process."""

Ticket = tuple[int, int, Any]
"""What a pick commits: slot, generation, and this process's backend for the slot."""


@runtime_checkable
class AsyncBackend(Protocol):
    """One instance of a downstream service, called from an event loop."""

    async def ainvoke(self, request: Any, *, timeout: float | None = None) -> Any: ...


async def ainvoke(
    balancer: Balancer, request: Any, *, timeout: float | None = None, key: object = None
) -> Any:
    """Call one backend of `balancer` with `request` from an event loop; see `Balancer.invoke`.

    The balancer's backends must be `AsyncBackend`s (``backend_factory=AsyncHttpBackend``).
    """
    if timeout is not None:
        check_seconds("timeout", timeout)
    hashed = None if key is None else _key_hash(key)
    slot, generation, proxy = await _pick(balancer, hashed)
    state, row = balancer._state, balancer._row_base
    start = monotonic_ns()
    call = getattr(proxy, "ainvoke", None)
    if call is None:
        await _finish(state, slot, generation, row, CANCELLED, start)
        raise TypeError(
            f"{proxy!r} has no ainvoke: make the balancer with an async backend_factory "
            f"(for HTTP, backend_factory=AsyncHttpBackend)"
        )
    try:
        response = await call(request, timeout=timeout)
    except Exception:
        await _finish(state, slot, generation, row, FAILURE, start)
        raise
    except BaseException:
        await _finish(state, slot, generation, row, CANCELLED, start)
        raise
    await _finish(state, slot, generation, row, SUCCESS, start)
    return response


async def aclose(balancer: Balancer) -> None:
    """Close this process's async backend clients of `balancer` that belong to this loop.

    Call it when the loop is about to end (an ASGI lifespan shutdown, the end of a test), so
    no connection is left for the garbage collector to find open.
    """
    with balancer._local_lock:
        proxies = list(balancer._proxies.values())
    for proxy in proxies:
        close = getattr(proxy, "aclose", None)
        if close is not None:
            await close()


async def _pick(balancer: Balancer, key: int | None) -> Ticket:
    """`Balancer._pick`, inline unless the lock stays busy, then on a thread; never lost if
    cancelled."""
    try:
        return balancer._pick(key, blocking=False)
    except LockBusy:
        pass
    future = asyncio.get_running_loop().run_in_executor(_executor(), balancer._pick, key)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_abandon(balancer))
        raise


def _abandon(balancer: Balancer) -> Callable[[asyncio.Future[Ticket]], None]:
    """A callback that ends a call whose pick completed after its caller was cancelled."""
    state = balancer._state

    def done(future: asyncio.Future[Ticket]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        slot, generation, _ = future.result()
        args = (slot, generation, balancer._row_base, CANCELLED, monotonic_ns())
        try:
            state.finish(*args, blocking=False)
        except LockBusy:
            _executor().submit(state.finish, *args)

    return done


async def _finish(
    state: SharedState, slot: int, generation: int, row: int, outcome: int, start: int
) -> None:
    """`SharedState.finish`, inline unless the lock stays busy, then on a thread.

    The thread's work is shielded: a second cancellation while it waits does not undo it.
    """
    try:
        state.finish(slot, generation, row, outcome, start, blocking=False)
        return
    except LockBusy:
        pass
    future = asyncio.get_running_loop().run_in_executor(
        _executor(), state.finish, slot, generation, row, outcome, start
    )
    await asyncio.shield(future)


class _Pool:
    """This process's own small pool: threads never cross a fork, and work waiting for the
    shared lock never queues behind an application's jobs on the loop's default executor."""

    def __init__(self) -> None:
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.lock = threading.Lock()

    def get(self) -> concurrent.futures.ThreadPoolExecutor:
        executor = self.executor
        if executor is not None:
            return executor
        with self.lock:
            if self.executor is None:
                self.executor = concurrent.futures.ThreadPoolExecutor(THREADS, "dispatcher-lock")
            return self.executor

    def forget(self) -> None:
        """In a forked child: the parent's threads are not here; drop, never shut down."""
        self.executor = None
        self.lock = threading.Lock()


_POOL = _Pool()
_executor = _POOL.get
os.register_at_fork(after_in_child=_POOL.forget)


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
                    "AsyncHttpBackend needs httpx: pip install 'dispatcher[aio]'", name="httpx"
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
