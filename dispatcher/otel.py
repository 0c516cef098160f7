"""OpenTelemetry metrics of a balancer: the Prometheus collector's numbers, as observable
instruments, for the whole server, from any one of its processes.

::

    from dispatcher.otel import BalancerMetrics

    metrics = BalancerMetrics(balancer, label="users")   # on the global MeterProvider

Each collection reads the shared segment once (one snapshot serves every instrument of that
collection), so the numbers are those of every process of the server. Like
`dispatcher.prometheus.BalancerCollector`, it holds a `Segment` handle and never picks: it
claims no worker row and changes no count.

Instruments, on the meter ``dispatcher``, with attributes ``balancer`` and ``backend``:

================================  ======================  =========  ======================
``dispatcher.backend.requests``   ObservableCounter       {request}  calls with an outcome
``dispatcher.backend.failures``   ObservableCounter       {request}  calls that raised
``dispatcher.backend.in_flight``  ObservableUpDownCounter  {request}  calls under way
``dispatcher.backend.ejected``    ObservableGauge         1          1 while ejected
``dispatcher.backend.ejections``  ObservableCounter       {ejection} passive ejections
``dispatcher.backend.latency``    ObservableGauge         s          p50/p90/p99, recent
``dispatcher.retries_in_flight``  ObservableUpDownCounter  {retry}    (``balancer`` only)
``dispatcher.workers``            ObservableUpDownCounter  {process}  (``balancer`` only)
================================  ======================  =========  ======================

OpenTelemetry has no asynchronous histogram, so the latency is given as the percentiles of
the recent window (`BackendStats.p50`, ``p90``, ``p99``, about the last 10 s), one point per
``quantile`` attribute (``0.5``, ``0.9``, ``0.99``), and none while a backend had no call
in the window. An OpenTelemetry Prometheus exporter names the instruments as
`dispatcher.prometheus` does (``dispatcher_backend_requests_total``...).

`opentelemetry-api` is an optional dependency (``pip install 'dispatcher-lb[otel]'``);
``import dispatcher`` never imports this module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ._balancer import Balancer, open_for_export
from ._view import BackendStats
from .errors import SegmentError

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Observation
except ModuleNotFoundError:  # optional: BalancerMetrics says what to install
    metrics = None  # type: ignore[assignment]

__all__ = ["BalancerMetrics"]

REUSE_S = 0.5
"""How long the snapshot the first instrument's callback takes (a collection calls the
callbacks in the order the instruments were made) serves the others: one read per
collection."""
LOCK_WAIT_S = 1.0
QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"))


class BalancerMetrics:
    """Observable instruments reporting one balancer's shared numbers.

    `balancer` is a shared `Balancer` or its segment's name; `label` the value of the
    ``balancer`` attribute (default: the segment's name); `meter_provider` the provider to
    register on (default: the global one). `close` gives the segment handle back: the
    instruments then report nothing (OpenTelemetry cannot remove them). Making them turns
    latency recording on in every process of the balancer, as `BalancerCollector` does.
    """

    def __init__(
        self,
        balancer: Balancer | str,
        *,
        label: str | None = None,
        meter_provider: Any = None,
    ) -> None:
        if metrics is None:
            raise ModuleNotFoundError(
                "BalancerMetrics needs opentelemetry-api: pip install 'dispatcher-lb[otel]'",
                name="opentelemetry",
            )
        self._segment, self.label = open_for_export(balancer, label)
        self._closed = False
        self._lock = threading.Lock()
        self._taken = float("-inf")
        self._stats: list[BackendStats] = []
        meter = metrics.get_meter("dispatcher", meter_provider=meter_provider)
        backend = self._per_backend
        meter.create_observable_counter(
            "dispatcher.backend.requests",
            [backend(lambda b: b.requests, fresh=True)],
            unit="{request}",
            description="Calls to the backend that ended with an answer or a failure.",
        )
        meter.create_observable_counter(
            "dispatcher.backend.failures",
            [backend(lambda b: b.failures)],
            unit="{request}",
            description="Calls to the backend that raised (connection error, timeout, 5xx).",
        )
        meter.create_observable_up_down_counter(
            "dispatcher.backend.in_flight",
            [backend(lambda b: b.in_flight)],
            unit="{request}",
            description="Calls under way on the backend now, from every process.",
        )
        meter.create_observable_gauge(
            "dispatcher.backend.ejected",
            [backend(lambda b: int(b.ejected))],
            unit="1",
            description="1 while the backend is passively ejected, else 0.",
        )
        meter.create_observable_counter(
            "dispatcher.backend.ejections",
            [backend(lambda b: b.times_ejected)],
            unit="{ejection}",
            description="Passive ejections of the backend.",
        )
        meter.create_observable_gauge(
            "dispatcher.backend.latency",
            [self._latency],
            unit="s",
            description="Latency percentiles of the backend over the recent window (~10 s).",
        )
        meter.create_observable_up_down_counter(
            "dispatcher.retries_in_flight",
            [self._header(lambda: max(self._segment.state.retries(), 0))],
            unit="{retry}",
            description="Retries under way in every process, against the shared budget.",
        )
        meter.create_observable_up_down_counter(
            "dispatcher.workers",
            [self._header(lambda: len(self._segment.workers()))],
            unit="{process}",
            description="Live processes that have picked through the balancer.",
        )

    def _snapshot(self, fresh: bool = False) -> list[BackendStats]:
        """The stats of this collection: a new snapshot if `fresh` or if the last one is
        older than `REUSE_S`, else the last one."""
        with self._lock:
            if fresh or time.monotonic() - self._taken >= REUSE_S:
                self._stats = self._read()
                self._taken = time.monotonic()
            return self._stats

    def _read(self) -> list[BackendStats]:
        segment = self._segment
        if self._closed or segment.closed_by_owner:
            return []
        try:
            return segment.snapshot(timeout=LOCK_WAIT_S)
        except SegmentError:
            return []

    def _per_backend(
        self, value: Callable[[BackendStats], float], fresh: bool = False
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(value(b), {"balancer": self.label, "backend": b.addr})
                for b in self._snapshot(fresh)
            ]

        return callback

    def _header(
        self, value: Callable[[], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            if self._closed or self._segment.closed_by_owner:
                return []
            return [Observation(value(), {"balancer": self.label})]

        return callback

    def _latency(self, options: CallbackOptions) -> Iterable[Observation]:
        found = []
        for b in self._snapshot():
            for quantile, field in QUANTILES:
                seconds = getattr(b, field)
                if seconds is not None:
                    attributes = {"balancer": self.label, "backend": b.addr, "quantile": quantile}
                    found.append(Observation(seconds, attributes))
        return found

    def close(self) -> None:
        """Give back the segment handle; the instruments report nothing from then on."""
        if not self._closed:
            self._closed = True
            self._segment.close()

    def __repr__(self) -> str:
        return f"<BalancerMetrics {self.label!r} of {self._segment.name}>"
