"""The segment's background work, in a small process of its own, and who restarts it.

Two jobs need doing with no traffic at all: reclaiming the in-flight counts of workers that
died (within half a second, without waiting for the next call), and active health checks. They
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

A segment made by `Balancer.shared` has no owner to close it: its monitor is also its
guardian. Started detached (so it outlives the worker that made it, which may be SIGKILLed),
it removes the segment, its lock and its creation lock once no live process holds a worker
row in it: at once when the server's parent process is gone, after `IDLE_S` while the parent
lives on (a plain script that ended, a server whose master held the only row). A SIGTERM
(a service manager stopping everything) makes it leave as soon as nobody holds a row, or after
`TERM_GRACE_S` if some process still does (that one restarts a guardian if it goes on).
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

REAP_INTERVAL_S = 0.25
"""How often dead workers are looked for: a dead worker's counts are reclaimed within half a
second, whatever the health probes are doing. A round costs about 45 us per live worker row
(its pid's start time and status, through psutil)."""
STALE_NS = 3_000_000_000
"""A monitor whose heartbeat is this old, and whose process is gone, is replaced."""
IDLE_S = 3.0
"""A shared segment that no live process has held a worker row in for this long is removed,
even while its server's parent process lives."""
TERM_GRACE_S = 10.0
"""How long a guardian asked to stop (SIGTERM) waits for the processes that hold rows."""

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


def start(
    name: str, *, detach: bool = False, announce: bool = False, wait: bool = True
) -> subprocess.Popen[bytes]:
    """Start a monitor for segment `name`.

    `detach` (a shared segment's guardian, a restart by a worker): the monitor forks once more
    and its first process exits at once, so it outlives the worker that started it and is
    nobody's zombie; that first process is waited for unless not `wait` (the caller then
    waits for it, once it has released what others wait for). `announce`: the monitor logs
    the segment's name once (at creation).
    """
    process = subprocess.Popen(
        [sys.executable, "-c", "from dispatcher._monitor import main; main()", name]
        + (["--detach"] if detach else [])
        + (["--announce"] if announce else []),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # it logs to stderr, where its starter's messages go
        close_fds=True,
        start_new_session=True,  # Ctrl-C in a terminal is the owner's to handle, not ours
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    if detach and wait:
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
    # A shared segment's monitor is its guardian: it is wanted for as long as anyone picks.
    owned = words[L.H_SCOPE] == L.OWNED
    orphaned = owned and not is_alive(int(words[L.H_OWNER_PID]), int(words[L.H_OWNER_START]))

    def claim() -> bool:
        if now - words[L.H_MONITOR_BEAT_NS] < STALE_NS:
            return False
        words[L.H_MONITOR_BEAT_NS] = now
        return True

    try:
        if not state.lock.run(claim, blocking=False):
            return False
        dead, calls = _events.reap(segment, blocking=False)
    except LockBusy:
        return False
    if calls:
        log.warning("%s: %s", segment.name, reclaimed(calls, dead))
    if orphaned:
        return False
    start(segment.name, detach=True)
    log.warning(
        "%s: the monitor process (pid %s) is gone; started a new monitor",
        segment.name,
        pid or "unknown",
    )
    return True


def reclaimed(calls: int, dead: int) -> str:
    return (
        f"reclaimed {calls} call{'s' * (calls != 1)} in flight from {dead} dead "
        f"worker{'s' * (dead != 1)}"
    )


def run(name: str, announce: bool = False) -> None:
    """The monitor's loop: reap, start a probe round when due, sleep until the next step;
    for a shared segment, remove it once nobody holds it (see the module's docstring).

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
    guard = Guard(segment)
    if announce:
        log.info("%s", guard.describe())
    health, _ = _events.spec_of(segment)
    watcher = _events.Watcher(segment, health, first=first)
    tracker = HealthTracker(health.rise, health.fall) if health else None
    probes = ThreadPoolExecutor(max_workers=16, thread_name_prefix="probe")
    rounds = ThreadPoolExecutor(max_workers=1, thread_name_prefix="round")
    current: Future[None] | None = None
    next_probe = time.monotonic()
    try:
        while not segment.closed_by_owner and guard.owner_wanted():
            words[L.H_MONITOR_BEAT_NS] = state.clock()
            dead, calls = _events.reap(segment)
            if calls:
                log.warning("%s: %s", segment.name, reclaimed(calls, dead))
            watcher.look(state.clock())
            if guard.ended():
                break
            due = health is not None and time.monotonic() >= next_probe
            if health and tracker and due and (current is None or current.done()):
                next_probe = time.monotonic() + health.interval
                current = rounds.submit(check_all, segment, health, tracker, probes)
            wait = min(REAP_INTERVAL_S, max(next_probe - time.monotonic(), 0.01))
            if signal.sigtimedwait({signal.SIGTERM}, wait if health else REAP_INTERVAL_S):
                if not guard.guarding:
                    break
                guard.terminate()
    finally:
        rounds.shutdown(wait=False, cancel_futures=True)
        probes.shutdown(wait=False, cancel_futures=True)
        if current is not None and health is not None:
            wait_for_futures([current], timeout=2 * health.timeout)
        segment.close()


class Guard:
    """When the monitor's segment ends: with its owner (an owned segment), or, for a shared
    one, once no live process holds a worker row in it, which the monitor then removes."""

    def __init__(self, segment: Segment) -> None:
        words = segment.state.words
        self.segment = segment
        self.guarding = segment.scope_kind != L.OWNED
        self.owner = int(words[L.H_OWNER_PID])
        self.owner_start = int(words[L.H_OWNER_START])
        self.idle_since: float | None = None
        self.stop_by: float | None = None

    def describe(self) -> str:
        segment = self.segment
        if not self.guarding:
            who = f"owned by pid {self.owner}"
        elif self.owner:
            who = f"shared as {segment.shared_name!r} by the children of pid {self.owner}"
        else:
            who = f"shared as {segment.shared_name!r} under a named scope"
        return f"{segment.name}: balancer {who}; `python -m dispatcher top {segment.name}` shows it"

    def owner_wanted(self) -> bool:
        """Whether an owned segment's owner is still there (a shared one has none to wait
        for: its guardian decides in `ended`)."""
        return self.guarding or is_alive(self.owner, self.owner_start)

    def ended(self) -> bool:
        """A shared segment, just reaped: remove it if nobody holds it and its server is gone,
        has been idle for `IDLE_S`, or this guardian was asked to stop. Returns whether the
        monitor should exit."""
        if not self.guarding:
            return False
        now = time.monotonic()
        if self.stop_by is not None and now > self.stop_by:
            return True
        if self.segment.state.rows():
            self.idle_since = None
            return False
        if self.idle_since is None:
            self.idle_since = now
        parent_gone = bool(self.owner) and not is_alive(self.owner, self.owner_start)
        due = parent_gone or now - self.idle_since >= IDLE_S or self.stop_by is not None
        if due and self.segment.remove_unheld():
            log.info("%s: removed: no process of its server holds it", self.segment.name)
            return True
        return False

    def terminate(self) -> None:
        if self.stop_by is None:
            self.stop_by = time.monotonic() + TERM_GRACE_S


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
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s dispatcher monitor %(process)d: %(message)s",
    )
    flags = sys.argv[2:]
    if len(sys.argv) < 2 or not set(flags) <= {"--detach", "--announce"}:
        raise SystemExit("dispatcher's monitor takes the segment's name [--detach] [--announce]")
    if "--detach" in flags and os.fork():
        os._exit(0)
    run(sys.argv[1], announce="--announce" in flags)
