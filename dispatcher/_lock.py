"""The one lock that guards a segment, and how a waiter gets it back from a holder that died.

The lock is a POSIX named semaphore: `multiprocessing.Lock` from the spawn context is one, so
it reaches fork, spawn and forkserver children alike, and an unrelated process (a uvicorn
worker, ``dispatcher top``) opens it by the name the segment header records. An uncontended
acquire and release cost about 80 ns here, against about 950 ns for a kernel-released
``fcntl.flock``. The price is that nothing releases a semaphore whose holder died, so the
holder is recorded and a waiter recovers:

* After every acquire the holder writes its pid into the header's holder word, and clears it
  just before releasing. The two hot holds of a call (`_state.SharedState.commit` and
  ``finish``) write those two words themselves instead of calling `acquire`/`release`.
* A waiter spins for a few tries (a hold lasts well under a microsecond), then waits in bounded
  steps. Between steps it looks at the holder: a live one is waited for, however long; a dead
  one is taken over. A lock held for `ANONYMOUS_HOLDER_NS` with no holder recorded belongs to
  a process that died between acquiring and writing its pid.
* Taking over passes ownership instead of releasing on the dead holder's behalf (which would
  race with the other waiters): the waiter writes its own pid as the holder, under a file lock
  on the segment that the kernel releases if the waiter dies too (so one waiter takes over),
  and calls `repair` to recompute what a half-done update could have left.

Opening a semaphore by name needs two private parts of `multiprocessing`: ``SemLock.name``
and ``Lock.__setstate__``. They are this module's only reach into another module's private
names, checked against the Python versions this was tested on (`SEMLOCK_TESTED`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import sys
from collections.abc import Callable, Iterator
from time import monotonic_ns
from typing import Protocol

from .errors import LockBusy, SegmentError

SPINS = 50
"""Non-blocking tries before a waiter sleeps on the semaphore."""
PATIENCE_S = 0.25
"""Bounded wait between checks of whether the holder of the lock is still alive."""
ANONYMOUS_HOLDER_NS = 2_000_000_000
"""A lock held this long with no holder recorded belongs to a process that died between
taking it and writing its pid."""
SEMLOCK_TESTED = ((3, 11), (3, 14))
"""Python versions whose `multiprocessing.synchronize.Lock` internals this module was tested on."""

_SEMAPHORE = 1
"""`_multiprocessing.SemLock` kind of a non-recursive lock."""

log = logging.getLogger("dispatcher")


class Semaphore(Protocol):
    """What the lock needs of its semaphore (a `threading.Lock` for an unshared balancer)."""

    def acquire(self, block: bool = ..., timeout: float = ..., /) -> bool: ...
    def release(self) -> None: ...


def new_semaphore() -> tuple[multiprocessing.synchronize.Lock, str]:
    """A fresh named semaphore and its name. It is unlinked when its creator exits or drops it."""
    lock = multiprocessing.get_context("spawn").Lock()
    try:
        name = lock._semlock.name  # type: ignore[attr-defined]
    except AttributeError:
        raise SegmentError(_unsupported("SemLock.name")) from None
    return lock, str(name)


def open_semaphore(name: str) -> multiprocessing.synchronize.Lock:
    """Open the named semaphore another process created."""
    lock = multiprocessing.synchronize.Lock.__new__(multiprocessing.synchronize.Lock)
    try:
        lock.__setstate__((0, _SEMAPHORE, 1, name))  # type: ignore[attr-defined]
    except OSError as exc:
        raise SegmentError(f"cannot open the balancer's lock {name!r}: {exc}") from None
    except (AttributeError, TypeError, ValueError):
        raise SegmentError(_unsupported("Lock.__setstate__")) from None
    return lock


def _unsupported(part: str) -> str:
    version = ".".join(map(str, sys.version_info[:3]))
    low, high = (".".join(map(str, v)) for v in SEMLOCK_TESTED)
    return (
        f"Python {version}: dispatcher opens its lock by name through multiprocessing's "
        f"{part}, which this version changed (tested on {low} to {high})"
    )


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive lock on `path`, through a descriptor of this process's own: forked
    processes share the locks of the descriptors they inherited."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class SharedLock:
    """A segment's semaphore with its holder record, and recovery from a holder that died.

    `holder` is the header word that records the holder's pid (a one-word view). `alive(pid)`
    tells whether a recorded holder still runs; `repair()` (called with the lock held) recomputes
    what a dead holder's half-done update may have left. `recovery_path` is the segment's file,
    on which one waiter at a time takes a dead holder's lock over; None (an unshared balancer)
    never takes over.
    """

    def __init__(
        self,
        semaphore: Semaphore,
        holder: memoryview,
        *,
        alive: Callable[[int], bool],
        repair: Callable[[], None],
        recovery_path: str | None = None,
    ) -> None:
        self.semaphore = semaphore
        self.try_acquire = semaphore.acquire
        """``try_acquire(False)``: take the semaphore if it is free, without writing the holder."""
        self.release_semaphore = semaphore.release
        self._holder = holder
        self._alive = alive
        self._repair = repair
        self._recovery_path = recovery_path
        self.pid = os.getpid()

    def after_fork(self, semaphore: Semaphore | None = None) -> None:
        """In a new process: note its pid, and use `semaphore` if the old one stays behind."""
        self.pid = os.getpid()
        if semaphore is not None:
            self.semaphore = semaphore
            self.try_acquire, self.release_semaphore = semaphore.acquire, semaphore.release

    def acquire(self, blocking: bool = True) -> None:
        """Take the lock and record this process as its holder.

        Not `blocking`: raise `LockBusy` if the lock stays taken for a few tries.
        """
        if not self.try_acquire(False):
            self.wait(blocking)
        self._holder[0] = self.pid

    def release(self) -> None:
        self._holder[0] = 0
        self.release_semaphore()

    @contextlib.contextmanager
    def held(self, blocking: bool = True) -> Iterator[None]:
        self.acquire(blocking)
        try:
            yield
        finally:
            self.release()

    def wait(self, blocking: bool = True) -> None:
        """The first try failed: return once the semaphore is ours (the holder is not written).

        Not `blocking`: spin briefly, then raise `LockBusy`.
        """
        if self._spin():
            return
        if not blocking:
            raise LockBusy
        acquire = self.try_acquire
        unknown_since = None
        while not acquire(True, PATIENCE_S):
            holder = int(self._holder[0])
            if holder == 0:
                unknown_since = unknown_since or monotonic_ns()
                if monotonic_ns() - unknown_since < ANONYMOUS_HOLDER_NS:
                    continue
            elif holder == self.pid or self._alive(holder):
                unknown_since = None
                continue
            if self._take_over(holder):
                return

    def _spin(self) -> bool:
        """Try to take the semaphore a few times without sleeping; whether it was taken."""
        acquire = self.try_acquire
        return any(acquire(False) for _ in range(SPINS))

    def _take_over(self, dead: int) -> bool:
        """Become the holder of a lock whose holder died, then repair what it may have left."""
        path = self._recovery_path
        if path is None or not os.path.exists(path):
            return False
        with _file_lock(path):
            if self.try_acquire(False):
                return True
            if int(self._holder[0]) != dead:
                return False
            self._holder[0] = self.pid
            log.warning(
                "process %s died holding the shared lock; taking it over", dead or "(unknown)"
            )
            self._repair()
            return True
