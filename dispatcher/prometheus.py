"""Prometheus metrics of a balancer, for the whole server, from any one of its processes.

::

    from prometheus_client import REGISTRY
    from dispatcher.prometheus import BalancerCollector

    REGISTRY.register(BalancerCollector(balancer, label="users"))

The collector reads the shared segment at each scrape, so the numbers are those of every
process of the server, whichever process serves ``/metrics``: there is nothing to merge and
no per-pid file, with or without prometheus_client's multiprocess mode (whose
``MultiProcessCollector`` it sits beside on the same registry). It opens the segment as a
`Segment` handle and never picks, so it claims no worker row and changes no count; each
scrape takes the shared lock only for the copy a snapshot makes.

Exported, with labels ``balancer`` and ``backend`` (``host:port``):

=====================================  =========  ==========================================
``dispatcher_backend_requests_total``  counter    calls that ended with an answer or a failure
``dispatcher_backend_failures_total``  counter    calls that raised
``dispatcher_backend_in_flight``       gauge      calls under way now
``dispatcher_backend_ejected``         gauge      1 while passively ejected, else 0
``dispatcher_backend_ejections_total`` counter    passive ejections
``dispatcher_backend_latency_seconds`` histogram  latency of the calls with an outcome
``dispatcher_retries_in_flight``       gauge      retries under way (label ``balancer`` only)
``dispatcher_workers``                 gauge      live processes that have picked (``balancer``)
=====================================  =========  ==========================================

The histogram's buckets are the shared histogram's own (`dispatcher.BUCKET_BOUNDS`, two per
power of two), from `LOWEST_BOUND_S` to `HIGHEST_BOUND_S`, so every ``le`` count is exact.
It has no ``_sum`` and so, as prometheus_client writes histograms, no ``_count``: the shared
state keeps bucket counts, not a total of latencies. ``histogram_quantile`` works on the
buckets; the count of calls is ``dispatcher_backend_requests_total``. Counters restart from 0
when a backend is registered again.

`prometheus_client` is an optional dependency (``pip install 'dispatcher-lb[prometheus]'``);
``import dispatcher`` never imports this module.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from ._balancer import Balancer, open_for_export
from ._latency import BUCKET_BOUNDS
from .errors import SegmentError

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
except ModuleNotFoundError:  # optional: BalancerCollector says what to install
    CounterMetricFamily = None  # type: ignore[assignment,misc]

__all__ = ["HIGHEST_BOUND_S", "LOWEST_BOUND_S", "BalancerCollector"]

LOWEST_BOUND_S = 1.6e-5
"""The smallest ``le`` exported (about 16 us): every faster call is counted in it."""
HIGHEST_BOUND_S = 60.0
"""The largest ``le`` exported: every finite shared bound is below it (the last is 51.5 s)."""
LOCK_WAIT_S = 1.0
"""The longest a scrape waits for the shared lock before it fails (`LockBusy`)."""

_EXPORTED = [
    (bucket, repr(bound))  # as Go writes these floats, and prometheus_client after it
    for bucket, bound in enumerate(BUCKET_BOUNDS)
    if LOWEST_BOUND_S <= bound <= HIGHEST_BOUND_S
]
_BACKEND = ["balancer", "backend"]


class BalancerCollector:
    """A prometheus_client collector of one balancer's shared numbers.

    `balancer` is a shared `Balancer` or the name of its segment (`Balancer.name`, what
    ``dispatcher top`` takes); `label` is the value of the ``balancer`` label (default: the
    segment's name, which changes each time the server starts). `close` gives the segment
    handle back; once the owner closed the balancer, a scrape reports nothing for it. Making
    one turns latency recording on in every process of the balancer (`Balancer(latency=...)`):
    the latency histogram is what it is read for.
    """

    def __init__(self, balancer: Balancer | str, *, label: str | None = None) -> None:
        if CounterMetricFamily is None:
            raise ModuleNotFoundError(
                "BalancerCollector needs prometheus_client: "
                "pip install 'dispatcher-lb[prometheus]'",
                name="prometheus_client",
            )
        self._segment, self.label = open_for_export(balancer, label)
        self._closed = False

    def describe(self) -> list[Metric]:
        """The metric families, without samples: what a registry checks for clashes."""
        return list(_families())

    def collect(self) -> Iterator[Metric]:
        """The families with one sample per backend, read from the shared segment now."""
        segment = self._segment
        if self._closed or segment.closed_by_owner:
            return
        try:
            stats = segment.snapshot(timeout=LOCK_WAIT_S)
        except SegmentError:
            return
        (
            requests,
            failures,
            in_flight,
            ejected,
            ejections,
            latency,
            retries,
            workers,
        ) = _families()
        for b in stats:
            labels = [self.label, b.addr]
            requests.add_metric(labels, b.requests)
            failures.add_metric(labels, b.failures)
            in_flight.add_metric(labels, b.in_flight)
            ejected.add_metric(labels, 1 if b.ejected else 0)
            ejections.add_metric(labels, b.times_ejected)
            cumulative = list(itertools.accumulate(b.histogram))
            buckets: list[tuple[str, float]] = [
                (le, cumulative[bucket]) for bucket, le in _EXPORTED
            ]
            buckets.append(("+Inf", cumulative[-1]))
            latency.add_metric(labels, buckets, None)
        retries.add_metric([self.label], max(segment.state.retries(), 0))
        workers.add_metric([self.label], len(segment.workers()))
        yield from (requests, failures, in_flight, ejected, ejections, latency, retries, workers)

    def close(self) -> None:
        """Give back the segment handle; later scrapes report nothing."""
        if not self._closed:
            self._closed = True
            self._segment.close()

    def __repr__(self) -> str:
        return f"<BalancerCollector {self.label!r} of {self._segment.name}>"


def _families() -> tuple[Any, ...]:
    return (
        CounterMetricFamily(
            "dispatcher_backend_requests",
            "Calls to the backend that ended with an answer or a failure, from every process.",
            labels=_BACKEND,
        ),
        CounterMetricFamily(
            "dispatcher_backend_failures",
            "Calls to the backend that raised (connection error, timeout, 5xx).",
            labels=_BACKEND,
        ),
        GaugeMetricFamily(
            "dispatcher_backend_in_flight",
            "Calls under way on the backend now, from every process.",
            labels=_BACKEND,
        ),
        GaugeMetricFamily(
            "dispatcher_backend_ejected",
            "1 while the backend is passively ejected after consecutive failures, else 0.",
            labels=_BACKEND,
        ),
        CounterMetricFamily(
            "dispatcher_backend_ejections",
            "Passive ejections of the backend.",
            labels=_BACKEND,
        ),
        HistogramMetricFamily(
            "dispatcher_backend_latency_seconds",
            "Latency of the backend's calls with an outcome, from the shared histogram.",
            labels=_BACKEND,
        ),
        GaugeMetricFamily(
            "dispatcher_retries_in_flight",
            "Retries under way in every process, against the shared retry budget.",
            labels=["balancer"],
        ),
        GaugeMetricFamily(
            "dispatcher_workers",
            "Live processes that have picked through the balancer (that hold a worker row).",
            labels=["balancer"],
        ),
    )
