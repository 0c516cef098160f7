"""Backends from etcd v3: the keys under a prefix, listed, then watched through the JSON gateway."""

from __future__ import annotations

import base64
import json
import logging
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import urllib3

from .._address import parse_address
from .._checks import MAX_WEIGHT
from ..errors import EtcdError
from ._resolver import Answer, Stop

log = logging.getLogger("dispatcher.discovery")


class _Compacted(Exception):
    """The watch asked for revisions etcd has compacted away: list again."""


def parse_etcd_value(value: bytes) -> tuple[str, int]:
    """The (canonical address, weight) an etcd value describes; ValueError if none.

    Accepted: ``{"addr": "host:port", "weight": 2}`` (weight optional, default 1; "Addr" as
    gRPC's etcd naming writes it is accepted too), or a bare ``host:port``.
    """
    text = value.decode("utf-8")
    try:
        data: Any = json.loads(text)
    except ValueError:
        data = text.strip()
    if isinstance(data, str):
        return parse_address(data), 1
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object or 'host:port', got {text[:80]!r}")
    addr = data.get("addr", data.get("Addr"))
    if not isinstance(addr, str):
        raise ValueError(f"no 'addr' string in {text[:80]!r}")
    weight = data.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be an integer 0-{MAX_WEIGHT}, got {weight!r}")
    return parse_address(addr), weight


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with `prefix` (etcd's range_end)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _keepalive_options() -> list[tuple[int, int, int | bytes]]:
    """TCP keepalive, so a watch on a peer that vanished without a FIN ends in about 30 s."""
    options = [*urllib3.connection.HTTPConnection.default_socket_options]
    options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
    for name, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


def _interrupt(response: urllib3.BaseHTTPResponse) -> None:
    """End a blocked read of `response` from another thread (urllib3 2.3+ has a method)."""
    with suppress(ValueError, RuntimeError, OSError):
        if hasattr(response, "shutdown"):
            response.shutdown()
        else:
            sock = getattr(getattr(response, "connection", None), "sock", None)
            if sock is not None:
                sock.shutdown(socket.SHUT_RD)


@dataclass
class _Registry:
    """The keys under the prefix as last seen, and the etcd revision they are current at."""

    revision: int = 0
    entries: dict[bytes, tuple[str, int]] = field(default_factory=dict)

    def put(self, key: bytes, value: bytes, where: str) -> None:
        try:
            self.entries[key] = parse_etcd_value(value)
        except (ValueError, UnicodeDecodeError) as exc:
            self.entries.pop(key, None)
            log.warning("%s: ignoring key %r: %s", where, key.decode(errors="replace"), exc)

    def answer(self) -> Answer:
        answer: Answer = {}
        for addr, weight in self.entries.values():
            answer[addr] = max(answer.get(addr, 0), weight)
        return {addr: weight for addr, weight in answer.items() if weight > 0}


class EtcdResolver:
    """The instances registered under ``/services/NAME/`` in etcd v3, watched as they change.

    Each key under the prefix is one instance; its value is ``{"addr": "host:port",
    "weight": N}`` or a bare ``host:port`` (see `parse_etcd_value`). A weight of 0 keeps the
    instance listed but out of rotation. Values that cannot be read are ignored with a log line.

    Talks to etcd's HTTP/JSON gateway (``/v3/kv/range``, ``/v3/watch``), so it needs no gRPC.
    After any failure (etcd restarted, connection lost, history compacted) it lists the prefix
    again and watches from the listed revision + 1, trying each of `urls` in turn.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        service: str | None = None,
        *,
        prefix: str | None = None,
        timeout: float = 5.0,
        max_backoff: float = 5.0,
    ) -> None:
        urls = url.split(",") if isinstance(url, str) else list(url)
        self.urls = [u.strip().rstrip("/") for u in urls if u.strip()]
        if not self.urls or not all(u.startswith(("http://", "https://")) for u in self.urls):
            raise ValueError(f"url must be one or more http(s)://host:port, not {url!r}")
        if (service is None) == (prefix is None):
            raise ValueError("give exactly one of service (NAME) or prefix (a key prefix)")
        if service is not None and (not service or "/" in service):
            raise ValueError(f"service must be a non-empty name without '/', not {service!r}")
        self.prefix = prefix if prefix is not None else f"/services/{service}/"
        self.timeout = float(timeout)
        self.max_backoff = float(max_backoff)

    def __repr__(self) -> str:
        return f"EtcdResolver({','.join(self.urls)!r}, prefix={self.prefix!r})"

    def resolve(self) -> Answer:
        """List the prefix once."""
        with self._pool() as pool:
            registry = self._list(pool, self.urls[0])
        return registry.answer()

    def watch(self, stop: Stop) -> Iterator[Answer | Exception]:
        backoff, turn = 0.1, 0
        with self._pool() as pool:
            while not stop.is_set():
                url = self.urls[turn % len(self.urls)]
                registry: _Registry | None = None
                try:
                    registry = self._list(pool, url)
                    yield registry.answer()
                    backoff = 0.1
                    for _ in self._follow(pool, url, registry, stop):
                        yield registry.answer()
                except _Compacted:
                    log.info("%r: its history was compacted; listing again", self)
                    continue
                except Exception as exc:
                    if stop.is_set():
                        return
                    yield exc
                    turn += 1
                if stop.wait(backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff)

    def publish(self, name: str, addr: str, weight: int = 1) -> None:
        """Register an instance under this prefix, as a service announcing itself would."""
        value = json.dumps({"addr": parse_address(addr), "weight": weight}).encode()
        self._write(
            "/v3/kv/put", {"key": _b64(self.prefix.encode() + name.encode()), "value": _b64(value)}
        )

    def withdraw(self, name: str) -> None:
        """Remove an instance published with `publish`."""
        self._write("/v3/kv/deleterange", {"key": _b64(self.prefix.encode() + name.encode())})

    def _write(self, path: str, body: dict[str, Any]) -> None:
        with self._pool() as pool:
            response = self._post(pool, f"{self.urls[0]}{path}", body, timeout=self.timeout)
        if response.status != 200:
            raise EtcdError(f"{self.urls[0]}: {path} answered {response.status}")

    @contextmanager
    def _pool(self) -> Iterator[urllib3.PoolManager]:
        pool = urllib3.PoolManager(
            num_pools=max(2, len(self.urls)),
            maxsize=2,
            retries=False,
            socket_options=_keepalive_options(),
        )
        try:
            yield pool
        finally:
            pool.clear()

    def _post(
        self, pool: urllib3.PoolManager, url: str, body: dict[str, Any], **kw: Any
    ) -> urllib3.BaseHTTPResponse:
        return pool.request(
            "POST",
            url,
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            **kw,
        )

    def _keys(self) -> dict[str, str]:
        prefix = self.prefix.encode()
        return {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}

    def _list(self, pool: urllib3.PoolManager, url: str) -> _Registry:
        response = self._post(pool, f"{url}/v3/kv/range", self._keys(), timeout=self.timeout)
        if response.status != 200:
            raise EtcdError(f"{url}: range answered {response.status}: {response.data[:200]!r}")
        data = json.loads(response.data)
        registry = _Registry(revision=int(data["header"]["revision"]))
        for kv in data.get("kvs", ()):
            registry.put(base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", "")), url)
        return registry

    def _follow(
        self, pool: urllib3.PoolManager, url: str, registry: _Registry, stop: Stop
    ) -> Iterator[None]:
        """Apply each watch response to `registry`; yield after every batch of events."""
        request = {**self._keys(), "start_revision": str(registry.revision + 1)}
        response = self._post(
            pool,
            f"{url}/v3/watch",
            {"create_request": request},
            # Bounded until the headers arrive (a server that accepts and never answers must
            # not hold `stop` up); then the stream may be quiet for as long as nothing changes.
            timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
            preload_content=False,
        )
        try:
            sock = getattr(getattr(response, "connection", None), "sock", None)
            if sock is not None:
                sock.settimeout(None)
            if response.status != 200:
                body = response.read(200)
                raise EtcdError(f"{url}: watch answered {response.status}: {body!r}")
            with stop.hook(lambda: _interrupt(response)):
                pending = b""
                for chunk in response.stream(65536):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if line.strip() and self._apply(json.loads(line), registry, url):
                            yield None
            if not stop.is_set():
                raise EtcdError(f"{url}: the watch stream ended")
        finally:
            response.release_conn()
            response.close()

    def _apply(self, message: dict[str, Any], registry: _Registry, url: str) -> bool:
        """Apply one watch message; True if it carried events."""
        if "error" in message:
            raise EtcdError(f"{url}: watch failed: {message['error']}")
        result = message.get("result", {})
        if result.get("canceled"):
            if int(result.get("compact_revision", 0)) > 0:
                raise _Compacted
            raise EtcdError(f"{url}: watch canceled: {result.get('cancel_reason', '')}")
        events = result.get("events", ())
        for event in events:
            kv = event["kv"]
            key = base64.b64decode(kv["key"])
            if event.get("type") == "DELETE":
                registry.entries.pop(key, None)
            else:
                registry.put(key, base64.b64decode(kv.get("value", "")), url)
        revision = int(result.get("header", {}).get("revision", 0))
        registry.revision = max(registry.revision, revision)
        return bool(events)
