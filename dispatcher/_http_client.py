"""The HTTP/1.1 client under `HttpBackend`: keep-alive connections on the standard library.

`HttpClient` keeps, for the threads of one process, a few idle ``http.client.HTTPConnection``
to one server (TLS with an ``ssl.SSLContext`` when given one) and reuses the most recently
used one first. It costs a sixth to a third of the client CPU per request of urllib3's
``HTTPConnectionPool`` as `HttpBackend` used it, over HTTP and HTTPS alike
(``scripts/bench_clients.py``), because it does only what a backend call needs:

* the request head is written by one format and sent with one ``sendall`` (head and body
  together), checked for the bytes that could split it (CR, LF, NUL, spaces in the target);
* the answer is read by ``http.client.HTTPResponse`` (status line, ``Content-Length``,
  chunked, HEAD, bodyless statuses), with the header block parsed into `HttpHeaders` instead
  of through the ``email`` package, which is most of what ``http.client`` spends on an answer.

Guarantees, as urllib3 gave them to `HttpBackend`:

* a connection goes back to the pool only after its answer was read to the end and the server
  did not ask to close it; one that raised anything is closed;
* before an idle connection is reused it is polled: one the server closed (or wrote to while
  idle) is dropped. When a reused connection fails anyway (the server closed it as the request
  went out), the request is sent once more on a new connection if it provably did not reach
  the server (writing it failed), or if no byte of an answer came and the method is idempotent
  (``idempotent=`` overrides the method's say);
* a pool never crosses a fork: a child that calls finds the pid changed and starts with no
  connection (it closes its copies of the parent's sockets, which leaves the parent's alone);
* errors say what the caller may do: `ConnectError` (and `ConnectTimeout`, `TLSError`) means
  the server never got the request, so it is safe to send it elsewhere; `ReadTimeout` and
  `ProtocolError` mean it may have been acted on. All are `BackendError`s.

The timeout applies to connecting (TCP and TLS handshake) and to each wait on the socket
afterwards, as urllib3's float timeout does; it is not a deadline for the whole call. There
are no proxies, redirects, decompression (``Accept-Encoding: identity`` is sent unless the
caller sets it), ``Expect: 100-continue``, streaming or HTTP/2: whole bodies are read.
"""

from __future__ import annotations

import http.client
import os
import re
import select
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator, Mapping

