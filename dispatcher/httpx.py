"""``httpx`` through a `Balancer`: transports for ``httpx.Client`` and ``httpx.AsyncClient``.

Existing code changes only how it builds its client::

    import httpx
    from dispatcher.httpx import AsyncBalancerTransport, BalancerTransport

    client = httpx.Client(transport=BalancerTransport(balancer), base_url="http://payments")
    client.get("/invoices/42")

    # on an event loop, with a balancer of async backends (backend_factory=AsyncHttpBackend)
    async with httpx.AsyncClient(
        transport=AsyncBalancerTransport(balancer), base_url="http://payments"
    ) as client:
        await client.get("/invoices/42")

* The URL's host names the service, not a machine: the path and query go to the backend the
  balancer picks, through its own client (`HttpBackend`, or `AsyncHttpBackend` for
  `AsyncBalancerTransport`: keep-alive, TLS as its ``ssl_context`` says; the client's
  ``verify``, ``cert`` and ``proxy`` do not apply). The ``Host`` sent is the backend's, unless
  the caller set one that differs from the URL's.
* ``retries`` (the transport's) apply to idempotent methods; a ``Dispatcher-Retries: N``
  request header sets them for one request, any method. ``Dispatcher-Key: user-42`` makes the
  call sticky (``invoke(..., key=...)``). Both headers are taken out, never sent.
* The timeout bounds each wait: the longest of httpx's connect, read and write timeouts.
* A failure status (5xx by default) is returned as the ``Response`` it is, after the balancer
  counted it as that backend's failure (and retried it, if allowed). No connection, a timeout
  or no eligible backend raise httpx's own ``ConnectError``, ``ConnectTimeout``,
  ``ReadTimeout``, ``RemoteProtocolError``, the dispatcher error as their cause.
* `AsyncBalancerTransport.aclose` (``async with`` the client does it) closes this event
  loop's connections of the balancer's async backends.

Needs the ``httpx`` extra.
"""

from __future__ import annotations

from typing import Any

import httpx

from ._adapters import KEY_HEADER, RETRIES_HEADER, seconds, to_request
from ._backends import HttpRequest, HttpResponse
from ._balancer import Balancer
from .aio import aclose
from .errors import (
    BackendError,
    ConnectError,
    ConnectTimeout,
    DispatcherError,
    InvalidRequest,
    ReadTimeout,
)

__all__ = ["KEY_HEADER", "RETRIES_HEADER", "AsyncBalancerTransport", "BalancerTransport"]


class BalancerTransport(httpx.BaseTransport):
    """An ``httpx`` transport that sends every request through `balancer` (``invoke``).

    `retries`: how many other backends an idempotent request may try after a failure (within
    the retry budget and the timeout, as ``invoke(retries=...)``).
    """

    def __init__(self, balancer: Balancer, *, retries: int = 0) -> None:
        if not isinstance(balancer, Balancer):
            raise TypeError(f"BalancerTransport needs a dispatcher.Balancer, not {balancer!r}")
        self.balancer = balancer
        self.retries = retries

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        call, key, retries, timeout = _translate(request, self.retries)
        try:
            answer = self.balancer.invoke(call, timeout=timeout, key=key, retries=retries)
        except DispatcherError as exc:
            answer = _answer_of(exc, request)
        return _response(answer)


class AsyncBalancerTransport(httpx.AsyncBaseTransport):
    """An ``httpx`` async transport that sends every request through `balancer`
    (``await ainvoke``): its backends must be async (``backend_factory=AsyncHttpBackend``)."""

    def __init__(self, balancer: Balancer, *, retries: int = 0) -> None:
        if not isinstance(balancer, Balancer):
            raise TypeError(f"AsyncBalancerTransport needs a dispatcher.Balancer, not {balancer!r}")
        self.balancer = balancer
        self.retries = retries

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        call, key, retries, timeout = _translate(request, self.retries, await request.aread())
        try:
            answer = await self.balancer.ainvoke(call, timeout=timeout, key=key, retries=retries)
        except DispatcherError as exc:
            answer = _answer_of(exc, request)
        return _response(answer)

    async def aclose(self) -> None:
        """Close this event loop's connections of the balancer's async backends."""
        await aclose(self.balancer)


def _translate(
    request: httpx.Request, retries: int, body: bytes | None = None
) -> tuple[HttpRequest, str | None, int, float | None]:
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
    phases = request.extensions.get("timeout") or {}
    try:
        call, key, chosen = to_request(
            request.method,
            request.url.raw_path.decode("ascii"),
            headers,
            request.read() if body is None else body,
            retries,
            request.url.netloc.decode("ascii"),
        )
    except InvalidRequest as exc:
        raise httpx.LocalProtocolError(str(exc), request=request) from exc
    timeout = seconds(*(phases.get(p) for p in ("connect", "read", "write"))) if phases else None
    return call, key, chosen, timeout


def _answer_of(exc: DispatcherError, request: httpx.Request) -> HttpResponse:
    """The answer a failure carries; else raise httpx's error for it."""
    if isinstance(exc, BackendError) and exc.response is not None:
        return exc.response  # type: ignore[no-any-return]
    error: httpx.TransportError
    if isinstance(exc, ConnectTimeout):
        error = httpx.ConnectTimeout(str(exc), request=request)
    elif isinstance(exc, ReadTimeout):
        error = httpx.ReadTimeout(str(exc), request=request)
    elif isinstance(exc, ConnectError) or not isinstance(exc, BackendError):
        error = httpx.ConnectError(str(exc), request=request)
    else:
        error = httpx.RemoteProtocolError(str(exc), request=request)
    raise error from exc


def _response(answer: Any) -> httpx.Response:
    return httpx.Response(
        answer.status,
        headers=answer.headers.multi_items(),
        stream=httpx.ByteStream(answer.body),
        extensions={"http_version": b"HTTP/1.1"},
    )
