"""Every error `dispatcher` raises, under one base.

Errors cross process boundaries (a worker pool sends them back through futures), so each one
that carries extra fields defines ``__reduce__`` and survives pickling.
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool
from typing import Any


class DispatcherError(Exception):
    """Base of every error raised by `dispatcher`."""


class NoBackendAvailable(DispatcherError):
    """Raised when a pick finds no eligible backend: none registered, or all ejected."""


class DuplicateBackend(DispatcherError, ValueError):
    """Raised when registering an address that is already registered."""

    def __init__(self, addr: str) -> None:
        super().__init__(f"backend {addr!r} is already registered")
        self.addr = addr

    def __reduce__(self) -> tuple[type[DuplicateBackend], tuple[str]]:
        return (type(self), (self.addr,))


class UnknownBackend(DispatcherError, LookupError):
    """Raised when unregistering an address that is not registered."""

    def __init__(self, addr: str) -> None:
        super().__init__(f"backend {addr!r} is not registered")
        self.addr = addr

    def __reduce__(self) -> tuple[type[UnknownBackend], tuple[str]]:
        return (type(self), (self.addr,))


class CapacityExceeded(DispatcherError):
    """Raised when the shared segment has no free slot (backends) or row (worker processes)."""


class InvalidAddress(DispatcherError, ValueError):
    """Raised when an address is not ``host:port`` with a valid host and a port in 1-65535."""


class SegmentError(DispatcherError):
    """Raised when a shared segment is missing, closed by its owner, or not a `dispatcher` one."""


class InvalidRequest(DispatcherError, ValueError):
    """Raised when a request cannot be sent as it is (a path without its leading ``/``, a
    header value with a line break...): the caller's mistake, found before any backend is
    chosen, so no count changes."""


class OptionMismatch(DispatcherError, ValueError):
    """Raised when `Balancer.shared` finds the balancer of that name, in this server, made
    with another value of one of its options: every process must ask for the same one."""

    def __init__(self, balancer: str, option: str, given: str, existing: str) -> None:
        super().__init__(
            f"the shared balancer {balancer!r} was made with {option}={existing}, this call "
            f"asks for {option}={given}: every process of the server must pass the same "
            f"options (or use another name, or scope=)"
        )
        self.balancer = balancer
        self.option = option
        self.given = given
        self.existing = existing

    def __reduce__(self) -> tuple[type[OptionMismatch], tuple[str, str, str, str]]:
        return (type(self), (self.balancer, self.option, self.given, self.existing))


class BackendError(DispatcherError):
    """Raised when a call to a backend fails: no connection, a timeout, or an answer whose
    status is one of the backend's failure statuses (5xx by default).

    `response` is the answer when there was one (an `HttpResponse`: status, headers, body), so
    a caller can log or relay it; `status` is its status. The subclasses say how far the call
    got: `ConnectError` never reached the server; `ReadTimeout` and `ProtocolError` may have.
    """

    def __init__(
        self, addr: str, message: str, status: int | None = None, response: Any = None
    ) -> None:
        super().__init__(f"{addr}: {message}")
        self.addr = addr
        self.message = message
        self.status = status
        self.response = response

    def __reduce__(self) -> tuple[type[BackendError], tuple[str, str, int | None, Any]]:
        return (type(self), (self.addr, self.message, self.status, self.response))


class ConnectError(BackendError):
    """Raised when no connection could be made, or a request could not be written on a new
    one: the server did not get it, so sending it again, there or elsewhere, is safe."""


class ConnectTimeout(ConnectError, TimeoutError):
    """Raised when connecting (TCP, or the TLS handshake) took longer than the timeout."""


class TLSError(ConnectError):
    """Raised when the TLS handshake failed: a certificate that does not verify, a name that
    does not match it, no protocol or cipher in common (the ``ssl`` error is its cause)."""


class ReadTimeout(BackendError, TimeoutError):
    """Raised when the timeout passed while the request was written or its answer awaited:
    the server may have got it and acted on it."""


class ProtocolError(BackendError):
    """Raised when the connection broke, or the answer was not HTTP/1.x, after the request was
    written: the server may have got it and acted on it."""


class WorkerDied(DispatcherError, BrokenProcessPool):
    """Raised (through its future) when a worker process died before a call's answer came back.

    The executor cannot tell which call the dead worker held, so every call not yet answered
    at that moment fails this way, queued ones included. Such a call may or may not have
    reached a backend; it was sent as many times as `retries_on_worker_death` allowed.
    """


class LockBusy(DispatcherError):
    """Raised when the shared lock stays taken for an operation asked not to wait for it
    (``reap(blocking=False)``, from a signal handler that may have interrupted its holder)."""


class EtcdError(DispatcherError):
    """Raised inside `EtcdResolver` when etcd answers with an error (it is yielded, not raised)."""
