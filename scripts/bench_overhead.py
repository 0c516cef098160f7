"""Pick + release overhead: dispatcher's shared balancer against what users would use instead.

Every variant does the same least-loaded pick + release over N backends that answer at once, so
only the cost of keeping one view of load is measured:

* ``unshared``: ``Balancer(shared=False)``, the same code and bookkeeping with its state in a
  bytearray under a ``threading.Lock``: what each worker has without shared state;
* ``dispatcher``: one shared ``Balancer``, its state in shared memory;
* the shared-state peers of `_bench_peers.py`: a ``multiprocessing.Manager`` list with a Manager
  lock, a ``BaseManager`` object that picks server-side (their best case), and Redis with a Lua
  script over loopback TCP and a unix socket (needs ``redis-server`` and the ``bench`` extra).

Every round runs all variants side by side for each backend and process count; the table shows
medians over rounds (so a noisy machine shifts every column alike) and each variant's time per
call as a multiple of dispatcher's. The peers run at ``--peer-procs`` only, with fewer calls.

    python scripts/bench_overhead.py                  # 8 and 64 backends; about 2-3 minutes
    python scripts/bench_overhead.py --no-peers --procs 1 2 8 --backends 8
    python scripts/bench_overhead.py --rounds 7 --calls 100000 --peer-calls 5000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _bench_peers import PEERS, Peer, peer_factory

from dispatcher import Balancer

DOCS = Path(__file__).resolve().parent.parent / "docs"
WARMUP = 1000
PEER_WARMUP = 100
TARGET = 100.0
"""The issue's target: dispatcher at least this many times faster than the best peer."""


class Null:
    """A backend that answers at once, so only the balancer's own work is measured."""

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> None:
        return None


def addresses(n: int) -> list[str]:
    return [f"10.0.{i // 250}.{i % 250 + 1}:80" for i in range(n)]


def timed(call: Any, calls: int, barrier: Any, out: Any) -> None:
    """Time `calls` calls one by one after every process reached the barrier; report them."""
    clock = time.perf_counter_ns
    samples = array("q", bytes(8 * calls))
    barrier.wait()
    begin = clock()
    for i in range(calls):
        t0 = clock()
        call()
        samples[i] = clock() - t0
    elapsed = clock() - begin
    out.put((elapsed, sorted(samples)))


def worker(
    shared: Balancer | None, backends: int, strategy: str, calls: int, barrier: Any, out: Any
) -> None:
    balancer = shared or Balancer(
        addresses(backends), backend_factory=Null, strategy=strategy, shared=False
    )
    invoke = balancer.invoke
    for _ in range(WARMUP):
        invoke(None)
    timed(lambda: invoke(None), calls, barrier, out)
    balancer.close()


def peer_worker(peer: Peer, calls: int, barrier: Any, out: Any) -> None:
    pick, release = peer.client()

    def call() -> None:
        release(pick())

    for _ in range(PEER_WARMUP):
        call()
    timed(call, calls, barrier, out)


