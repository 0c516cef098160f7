"""What happens to backends and workers, told once for the whole server: a log line and a call.

Each event is logged on the ``dispatcher`` logger (one line, with the backend, the reason and
the duration) and passed to the balancer's ``on_event`` callback, if it has one. Every event
is reported by exactly one process, the one where it is decided or noticed:

* ``registered``, ``unregistered``, ``draining``: the process that called `Balancer.register`
  (or discovery, or the gunicorn hooks on a re-read of their config), after the lock is
  released.
* ``ejected``, ``returned``, ``down``, ``up``: the monitor process, which compares the
  shared words every half second (`Watcher`), unlocked. An ejection is decided by whichever
  worker saw the failure that crossed the threshold, under the lock, in the middle of the end
  of a call: reporting it there would add work to that path and run a callback next to it,
  so the monitor notices the new ejection count instead, within half a second. A return from
  ejection is only time passing, and a health verdict is the monitor's own.
* ``reaped``: whichever process reclaims a dead worker's calls (the monitor, a gunicorn
  master's ``child_exit``, `Balancer.reap`): the reap is decided under the lock, once.

So events of the monitor need a monitor (``monitor=True``, the default). The callback runs in
the process that reports the event, the monitor included, so like `HealthCheck.check` it must
be picklable by reference (a module-level function): it travels in the segment, next to the
health check, and every process that attaches loads it from there. A callback that raises is
logged and otherwise ignored.
"""

from __future__ import annotations

import logging
import pickle
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from . import _layout as L

if TYPE_CHECKING:
    from ._health import HealthCheck
    from ._segment import Segment

log = logging.getLogger("dispatcher")

EJECTED = "ejected"
RETURNED = "returned"
DOWN = "down"
UP = "up"
DRAINING = "draining"
REGISTERED = "registered"
UNREGISTERED = "unregistered"
REAPED = "reaped"
LEVELS = {
    EJECTED: logging.WARNING,
    RETURNED: logging.INFO,
    DOWN: logging.WARNING,
    UP: logging.INFO,
    DRAINING: logging.INFO,
    REGISTERED: logging.INFO,
    UNREGISTERED: logging.INFO,
    REAPED: logging.WARNING,
}
"""Every kind of event, with the level of its log line."""


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a backend or a worker, reported once for the server.

    `str(event)` is its log line.
    """

    kind: str
    """``ejected``, ``returned`` (from ejection), ``down``, ``up`` (active health checks),
    ``draining``, ``registered``, ``unregistered``, or ``reaped`` (a dead worker's calls in
    flight were reclaimed)."""
    backend: str
    """The backend's ``host:port``; "" for ``reaped``."""
    reason: str
    duration: float | None
    """Seconds: how long the ejection is for (``ejected``), lasted (``returned``), was up
    (``down``) or down (``up``); how long the dead worker had run (``reaped``). None where
    it does not apply or is not known (a state older than the monitor)."""
    balancer: str
    """The segment's name (`Balancer.name`)."""
    worker: int = 0
    """The dead worker's pid, for ``reaped``."""

    def __str__(self) -> str:
        subject = self.backend or f"worker {self.worker}"
        return f"{self.balancer}: {subject} {self.kind}: {self.reason}"


Listener = Callable[[Event], object]


def check_listener(on_event: object, shared: bool) -> None:
    """Refuse an ``on_event`` that is not callable or, for a shared balancer, that other
    processes could not load (a lambda, a function of ``__main__``)."""
    if on_event is None:
        return
    if not callable(on_event):
        raise TypeError("on_event must be callable as on_event(event)")
    if not shared:
        return
    if getattr(on_event, "__module__", None) == "__main__":
        raise TypeError(
            "on_event must be importable by the monitor process: define it in a module, "
            "not in __main__"
        )
    try:
        pickle.dumps(on_event)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise TypeError(
            f"on_event must be picklable (a module-level function): it runs in the monitor "
            f"process too ({exc})"
        ) from None


# The spec in the segment: the health check and the listener ------------------------------


def pack_spec(health: HealthCheck | None, on_event: Listener | None) -> bytes:
    """What the segment's header carries for the monitor and attached processes."""
    return pickle.dumps((health, on_event))


def unpack_spec(data: bytes) -> tuple[HealthCheck | None, Listener | None]:
    if not data:
        return None, None
    health, on_event = pickle.loads(data)
    return health, on_event


def store_spec(segment: Segment, health: HealthCheck | None, on_event: Listener | None) -> None:
    """Owner, at creation: put the spec in the header; remember the listener here."""
    if segment.name:
        L.write_spec(segment.state.buffer, pack_spec(health, on_event))
    _listeners[segment] = on_event


_listeners: weakref.WeakKeyDictionary[Segment, Listener | None] = weakref.WeakKeyDictionary()


def listener(segment: Segment) -> Listener | None:
    """The segment's ``on_event``: remembered by its owner, loaded once by everyone else."""
    try:
        return _listeners[segment]
    except KeyError:
        pass
    found: Listener | None = None
    if segment.name:
        try:
            found = unpack_spec(L.read_spec(segment.state.buffer))[1]
        except Exception as exc:  # an import that fails here must not fail a register
            log.error("%s: cannot load the on_event callback: %s", segment.name, exc)
    _listeners[segment] = found
    return found


# Reporting ---------------------------------------------------------------------------------


def report(event: Event, on_event: Listener | None) -> None:
    """Log `event` on the ``dispatcher`` logger and pass it to `on_event`. Never under the
    shared lock."""
    log.log(LEVELS[event.kind], "%s", event, extra={"dispatcher_event": event})
    if on_event is None:
        return
    try:
        on_event(event)
    except Exception:
        log.exception("%s: the on_event callback raised on %s", event.balancer, event.kind)


