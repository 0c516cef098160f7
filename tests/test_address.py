from __future__ import annotations

import pytest

from dispatcher import InvalidAddress
from dispatcher._address import parse_address


@pytest.mark.parametrize(
    ("addr", "canonical"),
    [
        ("10.0.0.1:80", "10.0.0.1:80"),
        ("127.0.0.1:65535", "127.0.0.1:65535"),
        ("[::1]:8080", "[::1]:8080"),
        ("[2001:DB8:0:0::1]:443", "[2001:db8::1]:443"),
        ("Backend-1.Example.COM:1", "backend-1.example.com:1"),
        ("svc.ns.svc.cluster.local.:9000", "svc.ns.svc.cluster.local:9000"),
        ("my_service:8000", "my_service:8000"),
        ("h:007", "h:7"),
    ],
)
def test_valid_addresses_are_canonical(addr: str, canonical: str) -> None:
    assert parse_address(addr) == canonical


@pytest.mark.parametrize(
    "addr",
    [
        "",
        "localhost",
        "h:0",
        "h:70000",
        "h:http",
        "a b:80",
        ":80",
        "h:",
        "h:-1",
        "h:+80",
        "h:٨٠",
        "::1:80",
        "[::1]80",
        "[::1:80",
        "[not-ipv6]:80",
        "300.1.1.1:80",
        "1.2.3:80",
        "-bad.example:80",
        "bad-.example:80",
        "a..b:80",
        "h\0st:80",
        "höst:80",
        "x" * 300 + ":80",
        ("a" * 64) + ".example:80",
    ],
)
def test_invalid_addresses_name_the_value(addr: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        parse_address(addr)
    assert isinstance(info.value, ValueError)
    shown = addr if len(addr) < 40 else addr[:40]
    assert repr(shown)[1:-1] in str(info.value)


@pytest.mark.parametrize("addr", [None, b"h:80", 80, ("h", 80)])
def test_non_strings_are_type_errors(addr: object) -> None:
    with pytest.raises(TypeError):
        parse_address(addr)
