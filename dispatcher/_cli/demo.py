"""The demo of ``python -m dispatcher``: real backends, a worker pool, a script of incidents.

Everything runs on this machine and stops with the demo. Backends are `ThreadingHTTPServer`s
in their own processes on ephemeral loopback ports, each with a latency and an error rate;
the parent changes a backend's latency through a shared `multiprocessing.Value`, kills it with
SIGKILL (a crash, not a goodbye) and starts it again on the same port. A `WorkerPool` sends a
steady rate of requests through one shared `Balancer` whose ejection and slow-start settings
are short, so each incident plays out within a minute:

* a backend turns slow: load- and latency-aware strategies send it less, round-robin does not;
* a backend is killed: after `failure_threshold` failures in a row it is ejected, and the
  active health checks (run by the balancer's monitor process) mark it down;
* it restarts: the health checks bring it back, and slow start gives it a growing share.

Children are started with the spawn method: the parent runs threads (the pool's, the
dashboard's) by the time it restarts a backend, and a fork of a threaded process is unsafe.
Ctrl-C (SIGINT) reaches every process of the terminal's group; the children ignore it and the
parent stops them all, so no process and no shared segment outlives the demo.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.sharedctypes
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rich.console import Console

from .._backends import HttpBackend, HttpRequest
from .._balancer import Balancer
from .._health import HealthCheck
from .._pool import WorkerPool
from .._segment import Segment
from ..discovery import Discovery, EtcdResolver
from ..errors import NoBackendAvailable
from .dashboard import Frame, Sampler, Screen, render, summary, worker_rows

DEFAULT_STRATEGY = "least_loaded"
REQUEST = HttpRequest("GET", "/work")
HEALTH_PATH = "/health"
USERS = 100
"""Requests carry one of this many user keys, which `consistent_hash` keeps on one backend."""
CALL_TIMEOUT = 2.0
FRAME_SECONDS = 0.25
SLOW_FACTOR = 15.0

_spawn = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class Profile:
    """How a demo backend answers: a typical latency and a share of 500 errors."""

    kind: str
    latency: float
    """Median answer time in seconds."""
    error_rate: float


PROFILES = (
    Profile("fast", 0.004, 0.002),
    Profile("steady", 0.008, 0.005),
    Profile("slower", 0.020, 0.01),
    Profile("fast", 0.005, 0.002),
    Profile("flaky", 0.010, 0.05),
)


@dataclass(frozen=True)
class Options:
    backends: int = 4
    workers: int = 4
    strategy: str = DEFAULT_STRATEGY
    rate: float = 100.0
    """Requests per second sent into the pool."""
    duration: float | None = None
    """Seconds to run; None runs until Ctrl-C."""
    slow_start: float = 10.0
    svg: str | None = None
    """Where to save the last frame as an SVG picture, if anywhere."""
    etcd: str | None = None
    """An etcd v3 URL: the backends are published there and the balancer follows the registry."""
    service: str = "demo"


# The backends ------------------------------------------------------------------------------


def _serve(
    port: int,
    profile: Profile,
    multiplier: Any,
    ready: multiprocessing.connection.Connection,
) -> None:
    """Body of a backend process: answer ``GET`` after a lognormal delay, sometimes with 500."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in two writes: without this, Nagle's algorithm and the
            # client's delayed ACK hold the body back ~40 ms.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_GET(self) -> None:
            if self.path == HEALTH_PATH:
                self._answer(200, b"ok\n")
                return
            time.sleep(profile.latency * multiplier.value * random.lognormvariate(0.0, 0.35))
            if random.random() < profile.error_rate:
                self._answer(500, b"overloaded\n")
            else:
                self._answer(200, b"ok\n")

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as exc:
        ready.send(f"cannot listen on port {port}: {exc.strerror}")
        return
    server.daemon_threads = True
    ready.send(server.server_address[1])
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    server.serve_forever(poll_interval=0.2)


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()
    os._exit(0)


