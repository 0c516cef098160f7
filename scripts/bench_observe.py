"""What observing a balancer costs: a snapshot (with its recent window), and a Prometheus
scrape of `BalancerCollector` against the alternative a gunicorn app has without it,
prometheus_client's own labelled metrics (a Counter, a Gauge and a Histogram per backend,
the same series) collected in the same process.

Each round times both side by side; the table shows medians over rounds, in microseconds.

    python scripts/bench_observe.py
    python scripts/bench_observe.py --rounds 9 --backends 8 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dispatcher import BUCKET_BOUNDS, Balancer
from dispatcher.prometheus import HIGHEST_BOUND_S, LOWEST_BOUND_S, BalancerCollector


class Answer:
    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> str:
        return self.addr


def median_us(work: Callable[[], object], times: int) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter_ns()
        work()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def app_registry(addrs: list[str]) -> CollectorRegistry:
    """prometheus_client's own metrics with the same series, filled in."""
    registry = CollectorRegistry()
    labels = ["balancer", "backend"]
    bounds = [b for b in BUCKET_BOUNDS if LOWEST_BOUND_S <= b <= HIGHEST_BOUND_S]
    requests = Counter("app_requests", "", labels, registry=registry)
    failures = Counter("app_failures", "", labels, registry=registry)
    ejections = Counter("app_ejections", "", labels, registry=registry)
    in_flight = Gauge("app_in_flight", "", labels, registry=registry)
    ejected = Gauge("app_ejected", "", labels, registry=registry)
    latency = Histogram("app_latency_seconds", "", labels, buckets=bounds, registry=registry)
    for addr in addrs:
        for metric in (requests, failures, ejections, in_flight, ejected):
            metric.labels("app", addr)
        for _ in range(20):
            latency.labels("app", addr).observe(0.005)
    return registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", type=int, nargs="+", default=[8, 64])
    args = parser.parse_args()
    print(
        "| backends | snapshot() | scrape, BalancerCollector | scrape, app's own metrics | ratio |"
    )
    print("| ---: | ---: | ---: | ---: | ---: |")
    for count in args.backends:
        addrs = [f"127.0.0.1:{7000 + i}" for i in range(count)]
        with Balancer(addrs, backend_factory=Answer, monitor=False) as balancer:
            for _ in range(20 * count):
                balancer.invoke(None)
            ours = CollectorRegistry()
            collector = BalancerCollector(balancer, label="app")
            ours.register(collector)
            theirs = app_registry(addrs)
            snapshot, scrape, alternative = [], [], []
            for _ in range(args.rounds):
                snapshot.append(median_us(balancer.snapshot, 200))
                scrape.append(median_us(lambda: generate_latest(ours), 50))  # noqa: B023
                alternative.append(median_us(lambda: generate_latest(theirs), 50))  # noqa: B023
            collector.close()
        a, b, c = (statistics.median(x) for x in (snapshot, scrape, alternative))
        print(f"| {count} | {a:.0f} us | {b:.0f} us | {c:.0f} us | {b / c:.2f}x |")


if __name__ == "__main__":
    main()