def membership(segment: Segment, kind: str, addr: str, reason: str) -> None:
    """A change of membership made by this process: registered, unregistered, draining."""
    report(Event(kind, addr, reason, None, segment.name), listener(segment))


def reap(segment: Segment, *, blocking: bool = True) -> tuple[int, int]:
    """`Segment.reclaim`, reporting each dead worker this process reaped."""
    on_event = listener(segment)

    def reaped(pid: int, start: int, calls: int) -> None:
        ran = time.time() - psutil.boot_time() - start / 100
        report(
            Event(
                REAPED,
                "",
                f"it died with {calls} call(s) in flight, now taken off (it had run {_span(ran)})",
                ran,
                segment.name,
                worker=pid,
            ),
            on_event,
        )

    return segment.reclaim(blocking=blocking, reaped=reaped)


@dataclass
class _Seen:
    """What the watcher saw of one slot at its last look."""

    generation: int
    times_ejected: int
    ejected: bool
    until: int
    down: bool
    since: int | None
    """When the slot entered its current down/up state, if known (ns)."""


class Watcher:
    """Notices, in the monitor, the changes nobody reports where they happen: a new ejection,
    the end of one, a health verdict. Each `look` reads a few columns of the shared words
    without the lock (a value at most one update old, which the next look corrects) and
    compares them with the previous look's; a slot that changed hands is a new baseline."""

    def __init__(self, segment: Segment, health: HealthCheck | None, *, first: bool) -> None:
        self._segment = segment
        self._health = health
        self._seen: dict[int, _Seen] = {}
        self._on_event = listener(segment)
        self._quiet = not first
        """A monitor that replaces a dead one takes what it first sees as known: the one
        before it may have reported it. The first monitor of a segment reports it."""

    def look(self, now: int) -> None:
        state = self._segment.state
        words, lay, c = state.words, state.layout, state.layout.capacity

        def column(field: int) -> list[int]:
            start = lay.field(field)
            return words[start : start + c].tolist()

        states, generations = column(L.STATE), column(L.GENERATION)
        times, until, down = column(L.TIMES_EJECTED), column(L.EJECTED_UNTIL_NS), column(L.DOWN)
        rotation = column(L.ROTATION_NS)
        seen: dict[int, _Seen] = {}
        for slot in range(c):
            if states[slot] == L.FREE:
                continue
            ejected = until[slot] > now
            before = self._seen.get(slot)
            if before is None or before.generation != generations[slot]:
                since = rotation[slot] or None
                if self._quiet:
                    seen[slot] = _Seen(
                        generations[slot],
                        times[slot],
                        ejected,
                        until[slot],
                        bool(down[slot]),
                        since,
                    )
                    continue
                before = _Seen(generations[slot], 0, False, 0, False, since)
            now_down = bool(down[slot])
            since = before.since
            if now_down != before.down:
                self._health_change(slot, now_down, since, now)
                since = now
            if times[slot] > before.times_ejected:
                self._ejected(slot, times[slot], until[slot], now)
                if not ejected:  # it came and went between two looks
                    self._returned(
                        slot,
                        _Seen(0, times[slot], True, until[slot], False, None),
                        until[slot],
                        now,
                    )
            elif before.ejected and not ejected:
                self._returned(slot, before, until[slot], now)
            seen[slot] = _Seen(
                generations[slot], times[slot], ejected, until[slot], now_down, since
            )
        self._seen = seen
        self._quiet = False

    def _addr(self, slot: int) -> str | None:
        state = self._segment.state
        lay = state.layout
        record = state.buffer[lay.addresses : lay.addresses + lay.capacity * L.ADDRESS_BYTES]
        try:
            return L.read_address(record, slot)
        except Exception:  # caught mid-registration: the next look has it
            return None
        finally:
            record.release()

    def _report(self, kind: str, slot: int, reason: str, duration: float | None) -> None:
        addr = self._addr(slot)
        if addr is not None:
            report(Event(kind, addr, reason, duration, self._segment.name), self._on_event)

    def _ejected(self, slot: int, times: int, until: int, now: int) -> None:
        policy = self._segment.state.policy
        lasts = policy.duration_ns(times) / 1e9
        self._report(
            EJECTED,
            slot,
            f"{policy.failure_threshold} failures in a row; out for {_span(lasts)} "
            f"(ejection {times})",
            lasts,
        )

    def _returned(self, slot: int, before: _Seen, until: int, now: int) -> None:
        started = before.until - self._segment.state.policy.duration_ns(before.times_ejected)
        out = max(now - started, 0) / 1e9
        early = until < before.until
        why = "a passing health check ended it" if early else "it ran its course"
        self._report(RETURNED, slot, f"its ejection ended after {_span(out)}: {why}", out)

    def _health_change(self, slot: int, down: bool, since: int | None, now: int) -> None:
        health = self._health
        lasted = None if since is None else max(now - since, 0) / 1e9
        was = "" if lasted is None else f" (it was {'up' if down else 'down'} {_span(lasted)})"
        if down:
            count = f"{health.fall} " if health else ""
            reason = f"{count}health checks failed in a row{was}"
        else:
            count = f"{health.rise} " if health else ""
            reason = f"{count}health checks passed in a row{was}"
        self._report(DOWN if down else UP, slot, reason, lasted)


def _span(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def spec_of(segment: Segment) -> tuple[HealthCheck | None, Any]:
    """The health check and listener stored in `segment` (the monitor's reading)."""
    return unpack_spec(L.read_spec(segment.state.buffer))
