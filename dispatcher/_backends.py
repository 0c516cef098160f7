"""What a balancer calls: the `Backend` protocol and a real HTTP/1.1 backend.

A `Backend` is the Python form of ``Invoke(ctx, req) (Response, error)``: it returns a response
or raises. Which exceptions count as the backend's failure is the balancer's rule
(``Balancer(counts_as_failure=...)``); `HttpBackend` raises `BackendError` for connection
errors, timeouts and failure statuses, and returns every other answer. Each process makes its
own backends (the balancer calls ``backend_factory(addr)`` lazily, per process), because
connection pools must never cross a fork.

`HttpRequest` checks itself when it is made, so a malformed request is the caller's
`InvalidRequest` before any backend is chosen, never a backend's failure.
"""

from __future__ import annotations

import ssl
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ._address import parse_address
from ._http_client import HttpClient, HttpHeaders, check_header, check_method, check_target
from ._orca import HEADER as ORCA_HEADER
from ._orca import LoadReport, parse_load_report
from .errors import BackendError

FAILURE_STATUSES = range(500, 600)
"""The statuses `HttpBackend` raises `BackendError` for, unless told others."""


def statuses_of(failure_statuses: Iterable[int] | Container[int]) -> Container[int]:
    """`failure_statuses` as the HTTP backends keep it: any container of statuses, an
    iterable made a frozenset once (a generator would be used up by the first check)."""
    if failure_statuses is not FAILURE_STATUSES and isinstance(failure_statuses, Iterable):
        failure_statuses = frozenset(failure_statuses)
    if not isinstance(failure_statuses, Container):
        raise TypeError(f"failure_statuses must hold statuses, not {failure_statuses!r}")
    return failure_statuses


@runtime_checkable
class Backend(Protocol):
    """Anything that answers a request: one instance of a downstream service, or a balancer."""

    def invoke(self, request: Any, *, timeout: float | None = None) -> Any: ...


@dataclass(frozen=True)
class HttpRequest:
    """One HTTP request, for any backend of a service: the path is origin-form (``/users/42``,
    a query allowed); the ``Host`` header is the backend's own unless given.

    Raises `InvalidRequest` (a ``ValueError``) when made with a method, path, header or body
    that cannot be sent, so the mistake is the caller's and no backend is counted for it.
    """

    method: str
    path: str
    headers: Mapping[str, str] | None = None
    body: bytes = b""

    def __post_init__(self) -> None:
        check_method(self.method)
        check_target(self.path)
        if self.headers is not None:
            if not isinstance(self.headers, Mapping):
                raise TypeError(f"headers must be a mapping of str to str, not {self.headers!r}")
            for name, value in self.headers.items():
                check_header(name, value)
        if not isinstance(self.body, bytes | bytearray):
            raise TypeError(f"body must be bytes, not {type(self.body).__name__}")


@dataclass(frozen=True)
class HttpResponse:
    """An answer: `status`, `headers` (an `HttpHeaders`: case-insensitive, repeated headers
    kept, made from any mapping or pairs given) and the whole `body`."""

    status: int
    headers: HttpHeaders = field(default_factory=HttpHeaders)
    body: bytes = b""

    def __post_init__(self) -> None:
        if type(self.headers) is not HttpHeaders:
            object.__setattr__(self, "headers", HttpHeaders(self.headers))

    @property
    def load_report(self) -> LoadReport | None:
        """The load the backend reported in ORCA's ``endpoint-load-metrics`` header (TEXT or
        JSON form), or None without one or if it cannot be read."""
        value = self.headers.get(ORCA_HEADER)
        return None if value is None else parse_load_report(value)


class HttpBackend:
    """One HTTP/1.1 server, called through keep-alive connections of this process.

    Connection errors, timeouts and answers whose status is in `failure_statuses` (5xx by
    default) raise `BackendError` (with the answer as its ``response`` when there was one);
    every other answer is returned, 4xx included. With `ssl_context` it speaks HTTPS, verifying
    as that context says (``ssl.create_default_context(cafile=...)``, client certificates with
    ``load_cert_chain``); the certificate must name `server_hostname` (default: the host of
    `addr`), which is also sent as SNI and in ``Host``. `timeout` bounds connecting and each
    wait on the socket (not the whole call); `pool_size` is how many idle connections are kept.

    Thread-safe; the connections are rebuilt in a forked child, never shared with its parent.
    An ``ssl.SSLContext`` does not pickle: to send a balancer to spawned processes, give it a
    module-level factory that builds the context (see the README).
    """

    def __init__(
        self,
        addr: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        pool_size: int = 16,
        timeout: float | None = 10.0,
        failure_statuses: Iterable[int] | Container[int] = FAILURE_STATUSES,
    ) -> None:
        self.addr = parse_address(addr)
        host, _, port = self.addr.rpartition(":")
        self._failure_statuses = statuses_of(failure_statuses)
        self._client = HttpClient(
            host,
            int(port),
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            pool_size=pool_size,
            timeout=timeout,
            addr=self.addr,
        )

    @property
    def scheme(self) -> str:
        """``https`` with an ``ssl_context``, else ``http``."""
        return "http" if self._client.ssl_context is None else "https"

    def invoke(self, request: HttpRequest, *, timeout: float | None = None) -> HttpResponse:
        if not isinstance(request, HttpRequest):
            raise TypeError(f"HttpBackend needs an HttpRequest, not {type(request).__name__}")
        answer = self._client.request(
            request.method,
            request.path,
            body=request.body,
            headers=request.headers,
            timeout=timeout,
        )
        response = HttpResponse(answer.status, answer.headers, answer.body)
        if answer.status in self._failure_statuses:
            raise BackendError(
                self.addr, f"HTTP {answer.status}", status=answer.status, response=response
            )
        return response

    def close(self) -> None:
        """Close the idle connections; a later call opens new ones."""
        self._client.close()

    def __repr__(self) -> str:
        return f"HttpBackend({self.scheme}://{self.addr})"
