"""Pick + release overhead: dispatcher's shared balancer against an unshared per-process one.

The unshared balancer is ``Balancer(shared=False)``: the same code and bookkeeping, but its
state is a bytearray in process memory under a ``threading.Lock``, which is what each worker
has without shared state. Every round runs both side by side, for each process count; the
table shows medians over rounds, so a noisy machine shifts both columns alike.

    python scripts/bench_overhead.py                 # 8 backends, 1/2/8 processes
    python scripts/bench_overhead.py --rounds 7 --calls 100000 --backends 8 64
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from array import array
from typing import Any

from dispatcher import Balancer


class Null:
    """A backend that answers at once, so only the balancer's own work is measured."""

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> None:
        return None


def addresses(n: int) -> list[str]:
    return [f"10.0.{i // 250}.{i % 250 + 1}:80" for i in range(n)]


def worker(
    shared: Balancer | None, backends: int, strategy: str, calls: int, barrier: Any, out: Any
) -> None:
    balancer = shared or Balancer(
        addresses(backends), backend_factory=Null, strategy=strategy, shared=False
    )
    invoke, clock = balancer.invoke, time.perf_counter_ns
    for _ in range(1000):
        invoke(None)
    samples = array("q", bytes(8 * calls))
    barrier.wait()
    begin = clock()
    for i in range(calls):
        t0 = clock()
        invoke(None)
        samples[i] = clock() - t0
    elapsed = clock() - begin
    out.put((elapsed, sorted(samples)))
    balancer.close()


def run(variant: str, procs: int, backends: int, strategy: str, calls: int) -> dict[str, float]:
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    shared = None
    if variant == "dispatcher":
        shared = Balancer(
            addresses(backends), backend_factory=Null, strategy=strategy, max_workers=procs + 1
        )
    children = [
        ctx.Process(target=worker, args=(shared, backends, strategy, calls, barrier, out))
        for _ in range(procs)
    ]
    for child in children:
        child.start()
    results = [out.get() for _ in children]
    for child in children:
        child.join()
    if shared is not None:
        assert sum(s.requests for s in shared.snapshot()) == (calls + 1000) * procs
        assert sum(s.in_flight for s in shared.snapshot()) == 0
        shared.close()
    wall = max(elapsed for elapsed, _ in results)
    merged = sorted(x for _, samples in results for x in samples)
    n = len(merged)
    return {
        "ns": statistics.mean(elapsed / calls for elapsed, _ in results),
        "mps": procs * calls / wall * 1e9,
        "p50": merged[n // 2] / 1e3,
        "p99": merged[int(n * 0.99)] / 1e3,
        "p999": merged[int(n * 0.999)] / 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50_000, help="per process per round")
    parser.add_argument("--backends", type=int, nargs="+", default=[8])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--strategy", default="least_loaded")
    args = parser.parse_args()
    variants = ["unshared", "dispatcher"]
    cpus = multiprocessing.cpu_count()
    print(
        f"pick + release, strategy={args.strategy}, {args.calls} calls/process, "
        f"median of {args.rounds} rounds, {cpus} CPUs"
    )
    header = (
        f"{'backends':>8} {'procs':>5} {'variant':>10} {'ns/pick':>8} {'Mpicks/s':>9} "
        f"{'p50 us':>7} {'p99 us':>7} {'p99.9 us':>9} {'vs unshared':>11}"
    )
    print(header)
    print("-" * len(header))
    for backends in args.backends:
        one_process: dict[str, float] = {}
        for procs in args.procs:
            rounds: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for variant in variants:
                    rounds[variant].append(run(variant, procs, backends, args.strategy, args.calls))
            medians = {
                v: {k: statistics.median(r[k] for r in rounds[v]) for k in rounds[v][0]}
                for v in variants
            }
            for variant in variants:
                m = medians[variant]
                ratio = m["ns"] / medians["unshared"]["ns"]
                print(
                    f"{backends:>8} {procs:>5} {variant:>10} {m['ns']:>8.0f} "
                    f"{m['mps'] / 1e6:>9.2f} {m['p50']:>7.2f} {m['p99']:>7.2f} "
                    f"{m['p999']:>9.2f} {ratio:>10.2f}x"
                )
            if procs == 1:
                one_process = medians["dispatcher"]
            elif one_process:
                scale = medians["dispatcher"]["mps"] / one_process["mps"]
                print(
                    f"{'':>14} dispatcher aggregate at {procs} processes = {scale:.2f}x one process"
                )


if __name__ == "__main__":
    main()
