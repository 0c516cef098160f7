"""What a call needs beyond one attempt: retry bookkeeping, and steps off the event loop.

A call's own protocol (choose and count, call the backend, record the end) is
`Balancer._attempt` and `_aattempt`, on `SharedState.commit` and `finish`. Around it:

* `Attempts` keeps one call's retries: a deadline over all attempts, the backends tried, the
  failure to raise when no retry is left.
* `off_loop` is how an event loop takes the shared lock without ever waiting for it: each step
  runs inline with ``blocking=False``, and when the lock stays taken for a few tries (a busy
  neighbour, a holder that was descheduled or died in it) the step moves to a small thread
  pool of this process, so the loop keeps serving its other tasks. A step whose caller is
  cancelled while it waits there still completes, and what it did is undone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable
from time import monotonic
from typing import Any, TypeVar

from .errors import LockBusy

T = TypeVar("T")

THREADS = 2
"""Threads per process that wait on a contended lock for the event loops of that process."""


class Attempts:
    """One call's retries: a deadline over all attempts, the backends tried, the last failure.

    The retry budget shared by all processes is the balancer's to check before each retry.
    """

    __slots__ = ("deadline", "failure", "left", "tried")

    def __init__(self, timeout: float | None, retries: int) -> None:
        self.deadline = None if timeout is None else monotonic() + timeout
        self.left = retries
        self.tried: set[int] = set()
        self.failure: Exception | None = None

    def remaining(self) -> float | None:
        """Seconds left for the next attempt (None: no deadline); raises the last failure if a
        retry would have none."""
        if self.deadline is None:
            return None
        left = self.deadline - monotonic()
        if self.failure is not None and left <= 0:
            raise self.failure
        return left

    def may_retry(self, exc: Exception) -> bool:
        """Whether to try again after `exc`; it becomes the failure a later refusal raises."""
        if self.left == 0 or exc is self.failure:
            return False
        self.left -= 1
        self.failure = exc
        return True


# Off the event loop --------------------------------------------------------------------------


async def off_loop(
    step: Callable[..., T], *args: Any, undo: Callable[[T], object] | None = None
) -> T:
    """``step(*args, blocking=False)`` inline; if the lock is busy, ``step(*args)`` on a thread.

    The thread's work is shielded: a cancelled caller does not stop it, and `undo` is then
    called (on a thread) with its result, so nothing it counted is left behind. The undo hangs
    on the thread's own future, not on the loop's: the loop may be closed by the time the
    work ends (``asyncio.run`` returning just after the cancellation).
    """
    try:
        return step(*args, blocking=False)
    except LockBusy:
        pass
    work = _POOL.get().submit(step, *args)
    try:
        return await asyncio.shield(asyncio.wrap_future(work))
    except asyncio.CancelledError:
        if undo is not None:
            work.add_done_callback(functools.partial(_undo_when_done, undo))
        raise


def _undo_when_done(undo: Callable[[T], object], work: concurrent.futures.Future[T]) -> None:
    if not work.cancelled() and work.exception() is None:
        _POOL.get().submit(undo, work.result())


class _Pool:
    """This process's own small pool: threads never cross a fork, and work waiting for the
    shared lock never queues behind an application's jobs on the loop's default executor."""

    def __init__(self) -> None:
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.lock = threading.Lock()

    def get(self) -> concurrent.futures.ThreadPoolExecutor:
        executor = self.executor
        if executor is not None:
            return executor
        with self.lock:
            if self.executor is None:
                self.executor = concurrent.futures.ThreadPoolExecutor(THREADS, "dispatcher-lock")
            return self.executor

    def forget(self) -> None:
        """In a forked child: the parent's threads are not here; drop, never shut down."""
        self.executor = None
        self.lock = threading.Lock()


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL.forget)
