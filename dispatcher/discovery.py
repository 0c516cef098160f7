"""Service discovery: keep a balancer's membership equal to what a registry says.

A resolver turns a source (a fixed list, DNS, etcd) into a stream of *full* answers, each a
``{canonical address: weight}`` dict, never deltas: a full answer can be compared with the last
one and reconciled against the balancer whatever happened in between (a missed event, a
restarted registry). When the source cannot answer,
the resolver yields the exception instead, and `Discovery` keeps the last good answer: a
registry that blinks must never empty the pool. A source that answers fine with no instances
is believed, as Envoy's strict DNS and EDS clusters believe it: every backend is drained.

`reconcile` is the one place that writes membership: new instances are registered, removed
ones drained (no new picks, the slot is freed when their calls in flight end), so a worker
process sees the change on its next pick and no call is cut short.

Resolvers hold only their configuration (connections are made inside `watch`), so they pickle:
`Discovery` can run in any process that holds the balancer, attached or owner.
"""

from __future__ import annotations

import abc
import base64
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import urllib3

from .address import parse_address
from .checks import MAX_WEIGHT
from .errors import (
    CapacityExceeded,
    DuplicateBackend,
    EtcdError,
    InvalidAddress,
    SegmentError,
    UnknownBackend,
)

if TYPE_CHECKING:
    from .balancer import Balancer

log = logging.getLogger("dispatcher.discovery")


class Stop:
    """Tells a running `Resolver.watch` to return, and interrupts the read it is blocked in."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            hooks = list(self._hooks)
        for hook in hooks:
            hook()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as the stop is asked."""
        return self._event.wait(seconds)

    @contextmanager
    def hook(self, interrupt: Callable[[], None]) -> Iterator[None]:
        """Run `interrupt` if the stop is asked while the block runs (at once if it was)."""
        with self._lock:
            stopped = self._event.is_set()
            if not stopped:
                self._hooks.append(interrupt)
        if stopped:
            interrupt()
        try:
            yield
        finally:
            with self._lock:
                if interrupt in self._hooks:
                    self._hooks.remove(interrupt)


Answer = dict[str, int]
"""One full answer from a source: canonical ``host:port`` -> weight (1 to 1,000,000)."""


@runtime_checkable
class Resolver(Protocol):
    """A source of backend lists.

    ``watch(stop)`` yields a full `Answer` each time the list may have changed (the first one
    as soon as it can), or the exception that kept the source from answering, and keeps going
    until `stop` is set. It must not raise for a source failure: yield it and retry.
    """

    def watch(self, stop: Stop) -> Iterator[Answer | Exception]: ...


class PollingResolver(abc.ABC):
    """A resolver that asks its source again every `interval` seconds.

    Subclasses implement ``resolve()``; ``_poll()`` may also return a shorter delay (a TTL).
    """

    interval: float = 30.0

    @abc.abstractmethod
    def resolve(self) -> Answer:
        """Ask the source once; raise if it cannot answer."""

    def _poll(self) -> tuple[Answer, float]:
        return self.resolve(), self.interval

    def watch(self, stop: Stop) -> Iterator[Answer | Exception]:
        while not stop.is_set():
            delay = self.interval
            try:
                answer, delay = self._poll()
            except Exception as exc:
                yield exc
            else:
                yield answer
            if stop.wait(delay):
                return


class StaticResolver(PollingResolver):
    """A fixed list: ``["host:port", ...]`` (weight 1 each) or ``{"host:port": weight}``."""

    def __init__(self, addrs: Iterable[str] | Mapping[str, int]) -> None:
        if isinstance(addrs, str):
            raise TypeError("addrs must be an iterable of 'host:port' strings, not one string")
        pairs = addrs.items() if isinstance(addrs, Mapping) else ((a, 1) for a in addrs)
        self.answer: Answer = {}
        for addr, weight in pairs:
            self.answer[parse_address(addr)] = _check_weight(weight, addr)

    def resolve(self) -> Answer:
        return dict(self.answer)

    def watch(self, stop: Stop) -> Iterator[Answer | Exception]:
        yield self.resolve()
        while not stop.wait(3600):
            pass

    def __repr__(self) -> str:
        return f"StaticResolver({sorted(self.answer)!r})"


