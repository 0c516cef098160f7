"""What a balancer calls: the `Backend` protocol and a real HTTP/1.1 backend on urllib3.

A `Backend` is the Python form of ``Invoke(ctx, req) (Response, error)``: it returns a response
or raises, and a raise is what counts as a failure. Each process makes its own backends (the
balancer calls ``backend_factory(addr)`` lazily, per process), because connection pools must
never cross a fork.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import urllib3

from ._address import parse_address
from .errors import BackendError


@runtime_checkable
class Backend(Protocol):
    """Anything that answers a request: one instance of a downstream service, or a balancer."""

    def invoke(self, request: Any, *, timeout: float | None = None) -> Any: ...


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: Mapping[str, str] | None = None
    body: bytes = b""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


class HttpBackend:
    """One HTTP/1.1 server, called through a keep-alive connection pool.

    Connection errors, timeouts and 5xx answers raise `BackendError`; a 4xx is an answer about
    the request, not a failure of the backend, and is returned. The pool is rebuilt in a
    forked child instead of being shared with its parent.
    """

    def __init__(self, addr: str, *, pool_size: int = 16, timeout: float | None = 10.0) -> None:
        self.addr = parse_address(addr)
        self._host, _, port = self.addr.rpartition(":")
        self._port = int(port)
        self._pool_size = pool_size
        self._timeout = timeout
        self._pid = -1
        self._pool: urllib3.HTTPConnectionPool | None = None

    def _connections(self) -> urllib3.HTTPConnectionPool:
        if self._pool is None or self._pid != os.getpid():
            self._pool = urllib3.HTTPConnectionPool(
                self._host.strip("[]"),
                self._port,
                maxsize=self._pool_size,
                block=False,
                retries=False,
                timeout=self._timeout,
            )
            self._pid = os.getpid()
        return self._pool

    def invoke(self, request: HttpRequest, *, timeout: float | None = None) -> HttpResponse:
        if not isinstance(request, HttpRequest):
            raise TypeError(f"HttpBackend needs an HttpRequest, not {type(request).__name__}")
        try:
            answer = self._connections().urlopen(
                request.method,
                request.path,
                body=request.body or None,
                headers=dict(request.headers or {}),
                retries=False,
                redirect=False,
                timeout=self._timeout if timeout is None else timeout,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise BackendError(self.addr, f"{type(exc).__name__}: {exc}") from exc
        if answer.status >= 500:
            raise BackendError(self.addr, f"HTTP {answer.status}", status=answer.status)
        return HttpResponse(answer.status, dict(answer.headers), answer.data)

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None

    def __repr__(self) -> str:
        return f"HttpBackend({self.addr!r})"
