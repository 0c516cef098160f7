"""The segment's background work, in a small process of its own, and who restarts it.

Two jobs need doing with no traffic at all: reclaiming the in-flight counts of workers that
died (within a second, without waiting for the next call), and active health checks. They
run in one monitor process per segment, started with `subprocess` (a fresh interpreter: no
fork of a threaded process, no re-import of the owner's ``__main__``), which opens the
segment as ``top`` does, with a `Segment` handle: it never picks, so it claims no worker row.
Everything it needs is in the segment: its health check (pickled in the header), the owner's
pid and start time, and its own pid, start time and heartbeat.

Why not a thread in the owner: the owner is typically a gunicorn master or a pool's parent,
which forks workers after the balancer exists. A thread there makes every ``os.fork()`` copy a
process with threads (a DeprecationWarning on 3.12+, and any Python lock that thread holds is
copied held); parking it around each fork would delay every fork by up to one health-probe
timeout. A process costs one interpreter (about 25 MB) and never touches a fork.

The monitor can die too (the OOM killer may choose it). Every process that picks looks at its
heartbeat when it rebuilds its view (at least once a second); one that finds it stale for
`STALE_NS` with the monitor gone reaps at once, starts a new monitor, and logs it. The monitor
exits when the owner closes the segment, or when the owner is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures

from . import _events
from . import _layout as L
from ._events import Listener
from ._health import HealthCheck, HealthTracker
from ._segment import Segment
from ._workers import is_alive, start_time
from .errors import DispatcherError, LockBusy, SegmentError

REAP_INTERVAL_S = 0.5
"""How often dead workers are looked for: a dead worker's counts are reclaimed within 1 s,
whatever the health probes are doing."""
STALE_NS = 3_000_000_000
"""A monitor whose heartbeat is this old, and whose process is gone, is replaced."""

log = logging.getLogger("dispatcher.monitor")


def configure(
    segment: Segment, health: HealthCheck | None, on_event: Listener | None = None
) -> None:
    """Owner, at creation: this segment wants a monitor, which runs `health` checks if any
    and reports events to `on_event`.

    An unpicklable check fails here, in the owner, not later in the monitor.
    """
    _events.store_spec(segment, health, on_event)
    words = segment.state.words
    words[L.H_MONITOR_BEAT_NS] = segment.state.clock()  # vouch for the one about to start
    words[L.H_MONITOR] = 1


def start(name: str, *, detach: bool = False) -> subprocess.Popen[bytes]:
    """Start a monitor for segment `name`.

    `detach` (a restart by a worker): the monitor forks once more and its first process
    exits at once, so it outlives the worker that started it and is nobody's zombie.
    """
    process = subprocess.Popen(
        [sys.executable, "-c", "from dispatcher._monitor import main; main()", name]
        + (["--detach"] if detach else []),
        stdin=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,  # Ctrl-C in a terminal is the owner's to handle, not ours
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    if detach:
        process.wait()
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


def check(segment: Segment, now: int) -> bool:
    """In any process that picks: if the segment's monitor died, reap and start another.

    One process wins the restart: it stamps the heartbeat under the lock first, so the others
    see a fresh beat. Once the owner is gone there is no monitor to restart (it would exit at
    once): the processes that still pick reap instead, each time the beat goes stale. Returns
    whether this process started a monitor.
    """
    state = segment.state
    words = state.words
    if not words[L.H_MONITOR] or now - words[L.H_MONITOR_BEAT_NS] < STALE_NS:
        return False
    pid, since = int(words[L.H_MONITOR_PID]), int(words[L.H_MONITOR_START])
    if pid and is_alive(pid, since):
        return False
    orphaned = not is_alive(int(words[L.H_OWNER_PID]), int(words[L.H_OWNER_START]))

    def claim() -> bool:
        if now - words[L.H_MONITOR_BEAT_NS] < STALE_NS:
            return False
        words[L.H_MONITOR_BEAT_NS] = now
        return True

    try:
        if not state.lock.run(claim, blocking=False):
            return False
        dead = _events.reap(segment, blocking=False)
    except LockBusy:
        return False
    if orphaned:
        if dead:
            log.warning("%s: reclaimed the calls of %d dead worker(s)", segment.name, dead)
        return False
    start(segment.name, detach=True)
    log.warning(
        "%s: the monitor process (pid %s) is gone; reclaimed the calls of %d dead worker(s) "
        "and started a new monitor",
        segment.name,
        pid or "unknown",
        dead,
    )
    return True


def run(name: str) -> None:
    """The monitor's loop: reap, start a probe round when due, sleep until the next step.

    Probe rounds run on a thread of their own, so a slow or hanging probe never delays
    reaping; a round still running when the next is due makes that one wait.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        segment = Segment.open(name)
    except SegmentError:
        return  # the owner closed the segment before this process was up
    state, words = segment.state, segment.state.words
    first = not words[L.H_MONITOR_PID]
    if not _register(segment):
        segment.close()
        return
    health, _ = _events.spec_of(segment)
    watcher = _events.Watcher(segment, health, first=first)
    tracker = HealthTracker(health.rise, health.fall) if health else None
    probes = ThreadPoolExecutor(max_workers=16, thread_name_prefix="probe")
    rounds = ThreadPoolExecutor(max_workers=1, thread_name_prefix="round")
    current: Future[None] | None = None
    next_probe = time.monotonic()
    owner, owner_start = int(words[L.H_OWNER_PID]), int(words[L.H_OWNER_START])
    try:
        while not segment.closed_by_owner and is_alive(owner, owner_start):
            words[L.H_MONITOR_BEAT_NS] = state.clock()
            _events.reap(segment)
            watcher.look(state.clock())
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


def _register(segment: Segment) -> bool:
    """Record this process as the segment's monitor, unless a live one already is."""
    state, words = segment.state, segment.state.words
    pid = os.getpid()
    start = start_time(pid)
    if start is None:
        raise DispatcherError(f"cannot read the start time of this process ({pid})")

    def update() -> bool:
        current = int(words[L.H_MONITOR_PID])
        if current and current != pid and is_alive(current, int(words[L.H_MONITOR_START])):
            return False
        words[L.H_MONITOR_START] = start
        words[L.H_MONITOR_PID] = pid
        words[L.H_MONITOR_BEAT_NS] = state.clock()
        return True

    return state.lock.run(update)


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
        segment.state.set_health(addr, passed, down)  # the watcher reports what changed


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="dispatcher monitor: %(message)s")
    if len(sys.argv) not in (2, 3):
        raise SystemExit("dispatcher's monitor takes the segment's name [--detach]")
    if sys.argv[2:] == ["--detach"] and os.fork():
        os._exit(0)
    run(sys.argv[1])
