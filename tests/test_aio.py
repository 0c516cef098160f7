"""`ainvoke` from an event loop: outcomes, cancellation, a contended lock that the loop never
waits on, and retries that behave as `invoke`'s do. Shares and counts are checked, never
timings."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from dispatcher import (
    BackendError,
    Balancer,
    ConnectError,
    HttpHeaders,
    HttpRequest,
    InvalidRequest,
    ReadTimeout,
    TLSError,
)
from dispatcher import _layout as L
from dispatcher._layout import H_LOCK_PID
from dispatcher._state import GENERATION
from dispatcher.aio import AsyncBackend, AsyncHttpBackend, aclose
from tests.helpers import (
    TlsServer,
    client_context,
    free_port,
    hold_retries,
    server_context,
    totals,
    wait_for,
)

pytest.importorskip("aiohttp")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        status = 503 if self.path == "/fail" else 200
        if self.path == "/slow":
            time.sleep(0.5)
        body = str(self.server.server_address[1]).encode()
        if self.path == "/host":
            body = str(self.headers["Host"]).encode()
        self.send_response(status)
        self.send_header("Content-type", "text/plain")
        self.send_header("Set-Cookie", "a=1")
        self.send_header("set-cookie", "b=2")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(ConnectionError):  # a client that timed out has gone
            self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
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


def test_answers_headers_failures_and_timeouts(http_addrs: list[str]) -> None:
    backend = AsyncHttpBackend(http_addrs[0])

    async def main() -> None:
        try:
            answer = await backend.ainvoke(HttpRequest("GET", "/"))
            assert isinstance(answer.headers, HttpHeaders)
            assert answer.headers.get("content-type") == "text/plain"
            assert answer.headers.get_all("SET-COOKIE") == ["a=1", "b=2"]
            posted = await backend.ainvoke(HttpRequest("POST", "/", {"X-A": "1"}, b"hello"))
            assert posted.body == b"hello"
            with pytest.raises(BackendError) as failed:
                await backend.ainvoke(HttpRequest("GET", "/fail"))
            assert failed.value.response is not None and failed.value.response.status == 503
            assert failed.value.response.headers["set-cookie"] == "a=1, b=2"
            with pytest.raises(ReadTimeout):
                await backend.ainvoke(HttpRequest("GET", "/slow"), timeout=0.05)
            nobody = AsyncHttpBackend(f"127.0.0.1:{free_port()}")
            try:
                with pytest.raises(ConnectError):
                    await nobody.ainvoke(HttpRequest("GET", "/"))
            finally:
                await nobody.aclose()
        finally:
            await backend.aclose()

    asyncio.run(main())


def test_a_malformed_request_counts_nothing(http_addrs: list[str]) -> None:
    with Balancer(http_addrs, backend_factory=AsyncHttpBackend, monitor=False) as balancer:
        before = balancer.snapshot()
        with pytest.raises(InvalidRequest):
            asyncio.run(balancer.ainvoke(HttpRequest("GET", "users")))
        assert balancer.snapshot() == before


@pytest.fixture(scope="module")
def ca() -> Any:
    return pytest.importorskip("trustme").CA()


def test_https_with_server_hostname_and_a_certificate_that_fails(
    serve: Callable[..., Any], ca: Any
) -> None:
    named = serve(_Handler, cls=TlsServer, context=server_context(ca, "api.test")).addr
    trusted = client_context(ca)
    stranger = client_context(pytest.importorskip("trustme").CA())

    def factory(addr: str) -> AsyncHttpBackend:
        if addr == "127.0.0.1:1":  # an alias of the named server, with a context that fails
            return AsyncHttpBackend(named, ssl_context=stranger, server_hostname="api.test")
        return AsyncHttpBackend(addr, ssl_context=trusted, server_hostname="api.test")

    with Balancer(
        [named, "127.0.0.1:1"], backend_factory=factory, strategy="round_robin", monitor=False
    ) as balancer:

        async def main() -> list[bytes]:
            bodies = []
            try:
                for _ in range(4):
                    try:
                        bodies.append((await balancer.ainvoke(HttpRequest("GET", "/host"))).body)
                    except TLSError as exc:
                        assert "CERTIFICATE_VERIFY_FAILED" in str(exc)
            finally:
                await aclose(balancer)
            return bodies

        port = named.rpartition(":")[2]
        assert asyncio.run(main()) == [f"api.test:{port}".encode()] * 2
        assert {s.addr: (s.requests, s.failures) for s in balancer.snapshot()} == {
            named: (2, 0),
            "127.0.0.1:1": (2, 2),
        }


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

    def hold() -> None:
        taken.set()
        release.wait(10)

    balancer._state.lock.run(hold)


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
    with Balancer(
        ["10.0.0.1:80"], backend_factory=Gate, strategy="round_robin", monitor=False
    ) as balancer:
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


# Retries: ainvoke(..., retries=N) as invoke(..., retries=N) --------------------------------


@dataclass
class Script:
    """What the backends of one balancer do, and what they saw.

    Each attempt takes `delay` seconds; then a backend in `down` fails with a
    `ConnectionError` of its own, and the others answer with their address (after `hold` is
    set, if there is one). If `slow`, every backend takes the whole timeout it was given (and
    a little more, as a real client's timer would) and raises `TimeoutError`. Every attempt is
    logged with the timeout it was given, and every exception raised is kept, so a test can
    tell which one reached the caller.
    """

    down: set[str] = field(default_factory=set)
    slow: bool = False
    delay: float = 0.0
    hold: asyncio.Event | None = None
    log: list[str] = field(default_factory=list)
    timeouts: list[float | None] = field(default_factory=list)
    raised: list[Exception] = field(default_factory=list)

    def backend(self, addr: str) -> Scripted:
        return Scripted(addr, self)


class Scripted:
    """A backend played by a `Script`, callable with ``invoke`` and with ``ainvoke``."""

    def __init__(self, addr: str, script: Script) -> None:
        self.addr = addr
        self.script = script

    def _start(self, timeout: float | None) -> float:
        script = self.script
        script.log.append(self.addr)
        script.timeouts.append(timeout)
        return (timeout or 0.0) + 0.01 if script.slow else script.delay

    def _outcome(self) -> str:
        script = self.script
        if script.slow or self.addr in script.down:
            kind = TimeoutError if script.slow else ConnectionError
            error = kind(f"{self.addr} failed attempt {len(script.log)}")
            script.raised.append(error)
            raise error
        return self.addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> str:
        time.sleep(self._start(timeout))
        return self._outcome()

    async def ainvoke(self, request: Any, *, timeout: float | None = None) -> str:
        await asyncio.sleep(self._start(timeout))
        if self.script.hold is not None and self.addr not in self.script.down:
            await self.script.hold.wait()
        return self._outcome()


def call(balancer: Balancer, how: str, request: Any = None, **options: Any) -> Any:
    """``balancer.invoke``, or ``balancer.ainvoke`` on an event loop of its own."""
    if how == "invoke":
        return balancer.invoke(request, **options)
    return asyncio.run(balancer.ainvoke(request, **options))


def retries_under_way(balancer: Balancer) -> tuple[int, int]:
    """The retry budget's count in the header, and in this process's worker row."""
    words = balancer._state.words
    return int(words[L.H_RETRIES]), int(words[balancer._state.own_row - L.W_HEADER + L.W_RETRIES])


HOW = pytest.mark.parametrize("how", ["invoke", "ainvoke"])
ADDRS = [f"10.0.6.{i}:80" for i in range(1, 6)]


def scripted(script: Script, addrs: list[str] = ADDRS, **options: Any) -> Balancer:
    """A balancer over `script`'s backends; round robin, so attempts go in `addrs` order."""
    options = {"failure_threshold": 100, "monitor": False, "strategy": "round_robin", **options}
    return Balancer(addrs, backend_factory=script.backend, **options)


@pytest.mark.parametrize("strategy", ["round_robin", "consistent_hash", "weighted_round_robin"])
def test_ainvoke_retries_exactly_as_invoke_does(strategy: str) -> None:
    """The same calls through both give the same attempts, answers, errors and numbers."""
    runs = []
    for how in ("invoke", "ainvoke"):
        script = Script(down=set(ADDRS[:3]))
        with scripted(script, strategy=strategy, failure_threshold=2) as balancer:
            outcomes: list[object] = []
            for i in range(12):
                if i == 8:
                    script.down = set(ADDRS)  # everything fails: the last failure is raised
                try:
                    outcomes.append(call(balancer, how, key=f"k{i}", retries=3))
                except Exception as exc:
                    outcomes.append((type(exc).__name__, str(exc)))
                assert retries_under_way(balancer) == (0, 0)
            stats = [
                (s.addr, s.requests, s.failures, s.consecutive_failures, s.ejected, s.in_flight)
                for s in balancer.snapshot()
            ]
            runs.append((outcomes, script.log, stats))
    assert runs[0] == runs[1]
    outcomes, log, _ = runs[0]
    assert any(isinstance(o, str) for o in outcomes) and any(isinstance(o, tuple) for o in outcomes)
    assert len(log) > 12  # some calls were retried


@HOW
def test_a_failed_attempt_is_retried_on_another_backend(how: str) -> None:
    script = Script(down={ADDRS[0]})
    with scripted(script) as balancer:
        assert call(balancer, how, retries=2) == ADDRS[1]
        assert script.log == [ADDRS[0], ADDRS[1]]
        assert call(balancer, how, retries=2) == ADDRS[2]  # round-robin goes on from there
        assert totals(balancer) == (3, 1, 0)
        assert retries_under_way(balancer) == (0, 0)


@HOW
def test_the_last_failure_is_raised(how: str) -> None:
    script = Script(down=set(ADDRS[:3]))
    with scripted(script, ADDRS[:3]) as balancer:
        # Two retries: three attempts, on three backends; the third one's error is raised.
        with pytest.raises(ConnectionError) as caught:
            call(balancer, how, retries=2)
        assert caught.value is script.raised[-1] and len(script.raised) == 3
        # More retries than backends: each is tried once, then the last failure is raised,
        # not NoBackendAvailable.
        with pytest.raises(ConnectionError) as caught:
            call(balancer, how, retries=10)
        assert caught.value is script.raised[-1] and len(script.raised) == 6
        assert len(set(script.log[3:])) == 3
        assert totals(balancer) == (6, 6, 0)
        assert retries_under_way(balancer) == (0, 0)


@HOW
def test_no_retry_is_made_while_other_processes_use_the_whole_budget(how: str) -> None:
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    script = Script(down=set(ADDRS))
    with scripted(script) as balancer:
        # Another process has the budget's floor under way: three retries at once, anywhere.
        other = ctx.Process(target=hold_retries, args=(balancer, 3, held, release))
        other.start()
        try:
            assert held.wait(30)
            with pytest.raises(ConnectionError) as caught:
                call(balancer, how, retries=2)
            assert caught.value is script.raised[0]
            assert script.log == [ADDRS[0]]  # no retry was allowed
            assert balancer._state.retries() == 3
        finally:
            release.set()
            other.join(30)
        assert other.exitcode == 0
        assert retries_under_way(balancer) == (0, 0)
        with pytest.raises(ConnectionError):
            call(balancer, how, retries=2)
        assert script.log == ADDRS[:4]  # the budget is free again: two retries
        assert totals(balancer) == (4, 4, 0)
        assert retries_under_way(balancer) == (0, 0)


@HOW
def test_retries_stop_at_the_deadline(how: str) -> None:
    # Every attempt takes its whole timeout: the first one uses up the deadline of all.
    script = Script(slow=True)
    with scripted(script) as balancer:
        with pytest.raises(TimeoutError) as caught:
            call(balancer, how, timeout=0.1, retries=4)
        assert caught.value is script.raised[-1]
        assert len(script.log) == 1
        (given,) = script.timeouts
        assert given is not None and 0 < given <= 0.1
        assert totals(balancer) == (1, 1, 0)
        assert retries_under_way(balancer) == (0, 0)


@HOW
def test_each_retry_gets_what_is_left_of_the_deadline(how: str) -> None:
    addrs = [f"10.0.7.{i}:80" for i in range(1, 11)]
    script = Script(down=set(addrs), delay=0.05)
    with scripted(script, addrs) as balancer:
        with pytest.raises(ConnectionError) as caught:
            call(balancer, how, timeout=0.12, retries=50)
        assert caught.value is script.raised[-1]
        # Each attempt takes 0.05 s: the deadline ends them early, each with less time left.
        assert 1 <= len(script.log) < 10
        timeouts = [t for t in script.timeouts if t is not None]
        assert len(timeouts) == len(script.log)
        assert all(0 < t <= 0.12 for t in timeouts), timeouts
        assert timeouts == sorted(timeouts, reverse=True) and len(set(timeouts)) == len(timeouts)
        attempts = len(script.log)
        assert totals(balancer) == (attempts, attempts, 0)
        assert retries_under_way(balancer) == (0, 0)


class Contended:
    """What `contend` reports: when the step began to wait on a thread, what it returned."""

    def __init__(self) -> None:
        self.waiting = threading.Event()
        self.results: list[object] = []


def contend(
    balancer: Balancer, step: str, release: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> Contended:
    """Make `step` find the shared lock taken: "pick" (a call's first pick), "retry pick" or
    "take_retry" (a retry's pick, or its taking of the retry budget).

    When the step is first tried without waiting, another thread takes the lock and keeps it
    until `release`, so the step moves to a thread of the pool and waits there.
    """
    taken, contended = threading.Event(), Contended()

    def around(real: Callable[..., Any], blocking: bool, *args: Any) -> Any:
        if not blocking and not taken.is_set():
            threading.Thread(target=_hold, args=(balancer, taken, release), daemon=True).start()
            assert taken.wait(10)
        if not blocking:
            return real(*args, blocking=False)
        contended.waiting.set()
        contended.results.append(real(*args))
        return contended.results[-1]

    if step == "take_retry":
        real_take = balancer._state.take_retry

        def take_retry(limit: int, blocking: bool = True) -> bool:
            return bool(around(real_take, blocking, limit))

        monkeypatch.setattr(balancer._state, "take_retry", take_retry)
    else:
        real_begin = balancer._begin

        def begin(
            call: Any, key: Any, exclude: frozenset[int] = frozenset(), blocking: bool = True
        ) -> Any:
            if (step == "retry pick") == bool(exclude):
                around(real_begin, blocking, call, key, exclude)
                contended.results[-1:] = [call[GENERATION] >= 0]  # whether it counted the call
                return None
            return real_begin(call, key, exclude, blocking)

        monkeypatch.setattr(balancer, "_begin", begin)
    return contended


@pytest.mark.parametrize("where", ["in the backend", "take_retry", "retry pick"])
def test_a_retry_cancelled_anywhere_leaves_every_count_at_zero(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while its second attempt runs, or while that attempt waits for the lock to
    take its retry budget or to pick its backend."""
    release = threading.Event()
    script = Script(down={ADDRS[0]})
    with scripted(script) as balancer:
        contended = Contended()
        if where != "in the backend":
            contended = contend(balancer, where, release, monkeypatch)

        async def main() -> None:
            script.hold = asyncio.Event()  # the second attempt never answers by itself
            task = asyncio.create_task(balancer.ainvoke(None, retries=2))
            if where == "in the backend":
                while len(script.log) < 2:
                    await asyncio.sleep(0.001)
                assert retries_under_way(balancer) == (1, 1)
                assert totals(balancer) == (1, 1, 1)
            else:
                while not contended.waiting.is_set():
                    await asyncio.sleep(0.001)
            task.cancel()
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            # What the threads were doing ends, and is undone, with the loop still running.
            for _ in range(3000):
                if retries_under_way(balancer) == (0, 0) and totals(balancer).in_flight == 0:
                    break
                await asyncio.sleep(0.01)

        try:
            asyncio.run(main())
        finally:
            release.set()
        assert retries_under_way(balancer) == (0, 0)
        assert totals(balancer) == (1, 1, 0)  # the first attempt's failure, nothing else
        assert script.log == [ADDRS[0], ADDRS[1]][: 2 if where == "in the backend" else 1]


@pytest.mark.parametrize("step", ["pick", "take_retry"])
def test_a_cancelled_step_is_undone_even_after_its_event_loop_ended(
    step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``asyncio.run`` returns, and closes its loop, while a cancelled call's step still waits
    for the lock on a thread: what the step does once it has the lock is undone all the same
    (the pick ended as cancelled, the retry's budget given back), not left counted forever."""
    release = threading.Event()
    script = Script(down={ADDRS[0]})
    with scripted(script) as balancer:
        contended = contend(balancer, step, release, monkeypatch)

        async def main() -> None:
            task = asyncio.create_task(balancer.ainvoke(None, retries=2))
            while not contended.waiting.is_set():
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        try:
            asyncio.run(main())  # its loop is closed before the step can end
        finally:
            release.set()
        wait_for(lambda: len(contended.results) == 1, what="the step to end")
        wait_for(
            lambda: retries_under_way(balancer) == (0, 0) and totals(balancer).in_flight == 0,
            timeout=10,
            what="the cancelled step to be undone",
        )
        assert contended.results[0]  # the step did count something: a call, or a retry
        assert balancer._state.cursor() == 1
        assert totals(balancer) == ((0, 0, 0) if step == "pick" else (1, 1, 0))
