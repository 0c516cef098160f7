"""Parsing ``host:port`` addresses into one canonical spelling.

Addresses are compared as bytes in shared memory, so every process must spell the same backend
the same way: hosts are lower-cased and IPv6 addresses compressed.
"""

from __future__ import annotations

import ipaddress
import re

from .errors import InvalidAddress

MAX_ADDRESS_BYTES = 255
"""Longest canonical address a slot can hold (a 253-byte DNS name plus ``:port`` fits)."""

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")


def parse_address(addr: object) -> str:
    """Return the canonical form of `addr`, or raise `InvalidAddress` naming the bad value."""
    if not isinstance(addr, str):
        raise TypeError(f"address must be a str like 'host:port', not {type(addr).__name__}")
    if len(addr) > MAX_ADDRESS_BYTES:
        raise InvalidAddress(f"address {addr[:40]!r}... is longer than {MAX_ADDRESS_BYTES}")
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]:")
        if not sep:
            raise InvalidAddress(f"address {addr!r} must be '[ipv6]:port'")
        canonical_host = f"[{_ipv6(host, addr)}]"
    else:
        host, sep, port = addr.rpartition(":")
        if not sep or not host:
            raise InvalidAddress(f"address {addr!r} must be 'host:port'")
        canonical_host = _host(host, addr)
    return f"{canonical_host}:{_port(port, addr)}"


def _port(port: str, addr: str) -> int:
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise InvalidAddress(f"address {addr!r} needs a port in 1-65535, not {port!r}")
    return int(port)


_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
"""An interface name or number, as a zone id (``fe80::1%eth0``) may carry."""


def _ipv6(host: str, addr: str) -> str:
    zone = host.partition("%")[2]
    if zone and not _ZONE.match(zone):
        raise InvalidAddress(f"address {addr!r} has an invalid IPv6 zone id {zone!r}")
    try:
        return ipaddress.IPv6Address(host).compressed
    except ValueError:
        raise InvalidAddress(f"address {addr!r} has an invalid IPv6 host {host!r}") from None


def _host(host: str, addr: str) -> str:
    name = host.lower().removesuffix(".")
    labels = name.split(".")
    if not name.isascii() or len(name) > 253 or not all(_LABEL.match(lb) for lb in labels):
        raise InvalidAddress(f"address {addr!r} has an invalid host {host!r}")
    if all(label.isdigit() for label in labels):
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            raise InvalidAddress(f"address {addr!r} has an invalid IPv4 host {host!r}") from None
    return name
