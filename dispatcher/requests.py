"""``requests`` through a `Balancer`: a transport adapter, so existing code keeps its session.

Mount it on the prefix that names the service; every request under it goes to a backend the
balancer picks, and the rest of the code is unchanged::

    import requests
    from dispatcher.requests import BalancerAdapter

    session = requests.Session()
    session.mount("http://payments/", BalancerAdapter(balancer, retries=2))
    session.get("http://payments/invoices/42", timeout=2.0)

* The URL's host names the service, not a machine: the path and query go to the backend the
  balancer picks, through its own client (`HttpBackend`: keep-alive, TLS as its
  ``ssl_context`` says; ``verify``, ``cert`` and ``proxies`` of the session do not apply).
* ``retries`` (the adapter's) apply to idempotent methods; a ``Dispatcher-Retries: N`` request
  header sets them for one request, any method. ``Dispatcher-Key: user-42`` makes the call
  sticky (``invoke(..., key=...)``). Both headers are taken out, never sent.
* ``timeout``: one number, or ``(connect, read)`` of which the longer bounds each wait.
* A failure status (5xx by default) is returned as the ``Response`` it is, after the balancer
  counted it as that backend's failure (and retried it, if allowed). No connection, a timeout,
  a TLS failure or no eligible backend raise ``requests``' own ``ConnectionError``,
  ``ConnectTimeout``/``ReadTimeout`` and ``SSLError``, the dispatcher error as their cause.
* Answers are read whole (``stream=True`` streams from memory); compressed bodies are decoded
  and cookies stored as ``requests`` does.

Needs the ``requests`` extra.
"""

from __future__ import annotations

import http
import io
from collections.abc import Iterable, Mapping
from typing import Any

import requests
import urllib3
from requests.adapters import BaseAdapter
from requests.cookies import extract_cookies_to_jar
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers

from ._adapters import KEY_HEADER, RETRIES_HEADER, seconds, to_request
from ._backends import HttpResponse
from ._balancer import Balancer
from ._http_client import HttpHeaders
from .errors import (
    BackendError,
    ConnectTimeout,
    DispatcherError,
    InvalidRequest,
    ReadTimeout,
    TLSError,
)

__all__ = ["KEY_HEADER", "RETRIES_HEADER", "BalancerAdapter"]


class BalancerAdapter(BaseAdapter):
    """A ``requests`` transport adapter that sends every request through `balancer`.

    `retries`: how many other backends an idempotent request may try after a failure (within
    the retry budget and the timeout, as ``invoke(retries=...)``).
    """

    def __init__(self, balancer: Balancer, *, retries: int = 0) -> None:
        super().__init__()
        if not isinstance(balancer, Balancer):
            raise TypeError(f"BalancerAdapter needs a dispatcher.Balancer, not {balancer!r}")
        self.balancer = balancer
        self.retries = retries

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float | None, float | None] | Any | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        method = request.method or "GET"
        try:
            call, key, retries = to_request(
                method,
                request.path_url,
                _headers(request.headers.items()),
                _body(request.body),
                self.retries,
            )
        except InvalidRequest as exc:
            raise requests.exceptions.InvalidURL(str(exc), request=request) from exc
        try:
            answer = self.balancer.invoke(call, timeout=_timeout(timeout), key=key, retries=retries)
        except BackendError as exc:
            if exc.response is None:
                raise _requests_error(exc, request) from exc
            answer = exc.response
        except DispatcherError as exc:  # no eligible backend, a closed balancer
            raise requests.exceptions.ConnectionError(str(exc), request=request) from exc
        return self.build_response(request, answer)

    def build_response(
        self, request: requests.PreparedRequest, answer: HttpResponse
    ) -> requests.Response:
        """The ``requests.Response`` for `answer`, as ``HTTPAdapter`` builds one."""
        raw = urllib3.HTTPResponse(
            body=io.BytesIO(answer.body),
            headers=urllib3.HTTPHeaderDict(answer.headers.multi_items()),
            status=answer.status,
            reason=_reason(answer.status),
            preload_content=False,
            decode_content=True,
            original_response=_Original(answer.headers),  # type: ignore[arg-type]
            request_method=request.method,
            request_url=request.url,
        )
        response = requests.Response()
        response.status_code = answer.status
        response.headers = CaseInsensitiveDict(answer.headers)
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = raw
        response.reason = raw.reason or ""
        url = request.url
        response.url = url.decode("utf-8") if isinstance(url, bytes) else url or ""
        extract_cookies_to_jar(response.cookies, request, raw)
        response.request = request
        response.connection = self  # type: ignore[assignment]
        return response

    def close(self) -> None:
        """Nothing to close: the balancer and its connections are the caller's."""


def _headers(items: Iterable[tuple[str, str | bytes]]) -> list[tuple[str, str]]:
    return [
        (name, value.decode("latin-1") if isinstance(value, bytes) else value)
        for name, value in items
    ]


def _body(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    if hasattr(body, "read"):
        return _body(body.read())
    if isinstance(body, Iterable):
        return b"".join(_body(chunk) for chunk in body)
    raise InvalidRequest(f"a body of type {type(body).__name__} cannot be sent")


def _timeout(timeout: Any) -> float | None:
    if isinstance(timeout, tuple):
        return seconds(*timeout)
    if isinstance(timeout, urllib3.Timeout):
        return seconds(timeout.connect_timeout, timeout.read_timeout)  # type: ignore[arg-type]
    return seconds(timeout)


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _requests_error(exc: BackendError, request: requests.PreparedRequest) -> Exception:
    if isinstance(exc, TLSError):
        return requests.exceptions.SSLError(str(exc), request=request)
    if isinstance(exc, ConnectTimeout):
        return requests.exceptions.ConnectTimeout(str(exc), request=request)
    if isinstance(exc, ReadTimeout):
        return requests.exceptions.ReadTimeout(str(exc), request=request)
    return requests.exceptions.ConnectionError(str(exc), request=request)


class _Message:
    """The headers as ``http.cookiejar`` reads them from a response (``email``'s API)."""

    def __init__(self, headers: HttpHeaders) -> None:
        self.headers = headers

    def get_all(self, name: str, default: Any = None) -> Any:
        return self.headers.get_all(name) or default


class _Original:
    """What ``requests`` reads cookies from: the ``http.client`` response a urllib3 response
    wraps (its headers as `msg`; closed along with it)."""

    def __init__(self, headers: HttpHeaders) -> None:
        self.msg = _Message(headers)
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def isclosed(self) -> bool:
        return self.closed
