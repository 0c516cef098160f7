"""The owner's background work, in a small process of its own.

Two jobs need doing with no traffic at all: reclaiming the in-flight counts of workers that
died (within a second, without waiting for the next call), and active health checks. They
run in one child process of the owner, started with `subprocess` (a fresh interpreter: no
fork of a threaded process, no re-import of the owner's ``__main__``), which opens the segment
as ``top`` does, with a `Segment` handle: it never picks, so it claims no worker row.

Why not a thread in the owner: the owner is typically a gunicorn master or a pool's parent,
which forks workers after the balancer exists. A thread there makes every ``os.fork()`` copy a
process with threads (a DeprecationWarning on 3.12+, and any Python lock that thread holds is
copied held); parking it around each fork would delay every fork by up to one health-probe
timeout. A process costs one interpreter (about 25 MB) and never touches a fork.

The monitor exits when the owner closes the balancer (SIGTERM, or the closed mark), or when
the owner is gone (it is re-parented).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass

from ._health import HealthCheck, HealthTracker
from ._segment import Segment
from .errors import SegmentError

REAP_INTERVAL_S = 0.5
"""How often dead workers are looked for: a dead worker's counts are reclaimed within 1 s,
whatever the health probes are doing."""

log = logging.getLogger("dispatcher.monitor")


@dataclass(frozen=True)
class Spec:
    name: str
    owner_pid: int
    health: HealthCheck | None


def start(name: str, health: HealthCheck | None) -> subprocess.Popen[bytes]:
    """Start the monitor of segment `name` for this (owner) process."""
    spec = pickle.dumps(Spec(name, os.getpid(), health))  # an unpicklable check fails here
    process = subprocess.Popen(
        [sys.executable, "-c", "from dispatcher._monitor import main; main()"],
        stdin=subprocess.PIPE,
        close_fds=True,
        start_new_session=True,  # Ctrl-C in a terminal is the owner's to handle, not ours
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    assert process.stdin is not None
    process.stdin.write(spec)
    process.stdin.close()
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    """Ask the monitor to finish its current step and exit; wait for it."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run(spec: Spec) -> None:
    """The monitor's loop: reap, start a probe round when due, sleep until the next step.

    Probe rounds run on a thread of their own, so a slow or hanging probe never delays
    reaping; a round still running when the next is due makes that one wait.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        segment = Segment.open(spec.name)
    except SegmentError:
        return  # the owner closed the balancer before this process was up
    health = spec.health
    tracker = HealthTracker(health.rise, health.fall) if health else None
    probes = ThreadPoolExecutor(max_workers=16, thread_name_prefix="probe")
    rounds = ThreadPoolExecutor(max_workers=1, thread_name_prefix="round")
    current: Future[None] | None = None
    next_probe = time.monotonic()
    try:
        while os.getppid() == spec.owner_pid and not segment.closed_by_owner:
            dead = segment.reap()
            if dead:
                log.warning("reclaimed the calls in flight of %d dead worker(s)", dead)
            due = health is not None and time.monotonic() >= next_probe
            if health and tracker and due and (current is None or current.done()):
                next_probe = time.monotonic() + health.interval
                current = rounds.submit(check_all, segment, health, tracker, probes)
            wait = min(REAP_INTERVAL_S, max(next_probe - time.monotonic(), 0.01))
            if signal.sigtimedwait({signal.SIGTERM}, wait if health else REAP_INTERVAL_S):
                break
    finally:
        rounds.shutdown(wait=False, cancel_futures=True)
        probes.shutdown(wait=False, cancel_futures=True)
        if current is not None and health is not None:
            wait_for_futures([current], timeout=2 * health.timeout)
        segment.close()


def check_all(
    segment: Segment, health: HealthCheck, tracker: HealthTracker, probes: ThreadPoolExecutor
) -> None:
    """Probe every registered backend at once, then record each verdict."""
    addrs = [stats.addr for stats in segment.snapshot() if not stats.draining]
    try:
        results = list(probes.map(health.probe, addrs))
    except RuntimeError:
        return  # the monitor is shutting down
    tracker.forget(set(addrs))
    for addr, passed in zip(addrs, results, strict=True):
        down = tracker.observe(addr, passed)
        if segment.state.set_health(addr, passed, down):
            log.warning("%s is %s", addr, "down: failing health checks" if down else "up")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="dispatcher monitor: %(message)s")
    spec = pickle.load(sys.stdin.buffer)
    if not isinstance(spec, Spec):
        raise SystemExit("dispatcher's monitor expects a Spec on standard input")
    run(spec)