from .errors import (
    ConnectError,
    ConnectTimeout,
    InvalidRequest,
    ProtocolError,
    ReadTimeout,
    TLSError,
)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods sent again after a reused connection died before any byte of its answer."""
MAX_HEADERS = 100
MAX_LINE = 65536
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_token = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
_bad_target = re.compile(r"[\x00-\x20\x7f]").search
_bad_value = re.compile(r"[\r\n\x00]").search


def check_method(method: str) -> None:
    """Raise `InvalidRequest` unless `method` is an HTTP token (``GET``, ``POST``...)."""
    if not isinstance(method, str) or not _token(method):
        raise InvalidRequest(f"invalid method {method!r}")


def check_target(path: str) -> None:
    """Raise `InvalidRequest` unless `path` is an origin-form target: ``/`` then printable
    ASCII with no space (percent-encode the rest), a query allowed."""
    if not isinstance(path, str) or not path.startswith("/") or not path.isascii():
        raise InvalidRequest(f"invalid request path {path!r}: it must start with '/'")
    if _bad_target(path):
        raise InvalidRequest(f"invalid request path {path!r}: percent-encode spaces and controls")


def check_header(name: str, value: str) -> None:
    """Raise `InvalidRequest` unless `name` is a token and `value` a string with no CR, LF
    or NUL (which would end the header, or the head, early)."""
    if not isinstance(name, str) or not _token(name):
        raise InvalidRequest(f"invalid header name {name!r}")
    if not isinstance(value, str) or _bad_value(value):
        raise InvalidRequest(f"invalid value for header {name!r}: {value!r}")


class _Resend(Exception):
    """A reused connection failed in a way that allows sending the request again."""


class HttpHeaders(Mapping[str, str]):
    """Headers of an answer: looked up without regard to case, repeated ones kept.

    ``headers[name]`` (and ``get``) gives every value of that name joined by ``", "``, as
    urllib3's and requests' headers do; `get_all` gives them one by one (the way to read
    ``Set-Cookie``). Iterating gives each name once, spelled as it first came; `multi_items`
    gives every line. Made from ``(name, value)`` pairs or from a mapping.
    """

    __slots__ = ("_joined", "_lines")

    def __init__(self, lines: Iterable[tuple[str, str]] | Mapping[str, str] = ()) -> None:
        pairs = list(lines.items() if isinstance(lines, Mapping) else lines)
        joined: dict[str, str] = {}
        for name, value in pairs:
            key = name.lower()
            earlier = joined.get(key)
            joined[key] = value if earlier is None else f"{earlier}, {value}"
        self._lines = pairs
        self._joined = joined

    def __getitem__(self, name: str) -> str:
        return self._joined[name.lower()]

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._joined.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._joined

    def __len__(self) -> int:
        return len(self._joined)

    def __iter__(self) -> Iterator[str]:
        seen = set()
        for name, _ in self._lines:
            key = name.lower()
            if key not in seen:
                seen.add(key)
                yield name

    def get_all(self, name: str) -> list[str]:
        """Every value of `name`, one per header line, in the order they came."""
        key = name.lower()
        return [value for line_name, value in self._lines if line_name.lower() == key]

    def multi_items(self) -> list[tuple[str, str]]:
        """Every header line as ``(name, value)``, in the order they came."""
        return list(self._lines)

    def __reduce__(self) -> tuple[type[HttpHeaders], tuple[list[tuple[str, str]]]]:
        return (type(self), (self._lines,))

    def __repr__(self) -> str:
        return f"HttpHeaders({self._lines!r})"


class Response:
    """A complete answer: status, reason phrase, `HttpHeaders` and the whole body."""

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: HttpHeaders, body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason} {len(self.body)} bytes>"


class _Answer(http.client.HTTPResponse):
    """``http.client``'s response, with the status line and headers read without ``email``.

    ``begin`` sets what ``HTTPResponse.read`` needs (``length``, ``chunked``, ``will_close``);
    ``started`` tells whether any byte of the answer came.
    """

    started = False
    head = False
    """Whether the request was a HEAD, whose answer has no body whatever its headers say."""

    def begin(self) -> None:
        fp = self.fp
        while True:
            line = fp.readline(MAX_LINE + 1)
            if not line:
                raise http.client.RemoteDisconnected("connection closed before any answer")
            self.started = True
            if len(line) > MAX_LINE:
                raise http.client.LineTooLong("status line")
            version, _, rest = line.decode("iso-8859-1").rstrip("\r\n").partition(" ")
            code, _, reason = rest.partition(" ")
            if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
                raise http.client.BadStatusLine(line.decode("iso-8859-1"))
            status = int(code)
            lines = self._read_header_lines()
            if status >= 200 or status == 101:
                break  # 1xx other than 101 come before the answer: skip them
        if status == 101:
            raise http.client.HTTPException("101 Switching Protocols was never asked for")
        self.code = self.status = status
        self.reason = reason.strip()
        self.version = 10 if version == "HTTP/1.0" else 11
        headers = HttpHeaders(lines)
        self.headers = self.msg = headers  # type: ignore[assignment]
        connection = (headers.get("connection") or "").lower()
        if self.version == 11:
            self.will_close = "close" in connection
        else:
            self.will_close = "keep-alive" not in connection
        coding = headers.get("transfer-encoding")
        self.chunked = coding is not None and coding.strip().lower() == "chunked"
        self.chunk_left = None
        self.length = None
        if coding is not None:
            # chunked framing wins over any Content-Length; any other coding is read to close
            self.will_close = self.will_close or not self.chunked or "content-length" in headers
        else:
            lengths = headers.get("content-length")
            if lengths is not None:
                values = {value.strip() for value in lengths.split(",")}
                length = values.pop()
                if values or not length.isdigit():
                    raise http.client.HTTPException(f"bad Content-Length: {lengths!r}")
                self.length = int(length)
        if status in (204, 304) or status < 200 or self.head:
            self.length = 0
        if self.length is None and not self.chunked:
            self.will_close = True

    def _read_header_lines(self) -> list[tuple[str, str]]:
        fp = self.fp
        lines: list[tuple[str, str]] = []
        while True:
            raw = fp.readline(MAX_LINE + 1)
            if len(raw) > MAX_LINE:
                raise http.client.LineTooLong("header line")
            if raw in (b"\r\n", b"\n"):
                return lines
            if not raw:
                raise http.client.IncompleteRead(b"", None)
            line = raw.decode("iso-8859-1")
            if line[0] in " \t" and lines:  # obsolete line folding: one value on two lines
                name, value = lines[-1]
                lines[-1] = (name, f"{value} {line.strip()}")
                continue
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.rstrip():
                raise http.client.HTTPException(f"bad header line {line!r}")
            lines.append((name, value.strip()))
            if len(lines) > MAX_HEADERS:
                raise http.client.HTTPException(f"more than {MAX_HEADERS} headers")


class _Connection(http.client.HTTPConnection):
    """One connection: TCP with no Nagle delay, wrapped in TLS when there is a context, the
    certificate checked against ``server_hostname``. Only the pool opens it (no auto-open)."""

    auto_open = 0

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float | None,
        context: ssl.SSLContext | None,
        server_hostname: str,
        addr: str,
    ) -> None:
        super().__init__(host, port, timeout)
        self.context = context
        self.server_hostname = server_hostname
        self.addr = addr
        self.poller = select.poll()

    def connect(self) -> None:
        addr = self.addr
        try:
            sock = socket.create_connection((self.host, self.port), self.timeout)
        except TimeoutError as exc:
            raise ConnectTimeout(addr, f"connecting: {exc or 'timed out'}") from exc
        except OSError as exc:
            raise ConnectError(addr, f"connecting: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_hostname=self.server_hostname)
        except TimeoutError as exc:
            sock.close()
            raise ConnectTimeout(addr, f"TLS handshake: {exc or 'timed out'}") from exc
        except ssl.SSLError as exc:
            sock.close()
            raise TLSError(addr, f"TLS handshake: {exc}") from exc
        except OSError as exc:
            sock.close()
            raise ConnectError(addr, f"TLS handshake: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.poller.register(sock, select.POLLIN)

    def dropped(self) -> bool:
        """True when the idle connection is readable: closed by the server, or not clean."""
        return bool(self.poller.poll(0))


class _Idle:
    """The idle connections of one process, most recently used last."""

    __slots__ = ("closed", "conns", "lock", "pid", "size")

    def __init__(self, pid: int, size: int) -> None:
        self.pid = pid
        self.size = size
        self.lock = threading.Lock()
        self.conns: list[_Connection] = []
        self.closed = False

    def take(self) -> _Connection | None:
        while True:
            with self.lock:
                if not self.conns:
                    return None
                conn = self.conns.pop()
            if not conn.dropped():
                return conn
            conn.close()

    def put(self, conn: _Connection) -> None:
        with self.lock:
            if not self.closed and len(self.conns) < self.size:
                self.conns.append(conn)
                return
        conn.close()

    def drain(self) -> list[_Connection]:
        with self.lock:
            self.closed = True
            conns, self.conns = self.conns, []
        return conns


def _drop(conn: _Connection, answer: _Answer) -> None:
    """Close a connection whose answer was not read to its end, and the answer's reader (the
    socket closes only once both are closed)."""
    answer.close()
    conn.close()


_fork_lock = threading.Lock()


def _new_fork_lock() -> None:
    global _fork_lock  # noqa: PLW0603 - a lock held by a parent's thread at fork stays held
    _fork_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_fork_lock)


class HttpClient:
    """Keep-alive HTTP/1.1 connections to one server, shared by the threads of one process.

    `pool_size` is how many idle connections are kept; more are opened when more calls are in
    flight, and closed after. `timeout` (seconds, None for none) is the default of
    `request`'s. With `ssl_context` the connections speak TLS, and the certificate must be
    valid for `server_hostname` (default `host`), which is also sent as SNI and in ``Host``.
    `addr` names the server in errors (default ``host:port``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        pool_size: int = 16,
        timeout: float | None = 10.0,
        addr: str | None = None,
    ) -> None:
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, not {pool_size}")
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext, not {ssl_context!r}")
        self.host = host.strip("[]")
        self.port = port
        self.addr = addr or (f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}")
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or self.host
        self.pool_size = pool_size
        self.timeout = timeout
        authority = server_hostname or self.host
        if ":" in authority:
            authority = f"[{authority}]"
        if port != (80 if ssl_context is None else 443):
            authority = f"{authority}:{port}"
        if _bad_value(authority) or " " in authority:
            raise ValueError(f"invalid host {authority!r}")
        self._host_line = f"Host: {authority}\r\n"
        self._fixed = f"{self._host_line}Accept-Encoding: identity\r\n"
        self._idle = _Idle(os.getpid(), pool_size)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        idempotent: bool | None = None,
    ) -> Response:
        """Send one request and read its whole answer; any status is an answer.

        `timeout` None means the client's. `idempotent` says whether the request may be sent
        again after a reused connection died with no answer at all (default: by method).
        Raises `ConnectError`, `ConnectTimeout`, `TLSError`, `ReadTimeout`, `ProtocolError`;
        `InvalidRequest` (a ``ValueError``) for a method, target or header that cannot be
        sent, before anything is sent.
        """
        data = self._head(method, path, body, headers)
        if body:
            data += body
        if timeout is None:
            timeout = self.timeout
        idle = self._idle
        if idle.pid != os.getpid():
            idle = self._after_fork()
        conn = idle.take()
        if conn is not None:
            resend = method in IDEMPOTENT if idempotent is None else idempotent
            try:
                return self._exchange(idle, conn, method, data, timeout, resend)
            except _Resend:
                pass
        conn = _Connection(
            self.host, self.port, timeout, self.ssl_context, self.server_hostname, self.addr
        )
        conn.connect()
        return self._exchange(idle, conn, method, data, timeout, None)

    def _exchange(
        self,
        idle: _Idle,
        conn: _Connection,
        method: str,
        data: bytes,
        timeout: float | None,
        resend: bool | None,
    ) -> Response:
        """One request on `conn`; `resend` is None on a new connection, else whether a request
        that got no byte of answer may be sent again (`_Resend` says to)."""
        sock = conn.sock
        try:
            if conn.timeout != timeout:
                sock.settimeout(timeout)
                conn.timeout = timeout
            sock.sendall(data)
        except TimeoutError as exc:
            conn.close()
            raise ReadTimeout(self.addr, f"writing the request: {exc or 'timed out'}") from exc
        except OSError as exc:
            conn.close()
            if resend is not None:
                raise _Resend from exc
            raise ConnectError(self.addr, f"writing the request: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        answer = _Answer(sock, method=method)
        if method == "HEAD":
            answer.head = True
        try:
            answer.begin()
            body = answer.read()
        except TimeoutError as exc:
            _drop(conn, answer)
            raise ReadTimeout(self.addr, f"waiting for the answer: {exc or 'timed out'}") from exc
        except (OSError, http.client.HTTPException) as exc:
            _drop(conn, answer)
            if resend and not answer.started:
                raise _Resend from exc
            raise ProtocolError(self.addr, f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            _drop(conn, answer)
            raise
        if answer.will_close:
            conn.close()
        else:
            idle.put(conn)
        return Response(answer.status, answer.reason, answer.headers, body)  # type: ignore[arg-type]

    def _head(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str] | None
    ) -> bytes:
        if not _token(method):
            check_method(method)
        if not path.isascii() or _bad_target(path) or not path.startswith("/"):
            check_target(path)
        if not headers:
            head = f"{method} {path} HTTP/1.1\r\n{self._fixed}"
            if body or method in _BODY_METHODS:
                head = f"{head}Content-Length: {len(body)}\r\n"
            return f"{head}\r\n".encode("latin-1")
        parts = [f"{method} {path} HTTP/1.1\r\n"]
        names = set()
        for name, value in headers.items():
            if not _token(name) or _bad_value(value):
                check_header(name, value)
            parts.append(f"{name}: {value}\r\n")
            names.add(name.lower())
        if "host" not in names:
            parts.append(self._host_line)
        if "accept-encoding" not in names:
            parts.append("Accept-Encoding: identity\r\n")
        if (
            (body or method in _BODY_METHODS)
            and "content-length" not in names
            and "transfer-encoding" not in names
        ):
            parts.append(f"Content-Length: {len(body)}\r\n")
        parts.append("\r\n")
        return "".join(parts).encode("latin-1")

    def _after_fork(self) -> _Idle:
        """In a forked child: start an empty pool, close this process's copies of the old."""
        with _fork_lock:
            old = self._idle
            if old.pid == os.getpid():
                return old
            self._idle = _Idle(os.getpid(), self.pool_size)
        for conn in old.conns:  # no other thread of this process has them: no lock taken
            conn.close()
        old.conns = []
        return self._idle

    def close(self) -> None:
        """Close the idle connections; one in use is closed when its call ends. A later call
        opens new ones."""
        idle = self._idle
        if idle.pid != os.getpid():
            self._after_fork()
            return
        self._idle = _Idle(idle.pid, self.pool_size)
        for conn in idle.drain():
            conn.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"HttpClient({scheme}://{self.host}:{self.port})"