# DNS ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DnsRecord:
    """One record of a DNS answer: an address (A/AAAA) or a service location (SRV)."""

    host: str
    port: int = 0
    """SRV only; A/AAAA answers use the resolver's port."""
    weight: int = 1
    priority: int = 0
    ttl: float | None = None
    """Seconds the record may be cached; the resolver asks again when the shortest ends."""


DnsLookup = Callable[[str, str], Iterable[DnsRecord]]
"""``lookup(name, rdtype)`` with rdtype "A" (A and AAAA) or "SRV"; raises when DNS fails."""


def getaddrinfo_lookup(name: str, rdtype: str, family: int = socket.AF_UNSPEC) -> list[DnsRecord]:
    """A/AAAA through the system resolver (/etc/hosts, nsswitch); it reports no TTL."""
    if rdtype != "A":
        raise ValueError("the system resolver answers A/AAAA only: pass resolver= for SRV")
    infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
    return [DnsRecord(str(info[4][0])) for info in infos]


class DnsResolver(PollingResolver):
    """Every address a DNS name resolves to, asked again every `interval` or on the record TTL.

    With ``srv=False`` (the default) each A/AAAA address becomes ``address:port``, weight 1,
    looked up with ``socket.getaddrinfo`` unless `resolver` is given. With ``srv=True`` the
    SRV records give ports and weights; only the lowest priority present is used (RFC 2782),
    a weight of 0 counts as 1, and `resolver` (a `DnsLookup`) is required. A lookup that fails
    (including "no such name") is an error: the last good list is kept.
    """

    def __init__(
        self,
        name: str,
        port: int | None = None,
        *,
        interval: float = 30.0,
        srv: bool = False,
        resolver: DnsLookup | None = None,
        family: int = socket.AF_UNSPEC,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("name must be a non-empty DNS name")
        if not srv and (not isinstance(port, int) or not 1 <= port <= 65535):
            raise ValueError(f"port must be 1-65535 for A/AAAA lookups, not {port!r}")
        if srv and resolver is None:
            raise ValueError("srv=True needs resolver=, a function (name, 'SRV') -> records")
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, not {interval!r}")
        self.name, self.port, self.srv = name, port, srv
        self.interval = float(interval)
        self.resolver = resolver
        self.family = family

    def _lookup(self) -> list[DnsRecord]:
        rdtype = "SRV" if self.srv else "A"
        if self.resolver is None:
            return getaddrinfo_lookup(self.name, rdtype, self.family)
        return list(self.resolver(self.name, rdtype))

    def _poll(self) -> tuple[Answer, float]:
        records = self._lookup()
        if self.srv and records:
            best = min(r.priority for r in records)
            records = [r for r in records if r.priority == best]
        answer: Answer = {}
        for record in records:
            port = record.port if self.srv else self.port
            host = f"[{record.host}]" if ":" in record.host else record.host
            try:
                addr = parse_address(f"{host}:{port}")
            except InvalidAddress as exc:
                log.warning("%r: ignoring a record: %s", self, exc)
                continue
            weight = min(max(record.weight, 1), MAX_WEIGHT) if self.srv else 1
            answer[addr] = max(answer.get(addr, 0), weight)
        ttls = [r.ttl for r in records if r.ttl is not None and r.ttl > 0]
        return answer, min([self.interval, *ttls])

    def resolve(self) -> Answer:
        return self._poll()[0]

    def __repr__(self) -> str:
        kind = "SRV" if self.srv else f"A/AAAA port {self.port}"
        return f"DnsResolver({self.name!r}, {kind})"


# etcd ---------------------------------------------------------------------------------------


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


# Reconciling --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Changes:
    """What one `reconcile` did."""

    added: tuple[str, ...] = ()
    """Registered, or put back in rotation while still draining."""
    drained: tuple[str, ...] = ()
    reweighted: tuple[str, ...] = ()
    """Live backends whose weight changed."""
    failed: tuple[str, ...] = ()
    """Addresses that could not be registered (no free slot)."""

    def __bool__(self) -> bool:
        return bool(self.added or self.drained or self.reweighted or self.failed)


def reconcile(balancer: Balancer, desired: Mapping[str, int]) -> Changes:
    """Make `balancer`'s membership what `desired` says; return what changed.

    Every registered backend is discovery's to manage: one missing from `desired` is drained.
    A draining one that reappears is registered again (back in rotation, with the new weight).
    """
    wanted = {parse_address(addr): _check_weight(w, addr) for addr, w in desired.items()}
    current = {stats.addr: stats for stats in balancer.snapshot()}
    added: list[str] = []
    drained: list[str] = []
    reweighted: list[str] = []
    failed: list[str] = []
    for addr, weight in wanted.items():
        stats = current.get(addr)
        if stats is not None and not stats.draining:
            if stats.weight != weight:
                balancer.set_weight(addr, weight)
                reweighted.append(addr)
            continue
        try:
            balancer.register(addr, weight)
        except DuplicateBackend:
            continue
        except CapacityExceeded:
            failed.append(addr)
            continue
        added.append(addr)
    for addr, stats in current.items():
        if addr in wanted or stats.draining:
            continue
        try:
            balancer.drain(addr)
        except UnknownBackend:
            continue
        drained.append(addr)
    return Changes(tuple(added), tuple(drained), tuple(reweighted), tuple(failed))


def _check_weight(weight: object, addr: object) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight of {addr!r} must be an integer 1-{MAX_WEIGHT}, not {weight!r}")
    return weight


# The loop -----------------------------------------------------------------------------------


class Discovery:
    """Follows a resolver in a background thread and reconciles the balancer on each change.

    ``start()``/``stop()`` or ``with Discovery(balancer, resolver):``. It runs in whichever
    process calls ``start()``: one per machine is enough, since membership is shared.
    """

    def __init__(
        self, balancer: Balancer, resolver: Resolver, *, retry_seconds: float = 1.0
    ) -> None:
        if not isinstance(resolver, Resolver):
            raise TypeError(f"resolver must have a watch(stop) method, not {resolver!r}")
        self.balancer = balancer
        self.resolver = resolver
        self.retry_seconds = retry_seconds
        self._stop = Stop()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._desired: Answer | None = None
        self._applied: Answer | None = None
        self._failing = False
        self._updates = 0

    @property
    def desired(self) -> Answer | None:
        """The last good answer, or None before the first one."""
        with self._lock:
            return None if self._desired is None else dict(self._desired)

    @property
    def failing(self) -> bool:
        """True while the source cannot answer (the last good answer is in force)."""
        return self._failing

    @property
    def updates(self) -> int:
        """How many answers (good or failed) the loop has handled."""
        return self._updates

    def start(self) -> Discovery:
        if self._thread is not None:
            raise RuntimeError("this Discovery was already started")
        self._thread = threading.Thread(
            target=self._run, name=f"dispatcher-discovery {self.resolver!r}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following the source; the balancer keeps its membership."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("%r did not stop within %s s", self.resolver, timeout)

    def __enter__(self) -> Discovery:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for update in self.resolver.watch(self._stop):
                    if self._stop.is_set():
                        return
                    self._handle(update)
            except SegmentError as exc:
                log.warning("stopping discovery: %s", exc)
                return
            except Exception as exc:
                log.warning("%r raised; restarting it", self.resolver, exc_info=True)
                self._failed(exc)
            self._stop.wait(self.retry_seconds)

    def _handle(self, update: Answer | Exception) -> None:
        self._updates += 1
        if isinstance(update, Exception):
            self._failed(update)
            return
        if self._failing:
            log.info("%r answers again", self.resolver)
            self._failing = False
        with self._lock:
            self._desired = dict(update)
        if update == self._applied:
            return
        if not update and self._applied:
            log.warning("%r lists no instances: draining every backend", self.resolver)
        changes = reconcile(self.balancer, update)
        self._applied = None if changes.failed else dict(update)
        if changes.added or changes.drained or changes.reweighted:
            log.info(
                "added %s, drained %s, reweighted %s",
                list(changes.added),
                list(changes.drained),
                list(changes.reweighted),
            )
        if changes.failed:
            log.warning("no free slot for %s: will retry on the next answer", changes.failed)

    def _failed(self, exc: BaseException) -> None:
        if self._failing:
            return
        self._failing = True
        desired = self.desired
        kept = "nothing yet" if desired is None else f"{len(desired)} instances"
        log.warning(
            "%r failed (%s: %s); keeping the last good list (%s)",
            self.resolver,
            type(exc).__name__,
            exc,
            kept,
        )
