"""`WorkerPool`: worker processes that call backends through one shared `Balancer`.

It is a `concurrent.futures.ProcessPoolExecutor` whose initializer gives each worker the
balancer (pickled, a balancer travels as its segment's name and is attached on arrival), so
every worker picks from the same counts. What the executor alone does not give:

* A worker that dies (OOM killer, SIGKILL, a segfault in an extension) breaks a
  `ProcessPoolExecutor` for good and fails every call not yet answered with a bare
  `BrokenProcessPool`. Here those calls fail with `WorkerDied` (a `BrokenProcessPool`
  and a `DispatcherError`), or are sent again if `retries_on_worker_death` allows it, and the
  pool replaces the broken executor so later calls work. The dead workers' in-flight counts
  are taken back from the balancer (`Balancer.reap`) once they are gone.
* Workers ignore SIGINT: Ctrl-C in a terminal reaches every process of the foreground group,
  and the parent decides what happens (`shutdown` finishes or cancels the calls) instead of
  each worker dying with its own traceback and breaking the pool. A worker whose parent died
  exits instead of waiting on the executor's queue forever.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing.context
import multiprocessing.process
import multiprocessing.util
import os
import signal
import threading
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, cast

from ._balancer import Balancer
from ._checks import check_int
from .errors import DispatcherError, SegmentError, WorkerDied

_Call = tuple[Any, float | None, object]

_worker_balancer: Balancer | None = None


def _start_worker(balancer: Balancer) -> None:
    """Initializer of each worker: keep the balancer for `_invoke`, close it at exit."""
    global _worker_balancer  # noqa: PLW0603
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    _worker_balancer = balancer
    # Pool workers leave through multiprocessing's exit path, which skips atexit.
    multiprocessing.util.Finalize(None, balancer.close, exitpriority=10)


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    """Exit once the parent is gone: the executor's queue would keep an orphan waiting."""
    parent.join()
    os._exit(1)


def _invoke(request: Any, timeout: float | None, key: object) -> Any:
    if _worker_balancer is None:
        raise DispatcherError("this process is not a WorkerPool worker")
    return _worker_balancer.invoke(request, timeout=timeout, key=key)


class _PoolFuture(Future[Any]):
    """The caller's future; the executor's future behind it changes when a call is sent again.

    `running()` stays False: the parent cannot see when a worker starts a call.
    """

    _inner: Future[Any] | None = None

    def cancel(self) -> bool:
        inner = self._inner
        if inner is None or not (inner.cancel() or inner.cancelled()):
            return False
        return super().cancel()


class _Context:
    """The pool's `multiprocessing` context, remembering the processes it starts: an executor
    has no public way to list its workers."""

    def __init__(self, context: multiprocessing.context.BaseContext) -> None:
        self._context: Any = context
        self.processes: weakref.WeakSet[multiprocessing.process.BaseProcess] = weakref.WeakSet()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def Process(self, *args: Any, **kwargs: Any) -> multiprocessing.process.BaseProcess:
        process: multiprocessing.process.BaseProcess = self._context.Process(*args, **kwargs)
        self.processes.add(process)
        return process


