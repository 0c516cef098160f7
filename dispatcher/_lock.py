"""The one lock that guards a segment: how it is taken, held through interrupts, and recovered.

The lock is a POSIX named semaphore, so it reaches fork, spawn and forkserver children alike,
and an unrelated process (a uvicorn worker, ``dispatcher top``) opens it by the name the
segment header records. An uncontended acquire and release cost about 60 ns here, against
about 950 ns for a kernel-released ``fcntl.flock``. Nothing releases a semaphore whose holder
died, so the holder is recorded and a waiter recovers.

**Holding it through interrupts.** A signal handler that raises (``KeyboardInterrupt``) runs
between two bytecodes of the main thread, wherever the interpreter checks for pending work: on
entering a function, on a backward jump, and *after every call*, so ``acquire()`` followed by
``try:`` can return with the lock taken and raise before anything notes it. Every hold here
takes the semaphore through a subscript instead (``TAKE[False]``, whose ``__getitem__`` is the
semaphore's own C ``acquire``): subscripts are not checkpoints, so the result lands in a local
before any handler can run, and an ``except`` clause that releases exactly when it was taken
covers the rest. `run` is that pattern for any update; the two hot holds write it out.

**Recording the holder.** After every acquire the holder writes its pid into the header's
holder word, and clears it just before releasing.

**Recovering from a holder that died.** A waiter spins for a few tries (a hold lasts well under
a microsecond), then waits in bounded steps. Between steps it looks at the holder word:

* a live holder is waited for, however long (a stopped one too: SIGSTOP, a debugger);
* a dead one is recovered: under a file lock on the segment (on a descriptor opened when the
  segment was, so it works once the file is unlinked), the waiter calls `repair` while the
  semaphore is still held by the dead process, so nobody can be inside the lock meanwhile,
  then clears the holder word and releases the semaphore on the dead holder's behalf. Every
  waiter then competes for it as usual. Recovery interrupted half-way leaves the dead holder
  recorded, and the next waiter starts it again; repair is idempotent;
* no holder recorded for `ANONYMOUS_HOLDER_NS` means a process took the semaphore and has not
  written its pid. It is recovered only if no process that maps the segment is stopped or in
  uninterruptible sleep: a running process writes its pid within nanoseconds, so only one of
  those can still be about to.

Creating, opening and unlinking a semaphore by name needs `_multiprocessing.SemLock`, a private
part of CPython; this module is the one place that reaches it, checked against the Python
versions this was tested on (`SEMLOCK_TESTED`).
"""

from __future__ import annotations

import _multiprocessing  # type: ignore[import-not-found]
import fcntl
import functools
import logging
import os
import secrets
import sys
from collections.abc import Callable
from multiprocessing import resource_tracker
from time import monotonic, monotonic_ns
from typing import Any, Protocol, TypeVar

from .errors import LockBusy, SegmentError

T = TypeVar("T")

SPINS = 50
"""Non-blocking tries before a waiter sleeps on the semaphore."""
PATIENCE_S = 0.25
"""Bounded wait between checks of whether the holder of the lock is still alive."""
ANONYMOUS_HOLDER_NS = 2_000_000_000
"""A lock held this long with no holder recorded may belong to a process that died between
taking it and writing its pid."""
SEMLOCK_TESTED = ((3, 11), (3, 14))
"""Python versions whose `_multiprocessing.SemLock` this module was tested on."""
SEMAPHORE_PREFIX = "/dispatcher_"
"""Linux shows a semaphore ``/NAME`` as ``/dev/shm/sem.NAME``."""

_SEMAPHORE = 1
"""`_multiprocessing.SemLock` kind of a non-recursive lock."""

log = logging.getLogger("dispatcher")


class Semaphore(Protocol):
    """What the lock needs of its semaphore (a `threading.Lock` for an unshared balancer)."""

    def acquire(self, block: bool = ..., timeout: float = ..., /) -> bool: ...
    def release(self) -> None: ...


# Named semaphores --------------------------------------------------------------------------


def new_semaphore(*, tracked: bool = True) -> tuple[Semaphore, str]:
    """A fresh owner-only named semaphore and its name; `tracked`: registered with the
    resource tracker, so that it is unlinked if its creator dies without `unlink_semaphore`."""
    name = SEMAPHORE_PREFIX + secrets.token_hex(8)
    try:
        semaphore: Semaphore = _multiprocessing.SemLock(_SEMAPHORE, 1, 1, name, False)
    except (TypeError, AttributeError):
        raise SegmentError(_unsupported("SemLock(kind, value, maxvalue, name, unlink)")) from None
    except OSError as exc:
        raise SegmentError(f"cannot create the balancer's lock: {exc}") from None
    if tracked:
        resource_tracker.register(name, "semaphore")
    return semaphore, name


def open_semaphore(name: str) -> Semaphore:
    """Open the named semaphore another process created."""
    if not name.startswith(SEMAPHORE_PREFIX) or "\0" in name or "/" in name[1:]:
        raise SegmentError(f"{name!r} is not the name of a dispatcher lock")
    try:
        semaphore: Semaphore = _multiprocessing.SemLock._rebuild(0, _SEMAPHORE, 1, name)
    except (TypeError, AttributeError):
        raise SegmentError(_unsupported("SemLock._rebuild(handle, kind, maxvalue, name)")) from None
    except OSError as exc:
        raise SegmentError(f"cannot open the balancer's lock {name!r}: {exc}") from None
    return semaphore