def run(
    variant: str, procs: int, backends: int, strategy: str, calls: int, make_peer: Any
) -> dict[str, float]:
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    shared: Balancer | None = None
    peer: Peer | None = None
    if variant == "dispatcher":
        shared = Balancer(
            addresses(backends),
            backend_factory=Null,
            strategy=strategy,
            max_workers=procs + 1,
            monitor=False,
        )
    if variant in PEERS:
        peer = make_peer(variant, ctx, backends)
        target, args = peer_worker, (peer, calls, barrier, out)
    else:
        target, args = worker, (shared, backends, strategy, calls, barrier, out)
    children = [ctx.Process(target=target, args=args) for _ in range(procs)]
    for child in children:
        child.start()
    results = [out.get() for _ in children]
    for child in children:
        child.join()
    if shared is not None:
        assert sum(s.requests for s in shared.snapshot()) == (calls + WARMUP) * procs
        assert sum(s.in_flight for s in shared.snapshot()) == 0
        shared.close()
    if peer is not None:
        assert peer.in_flight() == 0, f"{variant} leaked in-flight counts"
        peer.close()
    wall = max(elapsed for elapsed, _ in results)
    merged = sorted(x for _, samples in results for x in samples)
    n = len(merged)
    return {
        "us": statistics.mean(elapsed / calls for elapsed, _ in results) / 1e3,
        "cps": procs * calls / wall * 1e9,
        "p50": merged[n // 2] / 1e3,
        "p99": merged[int(n * 0.99)] / 1e3,
        "p999": merged[int(n * 0.999)] / 1e3,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Aggregate calls/s against processes, one panel per backend count, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["backends"] for r in rows})
    fig, axes = plt.subplots(1, len(counts), figsize=(5.5 * len(counts), 4.2), squeeze=False)
    for ax, backends in zip(axes[0], counts, strict=True):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            points = sorted(
                (r["procs"], r["cps"])
                for r in rows
                if r["variant"] == variant and r["backends"] == backends
            )
            style = "o-" if variant in ("dispatcher", "unshared") else "s--"
            ax.plot([p for p, _ in points], [c for _, c in points], style, label=variant)
        ax.set_yscale("log")
        ax.set_xlabel("worker processes")
        ax.set_ylabel("pick + release calls/s, all processes (median)")
        ax.set_title(f"least-loaded over {backends} backends")
        ax.set_xticks(sorted({r["procs"] for r in rows}))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50_000, help="per process per round")
    parser.add_argument(
        "--peer-calls", type=int, default=2_000, help="per process per round, for the peers"
    )
    parser.add_argument("--backends", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--peer-procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    parser.add_argument("--no-peers", dest="peers", action="store_const", const=[])
    parser.add_argument("--strategy", default="least_loaded")
    parser.add_argument("--plot", type=Path, default=DOCS / "bench_overhead_scaling.png")
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None)
    parser.add_argument("--json", type=Path, help="also write every median to this file")
    args = parser.parse_args()

    with peer_factory(args.peers) as (peers, make_peer):
        rows = measure(args, peers, make_peer)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)


def measure(args: argparse.Namespace, peers: list[str], make_peer: Any) -> list[dict[str, Any]]:
    cpus = multiprocessing.cpu_count()
    print(
        f"pick + release, strategy={args.strategy}, {args.calls} calls/process "
        f"({args.peer_calls} for peers), median of {args.rounds} rounds, {cpus} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    header = (
        f"{'backends':>8} {'procs':>5} {'variant':>14} {'us/call':>8} {'calls/s':>9} "
        f"{'p50 us':>7} {'p99 us':>8} {'p99.9 us':>9} {'x dispatcher':>12}"
    )
    print(header)
    print("-" * len(header))
    rows: list[dict[str, Any]] = []
    verdicts: list[str] = []
    for backends in args.backends:
        one_process: dict[str, float] = {}
        for procs in args.procs:
            variants = ["unshared", "dispatcher"]
            if procs in args.peer_procs:
                variants += peers
            rounds: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for variant in variants:
                    calls = args.peer_calls if variant in PEERS else args.calls
                    rounds[variant].append(
                        run(variant, procs, backends, args.strategy, calls, make_peer)
                    )
            medians = {
                v: {k: statistics.median(r[k] for r in rounds[v]) for k in rounds[v][0]}
                for v in variants
            }
            # The ratio of medians of per-round ratios: each round's variants ran side by side.
            ratios = {
                v: statistics.median(
                    a["us"] / d["us"] for a, d in zip(rounds[v], rounds["dispatcher"], strict=True)
                )
                for v in variants
            }
            for variant in variants:
                m = medians[variant]
                rows.append(
                    {"backends": backends, "procs": procs, "variant": variant, **m,
                     "x_dispatcher": ratios[variant]}
                )  # fmt: skip
                print(
                    f"{backends:>8} {procs:>5} {variant:>14} {m['us']:>8.2f} "
                    f"{m['cps']:>9.0f} {m['p50']:>7.2f} {m['p99']:>8.2f} "
                    f"{m['p999']:>9.2f} {ratios[variant]:>11.2f}x"
                )
            if procs == 1:
                one_process = medians["dispatcher"]
            elif one_process:
                scale = medians["dispatcher"]["cps"] / one_process["cps"]
                print(
                    f"{'':>14} dispatcher aggregate at {procs} processes = {scale:.2f}x one process"
                )
            present = [v for v in variants if v in PEERS]
            if present:
                best = min(present, key=lambda v: medians[v]["us"])
                ratio = ratios[best]
                verdicts.append(
                    f"{backends} backends, {procs} processes: best peer {best} "
                    f"{medians[best]['us']:.1f} us, dispatcher {medians['dispatcher']['us']:.2f} us"
                    f" -> {ratio:.0f}x faster (target {TARGET:.0f}x: "
                    f"{'met' if ratio >= TARGET else 'not met'})"
                )
    for verdict in verdicts:
        print(verdict)
    return rows


if __name__ == "__main__":
    main()
