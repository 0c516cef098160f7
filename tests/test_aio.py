"""`ainvoke` from an event loop: outcomes, cancellation, and a contended lock that the loop
never waits on. Shares and counts are checked, never timings."""

from __future__ import annotations

import asyncio
import http.server
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from dispatcher import BackendError, Balancer, HttpRequest
from dispatcher._layout import H_LOCK_PID
from dispatcher.aio import AsyncBackend, AsyncHttpBackend, aclose
from tests.helpers import totals

pytest.importorskip("httpx")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 503 if self.path == "/fail" else 200
        body = str(self.server.server_address[1]).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_addrs(serve: Callable[..., Any]) -> list[str]:
    return [serve(_Handler).addr for _ in range(2)]


class Gate:
    """An async backend that answers when its request (an asyncio.Event) is set."""

    def __init__(self, addr: str) -> None:
        self.addr = addr

    async def ainvoke(self, request: Any, *, timeout: float | None = None) -> str:
        if request == "fail":
            raise ConnectionError(f"{self.addr} is down")
        if isinstance(request, asyncio.Event):
            await request.wait()
        return self.addr


def test_http_calls_are_spread_and_counted(http_addrs: list[str]) -> None:
    with Balancer(http_addrs, backend_factory=AsyncHttpBackend, monitor=False) as balancer:

        async def main() -> list[bytes]:
            try:
                answers = await asyncio.gather(
                    *(balancer.ainvoke(HttpRequest("GET", "/"), timeout=10) for _ in range(20))
                )
            finally:
                await aclose(balancer)
            return [a.body for a in answers]

        bodies = asyncio.run(main())
        assert sorted(set(bodies)) == sorted(a.rpartition(":")[2].encode() for a in http_addrs)
        assert totals(balancer) == (20, 0, 0)
        assert isinstance(AsyncHttpBackend(http_addrs[0]), AsyncBackend)


def test_a_5xx_is_a_failure_and_ends_the_call(http_addrs: list[str]) -> None:
    with Balancer(http_addrs[:1], backend_factory=AsyncHttpBackend, monitor=False) as balancer:

        async def main() -> None:
            try:
                with pytest.raises(BackendError) as failed:
                    await balancer.ainvoke(HttpRequest("GET", "/fail"))
                assert failed.value.status == 503
            finally:
                await aclose(balancer)

        asyncio.run(main())
        assert totals(balancer) == (1, 1, 0)


def test_cancelled_calls_end_without_counting_as_failures() -> None:
    with Balancer(["10.0.0.1:80", "10.0.0.2:80"], backend_factory=Gate, monitor=False) as balancer:

        async def main() -> None:
            never = asyncio.Event()
            task = asyncio.create_task(balancer.ainvoke(never))
            while totals(balancer).in_flight == 0:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(balancer.ainvoke(never), 0.01)
            with pytest.raises(ConnectionError):
                await balancer.ainvoke("fail")
            assert await balancer.ainvoke(None, key="user-1") in {"10.0.0.1:80", "10.0.0.2:80"}

        asyncio.run(main())
        assert totals(balancer) == (2, 1, 0)


def test_a_sync_backend_is_refused_and_leaves_nothing_in_flight() -> None:
    class Sync:
        def __init__(self, addr: str) -> None:
            self.addr = addr

        def invoke(self, request: Any, *, timeout: float | None = None) -> str:
            return self.addr

    with Balancer(["10.0.0.1:80"], backend_factory=Sync, monitor=False) as balancer:
        with pytest.raises(TypeError, match="async backend_factory"):
            asyncio.run(balancer.ainvoke(None))
        assert totals(balancer) == (0, 0, 0)


def _hold(balancer: Balancer, taken: threading.Event, release: threading.Event) -> None:
    """Hold the shared lock, as a busy or stalled neighbour process would, until released."""
    lock = balancer._state.lock
    lock.acquire()
    taken.set()
    release.wait(10)
    lock.release()


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_a_contended_lock_never_stalls_the_loop(shared: bool) -> None:
    with Balancer(["10.0.0.1:80"], backend_factory=Gate, shared=shared, monitor=False) as balancer:
        taken, release = threading.Event(), threading.Event()
        holder = threading.Thread(target=_hold, args=(balancer, taken, release))
        holder.start()
        assert taken.wait(10)

        async def main() -> tuple[str, bool, bool]:
            task = asyncio.create_task(balancer.ainvoke(None))
            ticks = 0
            while ticks < 20:
                await asyncio.sleep(0.005)
                ticks += 1
            # The loop ran while the pick waited: the holder still holds, the call is pending.
            holding = balancer._state.words[H_LOCK_PID] == os.getpid()
            still_held, pending = holder.is_alive() and holding, not task.done()
            release.set()
            return await asyncio.wait_for(task, 10), still_held, pending

        try:
            answer, still_held, pending = asyncio.run(main())
        finally:
            release.set()
            holder.join(10)
        assert (answer, still_held, pending) == ("10.0.0.1:80", True, True)
        assert totals(balancer) == (1, 0, 0)


def test_a_call_cancelled_while_its_pick_waits_for_the_lock_leaves_nothing_in_flight() -> None:
    with Balancer(["10.0.0.1:80"], backend_factory=Gate, monitor=False) as balancer:
        taken, release = threading.Event(), threading.Event()
        holder = threading.Thread(target=_hold, args=(balancer, taken, release))
        holder.start()
        assert taken.wait(10)

        async def main() -> None:
            task = asyncio.create_task(balancer.ainvoke(None))
            await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()
            # The pick commits once the lock is free (round-robin moves the shared cursor),
            # and the abandoned call then ends at once.
            for _ in range(1000):
                await asyncio.sleep(0.01)
                if balancer._state.cursor() == 1 and totals(balancer).in_flight == 0:
                    break
            assert balancer._state.cursor() == 1  # the abandoned pick did commit

        try:
            asyncio.run(main())
        finally:
            release.set()
            holder.join(10)
        assert totals(balancer) == (0, 0, 0)
