"""`dispatcher.otel.BalancerMetrics` read by the OpenTelemetry SDK's in-memory reader."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest

from dispatcher import Balancer
from tests import helpers
from tests.helpers import Echo, FakeClock

pytest.importorskip("opentelemetry.sdk.metrics")
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from dispatcher.otel import BalancerMetrics

ADDRS = ["127.0.0.1:7501", "127.0.0.1:7502"]


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], float]]]:
    """Every data point the reader collects now, by instrument name."""
    data = reader.get_metrics_data()
    found: dict[str, list[tuple[dict[str, Any], float]]] = {}
    if data is None:  # no instrument had a point
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "dispatcher"
            for metric in scope.metrics:
                found[metric.name] = [
                    (dict(point.attributes or {}), point.value)  # type: ignore[union-attr]
                    for point in metric.data.data_points
                ]
    return found


def by_backend(found: list[tuple[dict[str, Any], float]]) -> dict[str, float]:
    return {attributes["backend"]: value for attributes, value in found}


def test_instruments_report_every_processs_calls() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    calls = 30
    ctx = multiprocessing.get_context("fork")
    with (
        FakeClock().use(
            Balancer(ADDRS, backend_factory=Echo, monitor=False, failure_threshold=2, latency=True)
        ) as balancer,
    ):
        instruments = BalancerMetrics(balancer, label="users", meter_provider=provider)
        children = [
            ctx.Process(target=helpers.call_with_failures, args=(balancer, calls)) for _ in range(2)
        ]
        for child in children:
            child.start()
        for child in children:
            child.join(60)
            assert child.exitcode == 0
        found = points(reader)
        shared = {s.addr: s for s in balancer.snapshot()}
        for _ in range(4):  # two in a row on each: one backend is ejected
            with pytest.raises(ConnectionError):
                balancer.invoke("fail")
        later = points(reader)
        instruments.close()
        assert points(reader) == {}
    provider.shutdown()
    assert set(found) == {
        "dispatcher.backend.requests",
        "dispatcher.backend.failures",
        "dispatcher.backend.in_flight",
        "dispatcher.backend.ejected",
        "dispatcher.backend.ejections",
        "dispatcher.backend.latency",
        "dispatcher.retries_in_flight",
        "dispatcher.workers",
    }
    requests = by_backend(found["dispatcher.backend.requests"])
    assert requests == {addr: shared[addr].requests for addr in ADDRS}
    assert sum(requests.values()) == 2 * calls
    assert sum(by_backend(found["dispatcher.backend.failures"]).values()) == 2 * len(
        range(0, calls, 3)
    )
    assert by_backend(found["dispatcher.backend.in_flight"]) == dict.fromkeys(ADDRS, 0)
    assert found["dispatcher.workers"] == [({"balancer": "users"}, 0)]  # the children exited
    assert found["dispatcher.retries_in_flight"] == [({"balancer": "users"}, 0)]
    assert {a["balancer"] for name in found for a, _ in found[name]} == {"users"}
    quantiles = sorted(
        (a["backend"], a["quantile"]) for a, _ in found["dispatcher.backend.latency"]
    )
    assert quantiles == sorted((addr, q) for addr in ADDRS for q in ("0.5", "0.9", "0.99"))
    ejected = by_backend(later["dispatcher.backend.ejected"])
    assert sorted(ejected.values()) == [0, 1]
    assert by_backend(later["dispatcher.backend.ejections"]) == ejected
    assert later["dispatcher.workers"] == [({"balancer": "users"}, 1)]  # this process picked


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError):
        BalancerMetrics(3.5)  # type: ignore[arg-type]
    with (
        Balancer(ADDRS, backend_factory=Echo, monitor=False, latency=True) as balancer,
        pytest.raises(TypeError, match="label"),
    ):
        BalancerMetrics(balancer, label=7)  # type: ignore[arg-type]