class DemoBackend:
    """One backend process: started, slowed down, killed and started again on its port."""

    def __init__(self, name: str, profile: Profile) -> None:
        self.name = name
        self.profile = profile
        self.port = 0
        self.multiplier = _spawn.Value("d", 1.0, lock=False)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._ready: multiprocessing.connection.Connection | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def label(self) -> str:
        return f"{self.name} {self.profile.kind}"

    def start(self) -> None:
        """Start the process; `wait_ready` finishes the start."""
        receive, send = _spawn.Pipe(duplex=False)
        self._process = _spawn.Process(
            target=_serve,
            args=(self.port, self.profile, self.multiplier, send),
            name=f"dispatcher-demo-{self.name}",
            daemon=True,
        )
        self._process.start()
        send.close()
        self._ready = receive

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the backend listens; learn its port the first time."""
        ready, process = self._ready, self._process
        if ready is None or process is None:
            raise RuntimeError(f"{self.name} was not started")
        try:
            if not ready.poll(timeout):
                raise RuntimeError(f"{self.name} did not start within {timeout} s")
            answer = ready.recv()
        except EOFError:
            raise RuntimeError(f"{self.name} exited while starting") from None
        finally:
            ready.close()
            self._ready = None
        if isinstance(answer, str):
            raise RuntimeError(f"{self.name}: {answer}")
        self.port = int(answer)

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    def kill(self) -> None:
        """SIGKILL: the backend vanishes mid-request, as in a crash."""
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
            self._process = None

    def stop(self) -> None:
        if self._ready is not None:
            self._ready.close()
            self._ready = None
        if self._process is not None:
            self._process.terminate()
            self._process.join(5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
            self._process = None


def start_backends(count: int) -> list[DemoBackend]:
    """Start `count` backends at once (in parallel: spawning is the slow part)."""
    backends = [
        DemoBackend(f"b{i + 1}", profile)
        for i, profile in zip(range(count), itertools.cycle(PROFILES), strict=False)
    ]
    try:
        for backend in backends:
            backend.start()
        for backend in backends:
            backend.wait_ready()
    except BaseException:
        for backend in backends:
            backend.stop()
        raise
    return backends


# The timeline ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    at: float
    """Seconds into the cycle."""
    text: str
    action: Callable[[], str | None] | None = None
    """Does the step; may return a line for the event log."""


def timeline(backends: list[DemoBackend]) -> tuple[list[Step], float]:
    """The incidents of one cycle, and the cycle's length in seconds."""
    steps = [Step(0, "steady load")]
    if len(backends) < 2:
        return steps, 30.0
    slow = backends[1]
    dead = backends[2] if len(backends) > 2 else backends[0]

    def set_speed(factor: float) -> Callable[[], None]:
        def action() -> None:
            slow.multiplier.value = factor

        return action

    def restart() -> str | None:
        dead.start()
        try:
            dead.wait_ready()
        except RuntimeError as exc:
            return f"{dead.name} could not restart: {exc}"
        return f"{dead.name} listens again on port {dead.port} (pid {dead.pid})"

    steps += [
        Step(8, f"{slow.name} turns slow (x{SLOW_FACTOR:.0f} latency)", set_speed(SLOW_FACTOR)),
        Step(18, f"{slow.name} is fast again", set_speed(1.0)),
        Step(22, f"{dead.name} is killed (SIGKILL)", dead.kill),
        Step(32, f"{dead.name} restarts on the same port", restart),
    ]
    return steps, 46.0


class Timeline:
    """Runs the steps of the cycle as their time comes, again and again."""

    def __init__(self, steps: list[Step], period: float) -> None:
        self._steps, self._period = steps, period
        self._cycle, self._next = 0, 0
        self.current = ""

    def progress(self, elapsed: float) -> str:
        """Where the cycle is: "step 3/5: <now> · next: <step> in 12 s"."""
        steps, total = self._steps, len(self._steps)
        upcoming = steps[self._next]
        due = self._cycle * self._period + upcoming.at - elapsed
        now = f"step {(self._next - 1) % total + 1}/{total}: {self.current}" if self.current else ""
        following = f"next: {upcoming.text} in {max(math.ceil(due), 0)} s"
        return f"{now} · {following}" if now else following

    def advance(self, elapsed: float) -> Iterator[str]:
        """Run every step due by `elapsed` seconds; yield the lines for the event log."""
        while True:
            step = self._steps[self._next]
            if elapsed < self._cycle * self._period + step.at:
                return
            self.current = step.text
            yield step.text
            line = step.action() if step.action is not None else None
            if line:
                yield line
            self._next += 1
            if self._next == len(self._steps):
                self._next, self._cycle = 0, self._cycle + 1


# The load ----------------------------------------------------------------------------------


class Load:
    """Sends requests into the pool at a steady rate and counts how they end."""

    def __init__(self, pool: WorkerPool, rate: float) -> None:
        self._pool = pool
        self._interval = 1.0 / rate
        self._limit = pool.processes * 4
        self._lock = threading.Lock()
        self._next = time.monotonic()
        self.sent = self.ok = self.failed = self.no_backend = self.shed = self.outstanding = 0

    def warm_up(self, stop: threading.Event, timeout: float = 60.0) -> None:
        """Start every worker before the load's clock does: a spawned worker takes a second
        or so to start, and requests sent at the steady rate meanwhile would pile up and be
        shed before the pool ever ran."""
        futures = [
            self._pool.submit(REQUEST, timeout=CALL_TIMEOUT, key=f"user-{i}")
            for i in range(self._pool.processes * 2)
        ]
        deadline = time.monotonic() + timeout
        for future in futures:
            while not future.done() and not stop.is_set() and time.monotonic() < deadline:
                stop.wait(0.05)
        self._next = time.monotonic()

    def send_due(self, now: float) -> None:
        if now - self._next > 1.0:
            self._next = now
        while self._next <= now:
            self._next += self._interval
            if self.outstanding >= self._limit:
                self.shed += 1
                continue
            with self._lock:
                self.sent += 1
                self.outstanding += 1
            key = f"user-{self.sent % USERS}"
            self._pool.submit(REQUEST, timeout=CALL_TIMEOUT, key=key).add_done_callback(self._done)

    def next_due(self) -> float:
        return self._next

    def _done(self, future: Future[Any]) -> None:
        error = None if future.cancelled() else future.exception()
        with self._lock:
            self.outstanding -= 1
            if future.cancelled():
                return
            if error is None:
                self.ok += 1
            elif isinstance(error, NoBackendAvailable):
                self.no_backend += 1
            else:
                self.failed += 1

    def totals(self) -> str:
        return (
            f"sent {self.sent}  ok {self.ok}  failed {self.failed}  "
            f"no backend {self.no_backend}  shed (pool busy) {self.shed}"
        )


