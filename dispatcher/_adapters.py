"""What the `requests` adapter and the `httpx` transports share: a library's request as an
`HttpRequest`, with the per-request options (sticky key, retries) taken out of its headers.

The URL's scheme and host only choose the adapter (``http://payments/`` names a balancer,
not a machine): the request sent is its path and query, to the backend the balancer picks,
with the backend's own ``Host`` unless the caller set another.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._backends import HttpRequest
from .errors import InvalidRequest

KEY_HEADER = "Dispatcher-Key"
"""A request header whose value is the call's sticky key (``invoke(..., key=...)``); it is
taken out of the request, never sent."""
RETRIES_HEADER = "Dispatcher-Retries"
"""A request header whose value is the call's ``retries`` for any method (the adapter's own
``retries`` apply to idempotent methods only); taken out, never sent."""
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods the adapter's default ``retries`` apply to (urllib3's ``Retry`` default)."""

_KEY, _RETRIES = KEY_HEADER.lower(), RETRIES_HEADER.lower()
_FRAMING = frozenset({"content-length", "transfer-encoding"})
"""Headers the client recomputes: the body is sent whole, with its own length."""


def to_request(
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    retries: int,
    auto_host: str | None = None,
) -> tuple[HttpRequest, str | None, int]:
    """The `HttpRequest` to send, the sticky key (None: none) and the retries for the call.

    `auto_host`: a ``Host`` value the library set by itself from the URL, left out. Repeated
    headers are joined by ``", "``. Raises `InvalidRequest` for what cannot be sent.
    """
    key = None
    chosen = retries if method in IDEMPOTENT else 0
    sent: dict[str, str] = {}
    for name, value in headers:
        lower = name.lower()
        if lower == _KEY:
            key = value
        elif lower == _RETRIES:
            try:
                chosen = int(value)
            except ValueError:
                raise InvalidRequest(f"{RETRIES_HEADER} must be a count, not {value!r}") from None
        elif _left_out(lower, value, auto_host):
            continue
        elif name in sent:
            sent[name] = f"{sent[name]}, {value}"
        else:
            sent[name] = value
    return HttpRequest(method, path or "/", sent, body), key, chosen


def _left_out(lower: str, value: str, auto_host: str | None) -> bool:
    """Whether a header is the client's to write: framing, keep-alive, the URL's host."""
    if lower in _FRAMING:
        return True
    if lower == "connection":
        return value.lower() == "keep-alive"
    return lower == "host" and value == auto_host


def seconds(*timeouts: float | None) -> float | None:
    """One timeout for the whole call from a library's per-phase ones: the longest; None when
    any phase is unbounded or none is given."""
    if not timeouts or any(t is None for t in timeouts):
        return None
    return max(t for t in timeouts if t is not None)
