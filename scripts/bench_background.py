"""Where the owner's background work should run: a monitor process, or a thread parked at fork.

The owner must notice dead workers and probe backends with no traffic, so something runs in
the background. This compares the two designs the reliability issue names, on what matters to
a gunicorn master or a pool's parent that forks workers after the balancer exists:

* monitor process (what dispatcher does): the cost of starting it, its memory, how fast a
  SIGKILLed worker's call is reclaimed, and how long the owner's ``os.fork()`` takes;
* a thread in the owner, stopped before each fork and restarted after (``os.register_at_fork``):
  how long each ``os.fork()`` takes when the thread is idle, and when it is in the middle of a
  health probe (a 100 ms answer).

    python scripts/bench_background.py
"""

from __future__ import annotations

import http.server
import multiprocessing
import os
import signal
import statistics
import threading
import time
from typing import Any

import psutil
import urllib3

from dispatcher import Balancer

FORKS = 30


class Hold:
    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> None:
        request.wait(60)


def fork_ms() -> float:
    """Median time for this process to fork a child that exits at once."""
    times = []
    for _ in range(FORKS):
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        times.append(time.perf_counter() - started)
        os.waitpid(pid, 0)
    return statistics.median(times) * 1e3


def hold(balancer: Balancer, gate: Any) -> None:
    balancer.invoke(gate)


def monitor_figures() -> None:
    started = time.perf_counter()
    balancer = Balancer(["10.0.0.1:80", "10.0.0.2:80"], backend_factory=Hold)
    created = time.perf_counter() - started
    monitor = next(
        p for p in psutil.Process().children() if "dispatcher._monitor" in " ".join(p.cmdline())
    )
    while True:  # wait until it is up: it has attached and its RSS is settled
        time.sleep(0.2)
        if any(m.path.startswith("/dev/shm/dispatcher") for m in monitor.memory_maps()):
            break
    rss = monitor.memory_info().rss / 2**20
    ctx = multiprocessing.get_context("fork")
    gate = ctx.Event()
    child = ctx.Process(target=hold, args=(balancer, gate))
    child.start()
    while sum(s.in_flight for s in balancer.snapshot()) == 0:
        time.sleep(0.001)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join()
    killed = time.perf_counter()
    while sum(s.in_flight for s in balancer.snapshot()):
        time.sleep(0.005)
    reclaimed = time.perf_counter() - killed
    forking = fork_ms()
    balancer.close()
    print(
        f"monitor process: Balancer() returns in {created * 1e3:.1f} ms, monitor RSS "
        f"{rss:.0f} MiB, dead worker reclaimed in {reclaimed * 1e3:.0f} ms, "
        f"owner os.fork() median {forking:.2f} ms"
    )


class ParkedThread:
    """The alternative: background work in an owner thread, stopped around every fork."""

    def __init__(self, probe_url: str) -> None:
        self.url = probe_url
        self.http = urllib3.PoolManager()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        os.register_at_fork(before=self.park, after_in_parent=self.start)

    def start(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def park(self) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = None

    def run(self) -> None:
        while not self.stop.wait(0.0):
            self.http.request("GET", self.url, timeout=5.0)


class SlowHealth(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(0.1)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def thread_figures() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    idle = fork_ms()
    parked = ParkedThread(f"http://127.0.0.1:{server.server_port}/healthz")
    parked.start()
    time.sleep(0.05)
    probing = fork_ms()
    parked.park()
    server.shutdown()
    print(
        f"thread parked at fork: owner os.fork() median {idle:.2f} ms with no thread, "
        f"{probing:.2f} ms while the thread probes a 100 ms health endpoint"
    )


if __name__ == "__main__":
    monitor_figures()
    thread_figures()
