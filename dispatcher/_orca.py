"""Load that a backend reports about itself: ORCA's ``endpoint-load-metrics`` header (gRPC A51).

A backend that answers with, e.g.::

    endpoint-load-metrics: TEXT cpu_utilization=0.3, rps_fractional=120, eps=2

tells every client what it serves and how busy it is, whichever host the load came from. The
``TEXT`` form is comma-separated ``name=value`` pairs (Envoy's parser also accepts
``name:value``; both are read here); ``JSON`` is an object with the same names. Names are the
fields of ``xds.data.orca.v3.OrcaLoadReport``: ``cpu_utilization``, ``mem_utilization``,
``application_utilization``, ``rps_fractional``, ``eps``, and the maps ``named_metrics.<key>``
and ``utilization.<key>``. The binary form (protobuf) is not read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

HEADER = "endpoint-load-metrics"

_SCALARS = (
    "cpu_utilization",
    "mem_utilization",
    "application_utilization",
    "rps_fractional",
    "eps",
)
_MAPS = ("named_metrics", "utilization")


@dataclass(frozen=True)
class LoadReport:
    """One backend's report of its own load: utilizations as fractions (may exceed 1 for CPU),
    rates per second. Zero means "not reported"."""

    cpu_utilization: float = 0.0
    mem_utilization: float = 0.0
    application_utilization: float = 0.0
    rps_fractional: float = 0.0
    """Requests per second the backend served (from every client)."""
    eps: float = 0.0
    """Errors per second it answered."""
    named_metrics: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    utilization: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def load(self) -> float:
        """The utilization to weigh the backend by, as gRPC's weighted round robin picks it:
        the application's own figure if reported, else the CPU's."""
        return self.application_utilization or self.cpu_utilization


def parse_load_report(value: str) -> LoadReport | None:
    """The report in an ``endpoint-load-metrics`` header value; None if it cannot be read
    (binary, malformed, a NaN, a negative or a name ORCA does not have)."""
    kind, _, body = value.strip().partition(" ")
    try:
        if kind == "TEXT":
            pairs = _text_pairs(body)
        elif kind == "JSON":
            pairs = _json_pairs(body)
        else:
            return None
        return _report(pairs)
    except (ValueError, TypeError):
        return None


def _text_pairs(body: str) -> list[tuple[str, float]]:
    pairs = []
    for item in body.split(","):
        if not item.strip():
            continue
        equals, colon = item.find("="), item.find(":")
        cut = min(i for i in (equals, colon) if i >= 0) if max(equals, colon) >= 0 else -1
        if cut < 0:
            raise ValueError(f"no value in {item!r}")
        pairs.append((item[:cut].strip(), float(item[cut + 1 :])))
    return pairs


def _json_pairs(body: str) -> list[tuple[str, float]]:
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("not an object")
    pairs: list[tuple[str, float]] = []
    for name, value in data.items():
        if name in _MAPS and isinstance(value, dict):
            pairs.extend((f"{name}.{key}", float(v)) for key, v in value.items())
        else:
            pairs.append((name, float(value)))
    return pairs


def _report(pairs: list[tuple[str, float]]) -> LoadReport:
    scalars: dict[str, float] = {}
    maps: dict[str, dict[str, float]] = {name: {} for name in _MAPS}
    for name, value in pairs:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} is {value}")
        prefix, dot, key = name.partition(".")
        if dot and prefix in maps and key:
            maps[prefix][key] = value
        elif name in _SCALARS:
            scalars[name] = value
        else:
            raise ValueError(f"{name!r} is not an ORCA metric")
    return LoadReport(
        **scalars,
        named_metrics=MappingProxyType(maps["named_metrics"]),
        utilization=MappingProxyType(maps["utilization"]),
    )
