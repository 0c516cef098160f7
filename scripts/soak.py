"""Soak: many processes x threads through one shared balancer while backends and workers die.

Real loopback HTTP backends (``ThreadingHTTPServer`` processes with a little random latency)
serve a fixed number of calls made by worker processes of several threads each, all through
one shared `Balancer` (least loaded, small failure threshold, short ejections). The balancer's
owner is a process of its own (a fresh interpreter, with its own resource tracker) that calls
too. During the run:

* backends are SIGKILLed and restarted on the same port;
* workers are SIGKILLed in the middle of calls and replaced until every call has been made;
* the owner is SIGKILLed while its threads call (its tracker then unlinks the segment; the
  workers run on, and reap each other's dead without the owner's monitor);
* workers and the owner are stopped with SIGSTOP for up to 2.5 s, maybe holding the lock
  (the others must wait for them, never take their lock over);
* a timer raises KeyboardInterrupt in each process's main thread, which calls too, anywhere
  from the start of a call until its backend is called: through the pick, the count under the
  lock and the step to the backend (the call is then made again). Not inside the backend:
  an interrupt there can break the HTTP client's own locks, which is no balancer's to mend.

At the end every counter must reconcile exactly:

* the balancer's requests equal the attempts the workers saw answered or failed, and its
  failures equal the failed attempts the workers saw;
* nothing stays in flight (a killed worker's calls are reclaimed by the monitor), the shared
  retry counter is back to 0 and every worker row is free;
* after ``close()`` no segment is left in ``/dev/shm`` and no process is left behind.

Exact counts across SIGKILL need to know what the victim had counted. Each worker thread
writes its own words in a shared array: a phase (idle, calling, finishing) and its counts. An
attempt is counted by the worker in the backend proxy, after the backend answered and before
the balancer records it, with the phase set to "finishing" first; the phase goes back to
"calling" only when the next attempt starts, and to "idle" after the call's outcome is
counted. A worker is stopped (SIGSTOP) before it is killed, and killed only if none of its
threads is finishing; otherwise it is resumed and tried again a moment later. So at death
every attempt the worker counted has been recorded by the balancer, and the calls it had in
flight are counted by nobody: the balancer must reclaim them, and a replacement makes them.

    python scripts/soak.py                                   # about 30 s on 2 cores
    python scripts/soak.py --calls 5000 --processes 2 --threads 3 --seed 7
    python scripts/soak.py --owner-kills 0 --stops 0 --interrupt-ms 0   # the plain faults
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import math
import mmap
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.sharedctypes import RawArray
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from dispatcher import BackendError, Balancer, HttpBackend, HttpRequest, NoBackendAvailable
from dispatcher import _layout as L
from dispatcher._segment import find_by_owner

IDLE, CALLING, FINISHING = 0, 1, 2
"""Phases of a worker thread: a call is under way from CALLING; FINISHING means an attempt
ended and the balancer may not have recorded it yet."""
PHASE, ATTEMPTS_OK, ATTEMPTS_FAILED, CALLS_OK, CALLS_FAILED, CALLS_REFUSED = range(6)
INTERRUPTS, RECOVERIES = 6, 7
"""Per process, in thread 0's words: KeyboardInterrupts taken, dead holders' locks recovered."""
WIDTH = 8
"""Words per worker thread in its process's shared counter array."""

CALL_TIMEOUT_S = 2.0
RUN_LIMIT_S = 300.0
"""A run that has not finished by then is stuck: it is stopped and reported as a failure."""

_thread = threading.local()
_armed = [False]
"""Whether the interrupt timer may raise now: from the start of a call made by the main thread
until its backend is called (set and cleared by that thread only)."""


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, so nothing outlives a run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# Backends ------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    """Headers and body go out in two writes: with Nagle on, each answer waits for an ACK."""

    def do_GET(self) -> None:
        time.sleep(random.uniform(0.0, 0.002))
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients reset connections when their worker is killed: that is the point here."""


def serve(port: int) -> None:
    """A backend's process: bind `port` (0 for any; retried while a killed one lets go of it)."""
    _die_with_parent()
    deadline = time.monotonic() + 10
    while True:
        try:
            server = _Server(("127.0.0.1", port), _Handler)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def start_backend(port: int = 0) -> tuple[subprocess.Popen[str], int]:
    """Start a backend on `port`, or on a free one (port 0): wait to learn which."""
    output = subprocess.PIPE if port == 0 else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port)], stdout=output, text=True
    )
    if process.stdout is not None:
        port = int(process.stdout.readline())
        process.stdout.close()
    return process, port