class WorkerPool:
    """`processes` worker processes that run ``balancer.invoke`` for the calls submitted here.

    `mp_context` is a `multiprocessing` context (fork, spawn or forkserver; default: the
    platform's). The pool does not own the balancer: close it after the pool shuts down.
    """

    def __init__(
        self,
        balancer: Balancer,
        processes: int | None = None,
        *,
        mp_context: multiprocessing.context.BaseContext | None = None,
        retries_on_worker_death: int = 0,
    ) -> None:
        if not isinstance(balancer, Balancer):
            raise TypeError(f"balancer must be a Balancer, not {type(balancer).__name__}")
        if not balancer.name:
            raise ValueError("a Balancer made with shared=False cannot be shared by a WorkerPool")
        self._processes = check_int(
            "processes", os.cpu_count() or 1 if processes is None else processes, 1
        )
        self._retries = check_int("retries_on_worker_death", retries_on_worker_death, 0)
        self._balancer = balancer
        self._context = _Context(mp_context or multiprocessing.get_context())
        self._lock = threading.Lock()
        self._closed = False
        self._retired: weakref.WeakSet[ProcessPoolExecutor] = weakref.WeakSet()
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self._processes,
            mp_context=cast(multiprocessing.context.BaseContext, self._context),
            initializer=_start_worker,
            initargs=(self._balancer,),
        )

    @property
    def balancer(self) -> Balancer:
        return self._balancer

    @property
    def processes(self) -> int:
        return self._processes

    def submit(
        self, request: Any, *, timeout: float | None = None, key: object = None
    ) -> Future[Any]:
        """Have a worker call ``balancer.invoke(request, timeout=timeout, key=key)``.

        The future holds the backend's answer or exception; `WorkerDied` if the worker died.
        It can be cancelled until a worker takes the call; its `running()` stays False, as
        the parent does not learn when a worker starts.
        """
        future = _PoolFuture()
        self._send(future, (request, timeout, key), self._retries)
        return future

    def map(self, requests: Iterable[Any], *, timeout: float | None = None) -> Iterator[Any]:
        """Submit every request now; yield the answers in order (the first exception raises).

        `timeout` is each call's, as in `submit`; wait on the iterator as long as you like.

        Calls not yet started are cancelled if the iterator is closed early.
        """
        futures = [self.submit(request, timeout=timeout) for request in requests]

        def answers() -> Iterator[Any]:
            try:
                for future in futures:
                    yield future.result()
            finally:
                for future in futures:
                    future.cancel()

        return answers()

    def pids(self) -> list[int]:
        """Process ids of the workers running now (the executor starts them as work arrives)."""
        return sorted(
            pid
            for process in list(self._context.processes)
            if process.is_alive() and (pid := process.pid) is not None
        )

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more calls; with `cancel_futures`, cancel those no worker started yet.

        With `wait`, return once every started call has finished and the workers exited.
        """
        with self._lock:
            self._closed = True
            executor = self._executor
        executor.shutdown(wait=wait, cancel_futures=cancel_futures)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        state = "shut down" if self._closed else f"{self._processes} processes"
        return f"<WorkerPool {state} balancer={self._balancer.name}>"

    # Worker deaths -----------------------------------------------------------------------

    def _send(self, future: _PoolFuture, call: _Call, retries: int) -> None:
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("cannot submit to a WorkerPool after shutdown")
                executor = self._executor
                try:
                    inner = executor.submit(_invoke, *call)
                    break
                except BrokenProcessPool:
                    pass
            self._replace(executor)
        future._inner = inner
        inner.add_done_callback(functools.partial(self._settle, future, call, retries, executor))

    def _settle(
        self,
        future: _PoolFuture,
        call: _Call,
        retries: int,
        executor: ProcessPoolExecutor,
        inner: Future[Any],
    ) -> None:
        """Pass the executor's outcome on to the caller's future, unless a worker died."""
        if inner.cancelled():
            Future.cancel(future)
            return
        error = inner.exception()
        if not isinstance(error, BrokenProcessPool):
            if error is None:
                future.set_result(inner.result())
            else:
                future.set_exception(error)
            return
        self._replace(executor)
        if retries > 0:
            try:
                self._send(future, call, retries - 1)
            except RuntimeError:
                pass
            else:
                return
        died = WorkerDied(
            "a worker process of the pool died before this call's answer came back"
            + (f" (sent {self._retries + 1} times)" if self._retries else "")
        )
        died.__cause__ = error
        future.set_exception(died)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """Swap a broken executor for a new one, once, and retire the old one's workers."""
        with self._lock:
            if broken in self._retired:
                return
            self._retired.add(broken)
            if self._executor is broken and not self._closed:
                self._executor = self._new_executor()
        # Runs in the broken executor's own thread: it cannot wait for itself here.
        threading.Thread(target=self._retire, args=(broken,), daemon=True).start()

    def _retire(self, broken: ProcessPoolExecutor) -> None:
        broken.shutdown(wait=True)
        with contextlib.suppress(SegmentError):
            self._balancer.reap()
