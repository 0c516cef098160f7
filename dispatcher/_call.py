"""One call through a balancer: the ticket from its begin to its end, retries, event loops.

`Balancer._begin` chooses a backend and counts the call on it under the shared lock; what it
returns, a `Call`, is ended exactly once with the outcome, whatever happens in between. Every
way of calling goes through that one seam: `invoke` and `ainvoke`, with or without retries::

    call = balancer._begin(key, exclude)       # counted on a backend, under the lock
    response = run(call, request, timeout)     # the backend answers, no lock held; then
                                               # end(call, outcome) records it, under the lock

An event loop must never wait for the shared lock. `off_loop` runs each step that takes it
inline with ``blocking=False``; when the lock stays taken for a few tries (a busy neighbour, a
holder that was descheduled or died in it), the step moves to a small thread pool of this
process, so the loop keeps serving its other tasks. A step whose caller is cancelled while it
waits there still completes, and what it did is undone (a counted call is ended as cancelled).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable
from time import monotonic
from typing import Any, Final, TypeVar

from ._state import CANCELLED, FAILURE, SUCCESS, SharedState
from .errors import LockBusy

T = TypeVar("T")

THREADS = 2
"""Threads per process that wait on a contended lock for the event loops of that process."""


Call = tuple[SharedState, int, int, Any, int, int]
"""A call counted on one backend: (state, slot, generation, proxy, worker row, start time).

What recording its end needs, and the backend to call. A plain tuple, because one is made for
every call: building it costs about a sixth of what an object with named fields does.
"""
SLOT: Final = 1
PROXY: Final = 3


def end(call: Call, outcome: int, blocking: bool = True) -> None:
    """Record the outcome of `call`: SUCCESS, FAILURE (counts against the backend) or CANCELLED.

    Not `blocking`: raise `LockBusy`, having recorded nothing, if the lock stays taken.
    """
    state, slot, generation, _, row, start = call
    state.finish(slot, generation, row, outcome, start, blocking)


def run(call: Call, request: Any, timeout: float | None) -> Any:
    """Call the backend and record how it went; its answer, or its exception, unchanged."""
    state, slot, generation, proxy, row, start = call
    try:
        response = proxy.invoke(request, timeout=timeout)
    except Exception:
        state.finish(slot, generation, row, FAILURE, start)
        raise
    except BaseException:
        state.finish(slot, generation, row, CANCELLED, start)
        raise
    state.finish(slot, generation, row, SUCCESS, start)
    return response


async def arun(call: Call, request: Any, timeout: float | None) -> Any:
    """`run` for an event loop: awaits the backend's ``ainvoke``."""
    proxy = call[PROXY]
    ainvoke = getattr(proxy, "ainvoke", None)
    if ainvoke is None:
        await off_loop(end, call, CANCELLED)
        raise TypeError(
            f"{proxy!r} has no ainvoke: make the balancer with an async backend_factory "
            f"(for HTTP, backend_factory=AsyncHttpBackend from dispatcher.aio)"
        )
    try:
        response = await ainvoke(request, timeout=timeout)
    except Exception:
        await off_loop(end, call, FAILURE)
        raise
    except BaseException:
        await off_loop(end, call, CANCELLED)
        raise
    await off_loop(end, call, SUCCESS)
    return response


def end_cancelled(call: Call) -> None:
    """Undo a `Call` nobody will make: its caller was cancelled while it was being counted."""
    end(call, CANCELLED)


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