# Workers -------------------------------------------------------------------------------------


class CountingBackend:
    """`HttpBackend` that counts each attempt in the calling thread's words as it ends."""

    counters: Any = None
    """This worker process's shared counter array (set when the worker starts)."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self._http = HttpBackend(addr, timeout=CALL_TIMEOUT_S)

    def invoke(self, request: HttpRequest, *, timeout: float | None = None) -> Any:
        _armed[0] = False
        words, base = self.counters, _thread.base
        words[base + PHASE] = CALLING
        try:
            response = self._http.invoke(request, timeout=timeout)
        except Exception:
            words[base + PHASE] = FINISHING
            words[base + ATTEMPTS_FAILED] += 1
            raise
        words[base + PHASE] = FINISHING
        words[base + ATTEMPTS_OK] += 1
        return response

    def close(self) -> None:
        self._http.close()


def calls(
    balancer: Balancer,
    counters: Any,
    threads: int,
    interrupt_ms: float,
    more: Callable[[], bool],
) -> list[BaseException]:
    """`threads` threads, the main thread among them, call through `balancer` while `more()`
    grants another call; return what they raised. With `interrupt_ms`, a timer raises
    KeyboardInterrupt in the main thread's calls that often; an interrupted call is made
    again."""
    CountingBackend.counters = counters
    logging.getLogger("dispatcher").addHandler(_Recoveries(counters))
    "localhost".encode("idna")  # an interrupt inside a first, lazy import would break it
    errors: list[BaseException] = []
    request = HttpRequest("GET", "/")
    main = threading.main_thread()

    def run(index: int) -> None:
        base = _thread.base = index * WIDTH
        interruptible = threading.current_thread() is main and interrupt_ms > 0
        try:
            while more():
                counters[base + PHASE] = CALLING
                while True:
                    try:
                        _armed[0] = interruptible
                        balancer.invoke(request, timeout=CALL_TIMEOUT_S, retries=1)
                        outcome = CALLS_OK
                    except BackendError:
                        outcome = CALLS_FAILED
                    except NoBackendAvailable:
                        outcome = CALLS_REFUSED
                    except KeyboardInterrupt:
                        _armed[0] = False
                        counters[INTERRUPTS] += 1
                        continue
                    _armed[0] = False
                    break
                counters[base + PHASE] = FINISHING
                counters[base + outcome] += 1
                counters[base + PHASE] = IDLE
        except BaseException as exc:
            errors.append(exc)

    if interrupt_ms > 0:
        signal.signal(signal.SIGALRM, _interrupt)
        signal.setitimer(signal.ITIMER_REAL, interrupt_ms / 1000, interrupt_ms / 1000)
    pool = [threading.Thread(target=run, args=(i,)) for i in range(1, threads)]
    for thread in pool:
        thread.start()
    run(0)
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    for thread in pool:
        thread.join()
    return errors


def worker(
    balancer: Balancer, counters: Any, quota: int, threads: int, interrupt_ms: float
) -> None:
    """A worker process: make `quota` calls between its threads, then exit."""
    _die_with_parent()
    left = [quota]
    lock = threading.Lock()

    def more() -> bool:
        with lock:
            left[0] -= 1
            return left[0] >= 0

    errors = calls(balancer, counters, threads, interrupt_ms, more)
    balancer.close()
    if errors:
        raise SystemExit(f"worker {os.getpid()}: {errors[0]!r}")


def owner(counters_path: str, addrs: list[str], threads: int, interrupt_ms: float) -> None:
    """The owner's process: make the balancer, print its name, then call like a worker (its
    counters in a file the soak maps too) until its stdin closes, and close the balancer."""
    _die_with_parent()
    with open(counters_path, "r+b") as file:
        counters = memoryview(mmap.mmap(file.fileno(), threads * WIDTH * 8)).cast("q")
    balancer = Balancer(
        addrs,
        backend_factory=CountingBackend,
        strategy="least_loaded",
        failure_threshold=3,
        ejection_seconds=0.2,
        max_ejection_seconds=1.0,
    )
    print(balancer.name, flush=True)
    stopping = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stopping.set()), daemon=True).start()
    errors = calls(balancer, counters, threads, interrupt_ms, lambda: not stopping.is_set())
    balancer.close()
    if errors:
        raise SystemExit(f"owner {os.getpid()}: {errors[0]!r}")


def _interrupt(signum: int, frame: Any) -> None:
    if _armed[0]:
        _armed[0] = False
        raise KeyboardInterrupt


class _Recoveries(logging.Handler):
    """Counts this process's recoveries of a dead holder's lock, in its counter array."""

    def __init__(self, counters: Any) -> None:
        super().__init__(logging.WARNING)
        self.counters = counters

    def emit(self, record: logging.LogRecord) -> None:
        if "died holding the shared lock" in record.getMessage():
            self.counters[RECOVERIES] += 1


@dataclass
class Worker:
    """A process that calls: a worker (`process`) or the owner (`popen`), and its counters."""

    counters: Any
    quota: int
    threads: int
    process: multiprocessing.process.BaseProcess | None = None
    popen: subprocess.Popen[str] | None = None
    killed: bool = False

    @property
    def pid(self) -> int:
        pid = self.process.pid if self.process is not None else self.popen.pid  # type: ignore[union-attr]
        assert pid is not None
        return pid

    def is_alive(self) -> bool:
        if self.process is not None:
            return self.process.is_alive()
        return self.popen is not None and self.popen.poll() is None

    def reap(self) -> None:
        if self.process is not None:
            self.process.join()
        elif self.popen is not None:
            self.popen.wait()

    def total(self, word: int) -> int:
        return sum(self.counters[t * WIDTH + word] for t in range(self.threads))

    def done(self) -> int:
        return self.total(CALLS_OK) + self.total(CALLS_FAILED) + self.total(CALLS_REFUSED)

    def phases(self) -> list[int]:
        return [self.counters[t * WIDTH + PHASE] for t in range(self.threads)]


def all_stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (or the process is gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for task in tasks:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] not in "tTZX":
                    return False
    except FileNotFoundError:
        return True
    return True


def row_in_flight(balancer: Balancer, pid: int) -> int:
    """Calls the balancer counts in flight in the worker row of process `pid`."""
    state = balancer._state
    words, capacity = state.words, state.layout.capacity
    for row, row_pid, _ in state.rows():
        if row_pid == pid:
            base = state.row_base(row)
            return sum(words[base : base + capacity])
    return 0


# The run -------------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    rng: random.Random
    ctx: Any
    backends: dict[int, subprocess.Popen[str] | None]
    balancer: Balancer | None = None
    owner: Worker | None = None
    workers: list[Worker] = field(default_factory=list)
    restarts_due: dict[int, float] = field(default_factory=dict)
    resumes_due: dict[int, float] = field(default_factory=dict)
    starting: set[int] = field(default_factory=set)
    backend_kills: int = 0
    backend_restarts: int = 0
    worker_kills: int = 0
    owner_kills: int = 0
    stops: int = 0
    longest_stop: float = 0.0
    lost_in_flight: int = 0
    """Calls the balancer had in flight in killed processes' rows: they must be reclaimed."""

    def start_owner(self, counters_path: str) -> str:
        """Start the owner's process; return its balancer's name once it printed it."""
        with open(counters_path, "r+b") as file:
            counters = memoryview(mmap.mmap(file.fileno(), self.args.threads * WIDTH * 8))
        addrs = ",".join(f"127.0.0.1:{port}" for port in self.backends)
        popen = subprocess.Popen(
            [sys.executable, __file__, "--own", counters_path, addrs, *self._owner_args()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert popen.stdout is not None
        name = popen.stdout.readline().strip()
        popen.stdout.close()
        self.owner = Worker(counters.cast("q"), 0, self.args.threads, popen=popen)
        return name

    def _owner_args(self) -> list[str]:
        return [str(self.args.threads), str(self.args.interrupt_ms)]

    def start_worker(self, quota: int) -> None:
        counters = RawArray(ctypes.c_int64, self.args.threads * WIDTH)
        process = self.ctx.Process(
            target=worker,
            args=(self.balancer, counters, quota, self.args.threads, self.args.interrupt_ms),
            daemon=True,
        )
        process.start()
        self.workers.append(Worker(counters, quota, self.args.threads, process=process))

    def callers(self) -> list[Worker]:
        return self.workers + ([self.owner] if self.owner is not None else [])

    def progress(self) -> int:
        return sum(w.done() for w in self.workers)

    def all_backends_up(self) -> bool:
        """Whether every backend accepts connections (one restarted may still be starting)."""
        for port, process in self.backends.items():
            if process is None:
                return False
            if port in self.starting:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.05).close()
                except OSError:
                    return False
                self.starting.discard(port)
        return True

    def kill_backend(self) -> None:
        port = self.rng.choice(list(self.backends))
        process = self.backends[port]
        assert process is not None
        process.kill()
        process.wait()
        self.backends[port] = None
        self.backend_kills += 1
        self.restarts_due[port] = time.monotonic() + self.rng.uniform(0.1, 0.5)

    def restart_backends(self, now: float) -> None:
        for port, due in list(self.restarts_due.items()):
            if now >= due:
                self.backends[port], _ = start_backend(port)
                self.starting.add(port)
                del self.restarts_due[port]
                self.backend_restarts += 1

    def kill_worker(self) -> bool:
        """SIGKILL a worker with a call under way and none finishing; False: try again soon."""
        alive = [w for w in self.workers if not w.killed and w.is_alive()]
        if not alive:
            return True
        victim = self.rng.choice(alive)
        if not self._kill_mid_call(victim):
            return False
        self.worker_kills += 1
        left = victim.quota - victim.done()
        if left > 0:
            self.start_worker(left)
        return True

    def kill_owner(self) -> bool:
        """SIGKILL the owner mid-call, as `kill_worker`; its tracker unlinks the segment."""
        if self.owner is None or not self.owner.is_alive():
            return True
        if not self._kill_mid_call(self.owner):
            return False
        self.owner_kills += 1
        return True

    def _kill_mid_call(self, victim: Worker) -> bool:
        """Stop `victim`, and SIGKILL it only if a call is under way and none is finishing
        (so everything it counted, the balancer recorded); otherwise let it go on."""
        pid = victim.pid
        self.resumes_due.pop(pid, None)
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 1.0
        while not all_stopped(pid) and time.monotonic() < deadline:
            time.sleep(0.0005)
        phases = victim.phases()
        if not all_stopped(pid) or FINISHING in phases or CALLING not in phases:
            os.kill(pid, signal.SIGCONT)
            return False
        assert self.balancer is not None
        in_flight = row_in_flight(self.balancer, pid)
        os.kill(pid, signal.SIGKILL)
        victim.reap()
        victim.killed = True
        self.lost_in_flight += in_flight
        return True

    def stop_one(self, now: float) -> None:
        """SIGSTOP a live caller (the owner too) for up to 2.5 s: it may hold the lock."""
        alive = [w for w in self.callers() if not w.killed and w.is_alive()]
        alive = [w for w in alive if w.pid not in self.resumes_due]
        if not alive:
            return
        victim = self.rng.choice(alive)
        seconds = self.rng.uniform(0.05, 2.5)
        os.kill(victim.pid, signal.SIGSTOP)
        self.resumes_due[victim.pid] = now + seconds
        self.stops += 1
        self.longest_stop = max(self.longest_stop, seconds)

    def resume(self, now: float) -> None:
        for pid, due in list(self.resumes_due.items()):
            if now >= due:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                del self.resumes_due[pid]


def plan(rng: random.Random, count: int, start: float, end: float) -> list[float]:
    """`count` points of progress, spread between `start` and `end` with some jitter."""
    if count <= 0:
        return []
    step = (end - start) / count
    return [start + step * (i + rng.random()) for i in range(count)]


def wait_until(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def leftover_processes() -> list[str]:
    """Descendants still running, except multiprocessing's resource tracker (it exits with us)."""
    left = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "resource_tracker" not in cmdline:
            left.append(f"{child.pid} {cmdline[:80]}")
    return left


def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    ctx = multiprocessing.get_context(args.start_method)
    started = time.monotonic()
    backends: dict[int, subprocess.Popen[str] | None] = {}
    for _ in range(args.backends):
        process, port = start_backend()
        backends[port] = process
    run = Run(args, rng, ctx, backends)
    counters_file = tempfile.NamedTemporaryFile(prefix="soak-owner-")  # noqa: SIM115
    counters_file.write(bytes(args.threads * WIDTH * 8))
    counters_file.flush()
    name = run.start_owner(counters_file.name)
    balancer = run.balancer = Balancer.attach(
        name, backend_factory=CountingBackend, strategy="least_loaded"
    )
    mismatches: list[str] = []
    stats: list[Any] = []
    calls_ok = calls_failed = refused = attempts_ok = attempts_failed = requests = failures = 0
    try:
        share, extra = divmod(args.calls, args.processes)
        for i in range(args.processes):
            run.start_worker(share + (i < extra))
        backend_faults = plan(rng, args.backend_kills, 0.05, 0.85)
        worker_faults = plan(rng, args.worker_kills, 0.05, 0.9)
        owner_faults = plan(rng, args.owner_kills, 0.3, 0.7)
        stop_faults = plan(rng, args.stops, 0.05, 0.8)
        while any(w.is_alive() for w in run.workers):
            now = time.monotonic()
            if now - started > RUN_LIMIT_S:
                mismatches.append(f"the run did not finish in {RUN_LIMIT_S:.0f} s")
                break
            done = run.progress() / args.calls
            if backend_faults and done >= backend_faults[0] and run.all_backends_up():
                backend_faults.pop(0)
                run.kill_backend()
            if worker_faults and done >= worker_faults[0] and run.kill_worker():
                worker_faults.pop(0)
            if owner_faults and done >= owner_faults[0] and run.kill_owner():
                owner_faults.pop(0)
            if stop_faults and done >= stop_faults[0]:
                stop_faults.pop(0)
                run.stop_one(now)
            run.resume(now)
            run.restart_backends(now)
            time.sleep(0.002)
        run.resume(math.inf)
        for w in run.workers:
            assert w.process is not None
            w.process.join(10)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            if not w.killed and w.process.exitcode != 0:
                mismatches.append(f"worker {w.process.pid} exited with {w.process.exitcode}")
        owner = run.owner
        assert owner is not None and owner.popen is not None
        if not owner.killed:  # the owner stops calling, closes the balancer and exits
            assert owner.popen.stdin is not None
            owner.popen.stdin.close()
            if owner.popen.wait(30) != 0:
                mismatches.append(f"the owner exited with {owner.popen.returncode}")
        run.restart_backends(math.inf)
        balancer.reap()  # the owner's row, if it died after the last worker stopped picking

        def settled() -> bool:
            return not any(s.in_flight for s in balancer.snapshot()) and not balancer._state.rows()

        wait_until(settled, 5.0)
        stats = balancer.snapshot()
        requests = sum(s.requests for s in stats)
        failures = sum(s.failures for s in stats)
        in_flight = sum(s.in_flight for s in stats)
        retries = balancer._state.retries()
        rows = len(balancer._state.rows())
        callers = run.callers()
        attempts_ok = sum(w.total(ATTEMPTS_OK) for w in callers)
        attempts_failed = sum(w.total(ATTEMPTS_FAILED) for w in callers)
        calls_ok = sum(w.total(CALLS_OK) for w in run.workers)
        calls_failed = sum(w.total(CALLS_FAILED) for w in run.workers)
        refused = sum(w.total(CALLS_REFUSED) for w in run.workers)
        checks = [
            ("calls made", calls_ok + calls_failed + refused, "calls asked for", args.calls),
            (
                "balancer requests",
                requests,
                "attempts the workers and the owner saw",
                attempts_ok + attempts_failed,
            ),
            ("balancer failures", failures, "failed attempts they saw", attempts_failed),
            ("calls in flight", in_flight, "expected", 0),
            ("retries under way", retries, "expected", 0),
            ("worker rows still claimed", rows, "expected", 0),
        ]
        for label, got, other, want in checks:
            if got != want:
                mismatches.append(f"{label} {got} != {other} {want}")
        if not lock_is_free(balancer):
            mismatches.append("the shared lock is still held")
    finally:
        for w in run.callers():
            if w.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGCONT)
                    os.kill(w.pid, signal.SIGKILL)
                w.reap()
        balancer.close()
        counters_file.close()
        for backend in backends.values():
            if backend is not None:
                backend.kill()
                backend.wait()
    elapsed = time.monotonic() - started
    left = find_by_owner(run.owner.pid, closed=True)
    if os.path.exists(f"/dev/shm/{name}") or left:
        mismatches.append(f"segment left in /dev/shm: {left or [name]}")
    if not wait_until(lambda: not leftover_processes(), 5.0):
        mismatches.append(f"processes left: {leftover_processes()}")
    interrupts = sum(w.counters[INTERRUPTS] for w in run.callers())
    recoveries = sum(w.counters[RECOVERIES] for w in run.callers())

    print(
        f"soak: {args.calls} calls from {args.processes} processes x {args.threads} threads "
        f"and the owner over {args.backends} backends in {elapsed:.1f} s (seed {args.seed})"
    )
    print(
        f"  calls: {calls_ok} ok, {calls_failed} failed, {refused} refused; attempts: "
        f"{attempts_ok} ok, {attempts_failed} failed; balancer: {requests} requests, "
        f"{failures} failures"
    )
    print(
        f"  faults: {run.backend_kills} backend kills / {run.backend_restarts} restarts, "
        f"{run.worker_kills} worker kills, {run.owner_kills} owner kill "
        f"({run.lost_in_flight} calls in flight at death, reclaimed), {run.stops} stops "
        f"(up to {run.longest_stop:.1f} s), {interrupts} interrupts, {recoveries} locks "
        f"recovered from dead holders"
    )
    for s in stats:
        print(
            f"  {s.addr}: {s.requests} requests, {s.failures} failures, "
            f"ejected {s.times_ejected} times"
        )
    if mismatches:
        for mismatch in mismatches:
            print(f"  MISMATCH: {mismatch}")
        return 1
    print(
        "  nothing lost: in flight 0, retries 0, rows free, lock free, segment removed, "
        "no process left"
    )
    return 0


def lock_is_free(balancer: Balancer) -> bool:
    """Whether nobody holds the shared lock (and no holder is recorded)."""
    semaphore = balancer._state.lock.semaphore
    if not semaphore.acquire(True, 5.0):
        return False
    semaphore.release()
    return balancer._state.words[L.H_LOCK_PID] == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cores = os.cpu_count() or 1
    parser.add_argument("--calls", type=int, default=60_000)
    parser.add_argument("--processes", type=int, default=2 * cores)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--backends", type=int, default=3)
    parser.add_argument("--backend-kills", type=int, default=8)
    parser.add_argument("--worker-kills", type=int, default=10)
    parser.add_argument("--owner-kills", type=int, choices=[0, 1], default=1)
    parser.add_argument("--stops", type=int, default=6, help="SIGSTOPs of up to 2.5 s")
    parser.add_argument(
        "--interrupt-ms",
        type=float,
        default=5.0,
        help="KeyboardInterrupt in each main thread's calls this often (0: none)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start-method", choices=["fork", "spawn"], default="fork")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--own", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    if args.own is not None:
        path, addrs, threads, interrupt_ms = args.own
        owner(path, addrs.split(","), int(threads), float(interrupt_ms))
        return
    if args.start_method == "spawn" and args.owner_kills:
        parser.error("--owner-kills needs --start-method fork: spawned workers attach by name")
    if min(args.calls, args.processes, args.threads, args.backends) < 1:
        parser.error("--calls, --processes, --threads and --backends must be at least 1")
    sys.exit(soak(args))


if __name__ == "__main__":
    main()
