"""Backends from DNS: A/AAAA addresses or SRV locations, asked again on the record TTL."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .._address import parse_address
from .._checks import MAX_WEIGHT
from ..errors import InvalidAddress
from ._resolver import Answer, PollingResolver

log = logging.getLogger("dispatcher.discovery")


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