# The demo ----------------------------------------------------------------------------------


def make_balancer(addrs: list[str], options: Options) -> Balancer:
    """The shared balancer, tuned so that ejections, health verdicts and slow starts take
    seconds. Health probes run in the balancer's monitor process, never in the workers."""
    return Balancer(
        addrs,
        backend_factory=HttpBackend,
        strategy=options.strategy,
        failure_threshold=3,
        ejection_seconds=4.0,
        max_ejection_seconds=12.0,
        slow_start_seconds=options.slow_start,
        health_check=HealthCheck(HEALTH_PATH, interval=1.0, rise=2, fall=2, timeout=0.5),
        latency=True,  # the dashboard shows each backend's p50 and p99
    )


def follow_registry(
    stack: contextlib.ExitStack,
    balancer: Balancer,
    backends: list[DemoBackend],
    url: str,
    service: str,
) -> None:
    """Publish the demo's backends in etcd and let the balancer's membership follow it."""
    registry = EtcdResolver(url, service)
    for backend in backends:
        registry.publish(backend.label, backend.addr)
        stack.callback(registry.withdraw, backend.label)
    discovery = Discovery(balancer, registry).start()
    stack.callback(discovery.stop)
    deadline = time.monotonic() + 10
    while len(balancer.snapshot()) < len(backends) and time.monotonic() < deadline:
        time.sleep(0.05)


def run(
    options: Options, console: Console | None = None, stop: threading.Event | None = None
) -> int:
    """Run the demo until `options.duration` ends or `stop` is set; return the exit status."""
    console = console or Console()
    stop = stop or threading.Event()
    with contextlib.ExitStack() as stack:
        console.print(
            f"starting {options.backends} backends and {options.workers} workers "
            f"(strategy {options.strategy}) ...",
            highlight=False,
        )
        backends = start_backends(options.backends)
        for backend in backends:
            stack.callback(backend.stop)
        if options.etcd:
            balancer = stack.enter_context(make_balancer([], options))
            follow_registry(stack, balancer, backends, options.etcd, options.service)
        else:
            balancer = stack.enter_context(make_balancer([b.addr for b in backends], options))
        pool = WorkerPool(balancer, options.workers, mp_context=_spawn)
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        console.print(
            f"balancer segment {balancer.name}; watch it from another terminal with "
            f"`python -m dispatcher top {os.getpid()}`",
            highlight=False,
            soft_wrap=True,
        )
        load = Load(pool, options.rate)
        console.print(f"starting {options.workers} workers ...", highlight=False)
        load.warm_up(stop)
        segment = Segment.open(balancer.name)
        stack.callback(segment.close)
        sampler = Sampler(
            segment.snapshot,
            functools.partial(worker_rows, segment),
            title="dispatcher demo",
            source=balancer.name,
            strategy=options.strategy,
            labels={b.addr: b.name for b in backends},
        )
        steps, period = timeline(backends)
        script = Timeline(steps, period)
        last = _loop(options, stop, sampler, script, load, stack.enter_context(Screen(console)))
        pool.shutdown(wait=True, cancel_futures=True)
        frame = sampler.sample(event=script.current, totals=load.totals())
        stack.close()
        console.print(summary(frame))
        console.print(frame.totals, highlight=False)
        if options.svg:
            save_svg(last, options.svg)
    return 0


def _loop(
    options: Options,
    stop: threading.Event,
    sampler: Sampler,
    script: Timeline,
    load: Load,
    screen: Screen,
) -> Frame:
    start = time.monotonic()
    next_frame = start
    frame = sampler.sample()
    while not stop.is_set():
        now = time.monotonic()
        elapsed = now - start
        if options.duration is not None and elapsed >= options.duration:
            break
        for line in script.advance(elapsed):
            sampler.note(line)
        load.send_due(now)
        if now >= next_frame:
            frame = sampler.sample(event=script.progress(elapsed), totals=load.totals())
            screen.show(frame)
            next_frame = max(next_frame + FRAME_SECONDS, now)
        stop.wait(max(0.0, min(load.next_due(), next_frame) - time.monotonic()))
    return frame


def save_svg(frame: Frame, path: str, width: int = 80) -> None:
    """Save a picture of the dashboard for `frame`, as shown on a terminal."""
    console = Console(record=True, width=width, file=open(os.devnull, "w"))  # noqa: SIM115
    with console.file:
        console.print(render(frame))
        console.save_svg(path, title="python -m dispatcher")
