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

# Weights from reports, as gRPC's weighted round robin computes them (gRFC A58).
WEIGHT_PERIOD_NS = 1_000_000_000
"""How often the weights are computed (once per host)."""
BLACKOUT_NS = 10_000_000_000
"""A backend's reports are trusted once it has been reporting for this long."""
REPORT_EXPIRY_NS = 180_000_000_000
"""A report this old is forgotten, and the next one starts a new blackout."""
ERROR_PENALTY = 1.0
"""A58's ``error_utilization_penalty``: errors per request cost this much utilization."""
MIN_RATIO, MAX_RATIO = 0.01, 10.0
"""Weights are kept within these multiples of the mean, as gRPC's scheduler does."""

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


@dataclass(frozen=True, slots=True)
class Reported:
    """What one backend reported, and what this host saw of it, over the last period."""

    load: float
    """Its reported utilization (application's, else CPU's); 0.0: none."""
    rps: float
    """Its reported requests per second; 0.0: none."""
    eps: float
    since_ns: int
    """When its current run of reports began."""
    last_ns: int
    """When its last report arrived; 0: never."""
    host_rps: float = 0.0
    """Requests per second this host sent it, for a backend that reports no rates."""
    host_eps: float = 0.0


@dataclass(frozen=True)
class Weighing:
    """How reports become weights: gRPC's weighted round robin's settings (gRFC A58)."""

    blackout_ns: int = BLACKOUT_NS
    expiry_ns: int = REPORT_EXPIRY_NS
    error_penalty: float = ERROR_PENALTY

    def weight(self, report: Reported, now_ns: int) -> float:
        """``qps / (utilization + eps / qps * penalty)``; 0.0 when not known (no recent
        report, still in its blackout, or no rate and no load to weigh)."""
        if not report.last_ns or now_ns - report.last_ns >= self.expiry_ns:
            return 0.0
        if now_ns - report.since_ns < self.blackout_ns:
            return 0.0
        rps = report.rps or report.host_rps
        eps = report.eps if report.rps else report.host_eps
        if rps <= 0.0 or report.load <= 0.0:
            return 0.0
        return rps / (report.load + eps / rps * self.error_penalty)

    def weights(self, reports: list[Reported], now_ns: int) -> list[float]:
        """Every backend's weight: see `weights_from`."""
        return weights_from([self.weight(report, now_ns) for report in reports])


def weights_from(weights: list[float]) -> list[float]:
    """Known weights within [MIN_RATIO, MAX_RATIO] x their mean, unknown ones (0.0) at the
    mean; all 0.0 (use the configured weights) while fewer than two are known."""
    known = [w for w in weights if w > 0.0]
    if len(known) < 2:
        return [0.0] * len(weights)
    mean = sum(known) / len(known)
    low, high = MIN_RATIO * mean, MAX_RATIO * mean
    return [min(max(w, low), high) if w > 0.0 else mean for w in weights]