def unlink_semaphore(name: str, *, tracked: bool = True) -> None:
    """Remove a semaphore's name: processes that opened it keep using it; nobody new can.

    `tracked`: it was registered by `new_semaphore` in this process's tracker."""
    try:
        _multiprocessing.sem_unlink(name)
    except FileNotFoundError:
        pass
    except AttributeError:
        raise SegmentError(_unsupported("sem_unlink(name)")) from None
    if tracked:
        resource_tracker.unregister(name, "semaphore")


def _unsupported(part: str) -> str:
    version = ".".join(map(str, sys.version_info[:3]))
    low, high = (".".join(map(str, v)) for v in SEMLOCK_TESTED)
    return (
        f"Python {version}: dispatcher opens its lock by name through _multiprocessing's "
        f"{part}, which this version changed (tested on {low} to {high})"
    )


def taker(acquire: Callable[[Any], bool]) -> Any:
    """An object whose subscript calls `acquire`: ``taker(s.acquire)[False]`` is
    ``s.acquire(False)``, as one bytecode.

    A subscript is not a point where the interpreter runs signal handlers, so
    ``got = take[False]`` cannot be interrupted between the acquire and the assignment. (A C
    function as a class attribute is not bound to the instance, so it gets the key alone.)
    """
    return type("Take", (), {"__slots__": (), "__getitem__": acquire})()


# The lock --------------------------------------------------------------------------------


class SharedLock:
    """A segment's semaphore, its holder record, and recovery from a holder that died.

    `holder` is the header word that records the holder's pid (a one-word view). `alive(pid)`
    tells whether a recorded holder still runs; `repair()` recomputes what a dead holder's
    half-done update may have left; `any_stopped()` tells whether a process that maps the
    segment is stopped (see the module docstring). `recovery_fd` is a descriptor of the
    segment's file, on which recoveries take turns; None (an unshared balancer) never recovers.
    """

    def __init__(
        self,
        semaphore: Semaphore,
        holder: memoryview,
        *,
        alive: Callable[[int], bool],
        repair: Callable[[], None],
        any_stopped: Callable[[], bool] = lambda: False,
        recovery_fd: int | None = None,
        behalf: Semaphore | None = None,
    ) -> None:
        self._holder = holder
        self._alive = alive
        self._repair = repair
        self._any_stopped = any_stopped
        self._recovery_fd = recovery_fd
        self._behalf = behalf
        """A second handle on the semaphore, used only to release it for a dead holder."""
        self.pid = 0
        self.use(semaphore)

    def use(self, semaphore: Semaphore) -> None:
        """Take the lock through `semaphore`, as this process (again after a fork)."""
        self.pid = os.getpid()
        self.semaphore = semaphore
        self.take = taker(semaphore.acquire)
        """``take[False]``: take the semaphore if it is free, without writing the holder."""
        self.timed = taker(functools.partial(semaphore.acquire, True))
        """``timed[seconds]``: wait at most that long for the semaphore."""
        self.release_semaphore = semaphore.release

    def run(
        self, update: Callable[[], T], blocking: bool = True, timeout: float | None = None
    ) -> T:
        """``update()`` with the lock held, released whatever happens.

        Not `blocking`: raise `LockBusy` if the lock stays taken for a few tries; with a
        `timeout`, raise it once that many seconds went by.
        """
        holder = self._holder
        got = False
        box: list[bool] | None = None
        try:
            got = self.take[False]
            if not got:
                box = [False]
                self.wait(box, blocking, timeout)
                got = True
            holder[0] = self.pid
            result = update()
        except BaseException:
            # Inline, not a call: entering a function would let a second signal in first.
            if got or (box is not None and box[0]):
                try:  # noqa: SIM105
                    holder[0] = 0
                except ValueError:  # the segment was closed meanwhile
                    pass
                self.release_semaphore()
            raise
        try:  # noqa: SIM105
            holder[0] = 0
        except ValueError:  # `update` closed the segment
            pass
        self.release_semaphore()
        return result

    def wait(self, box: list[bool], blocking: bool = True, timeout: float | None = None) -> None:
        """The first try failed: return once the semaphore is ours (``box[0]`` says whether it
        is, at every moment, so a caller interrupted here knows whether to release it).

        Not `blocking`: spin briefly, then raise `LockBusy`.
        """
        take = self.take
        for _ in range(SPINS):
            box[0] = take[False]
            if box[0]:
                return
        if not blocking:
            raise LockBusy("the shared lock is taken")
        timed = self.timed
        deadline = None if timeout is None else monotonic() + timeout
        anonymous_since = 0
        while True:
            box[0] = timed[PATIENCE_S]
            if box[0]:
                return
            if deadline is not None and monotonic() >= deadline:
                raise LockBusy(f"the shared lock stayed taken for {timeout} s")
            holder = int(self._holder[0])
            if holder > 0:
                anonymous_since = 0
                if holder == self.pid or self._alive(holder):
                    continue
            elif not anonymous_since:
                anonymous_since = monotonic_ns()
                continue
            elif monotonic_ns() - anonymous_since < ANONYMOUS_HOLDER_NS:
                continue
            elif self._any_stopped():
                # The holder may be the stopped one: its time runs again once it is continued.
                anonymous_since = monotonic_ns()
                continue
            self._recover(box, holder)
            if box[0]:
                return

    def _recover(self, box: list[bool], dead: int) -> None:
        """Repair and release for `dead` (0: a holder that never wrote its pid), unless the
        lock changed hands meanwhile."""
        fd, behalf = self._recovery_fd, self._behalf
        if fd is None or behalf is None:
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            box[0] = self.take[False]
            if box[0] or int(self._holder[0]) != dead:
                return
            log.warning(
                "process %s died holding the shared lock; repairing and releasing it",
                dead or "(unknown)",
            )
            self._repair()
            self._holder[0] = 0
            behalf.release()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
