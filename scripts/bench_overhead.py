"""Pick + release overhead: dispatcher's shared balancer against what users would use instead.

Every variant does the same least-loaded pick + release over N backends that answer at once, so
only the cost of keeping a view of load is measured:

* ``minimal``: a per-process least-loaded balancer as a careful worker writes it for itself: a
  list of counts, ``counts.index(min(counts))``, a ``threading.Lock`` around the pick and the
  release (a worker may run threads), the release in ``finally``. The yardstick of the ratios;
* ``minimal_unlocked``: the same without the lock, right only in a single-threaded worker;
* ``unshared``: ``Balancer(shared=False)``, dispatcher's code and bookkeeping with its state in
  a bytearray under a ``threading.Lock``: what each worker has without shared state;
* ``dispatcher``: one shared ``Balancer`` with the compiled core (skipped if it is not built);
* ``dispatcher_py``: the same with ``DISPATCHER_PURE_PYTHON=1`` (the pure Python core);
* the shared-state peers of `_bench_peers.py`: a ``multiprocessing.Manager`` list with a Manager
  lock, a ``BaseManager`` object that picks server-side (their best case), and Redis with a Lua
  script over loopback TCP and a unix socket (needs ``redis-server`` and the ``bench`` extra).

Every round runs all variants side by side for each backend and process count; a variant's time
is calls in a tight loop over their time (the percentiles come from a second, timed pass), and
the ratios are medians of each round's ratios, so a noisy machine shifts every column alike.
The peers run at ``--peer-procs`` only, with fewer calls.

``--scale`` measures instead what grows with the number of backends and worker rows: a call
at 8 to 4096 backends (one process, both cores), the lock holds of reaping, unregistering,
registering, rebuilding a view and taking a snapshot at 4096 backends x 1024 worker rows,
creating a balancer with 4096 addresses, and the segment's size.

    python scripts/bench_overhead.py                  # 8 and 64 backends; about 3-4 minutes
    python scripts/bench_overhead.py --no-peers --procs 1 2 --backends 8
    python scripts/bench_overhead.py --scale
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import statistics
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _bench_peers import PEERS, Peer, peer_factory

from dispatcher import Balancer

DOCS = Path(__file__).resolve().parent.parent / "docs"
WARMUP = 1000
PEER_WARMUP = 100
PEER_TARGET = 100.0
"""The compiled core at least this many times cheaper than the best shared-state peer."""
PURE_TARGET = 3.5
"""The pure Python core at most this many times the minimal balancer (8 backends, 1 process)."""
COMPILED_TARGET = 1.5
"""The compiled core at most this many times the minimal balancer (8 backends, 1 process)."""
SHARING_TARGET = 1.15
"""Shared at most this many times unshared, pure Python, 2 processes."""
PURE = "DISPATCHER_PURE_PYTHON"
YARDSTICK = "minimal"
VARIANTS = ("minimal", "minimal_unlocked", "unshared", "dispatcher", "dispatcher_py")


class Null:
    """A backend that answers at once, so only the balancer's own work is measured."""

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> None:
        return None


class Minimal:
    """Least-loaded over this process's own counts, thread-safe: what a worker writes itself."""

    def __init__(self, addrs: list[str]) -> None:
        self.counts = [0] * len(addrs)
        self.backends = [Null(addr) for addr in addrs]
        self.lock = threading.Lock()

    def invoke(self, request: Any, *, timeout: float | None = None) -> Any:
        counts = self.counts
        with self.lock:
            i = counts.index(min(counts))
            counts[i] += 1
        try:
            return self.backends[i].invoke(request, timeout=timeout)
        finally:
            with self.lock:
                counts[i] -= 1

    def close(self) -> None:
        pass


class MinimalUnlocked(Minimal):
    """`Minimal` without its lock: right only while the worker runs one thread."""

    def invoke(self, request: Any, *, timeout: float | None = None) -> Any:
        counts = self.counts
        i = counts.index(min(counts))
        counts[i] += 1
        try:
            return self.backends[i].invoke(request, timeout=timeout)
        finally:
            counts[i] -= 1


def addresses(n: int) -> list[str]:
    return [f"10.0.{i // 250}.{i % 250 + 1}:80" for i in range(n)]


def core() -> str:
    from dispatcher._core import CORE

    return CORE


@contextlib.contextmanager
def pure_python(on: bool) -> Iterator[None]:
    """Processes started meanwhile (spawn) import dispatcher with its pure Python core."""
    if not on:
        yield
        return
    old = os.environ.get(PURE)
    os.environ[PURE] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[PURE]
        else:
            os.environ[PURE] = old


def timed(call: Callable[[], Any], calls: int, barrier: Any, out: Any) -> None:
    """Time `calls` calls in a tight loop once every process reached the barrier, then time
    a tenth as many one by one for the percentiles; report both."""
    clock = time.perf_counter_ns
    barrier.wait()
    begin = clock()
    for _ in range(calls):
        call()
    elapsed = clock() - begin
    samples = array("q", bytes(8 * max(calls // 10, 1)))
    for i in range(len(samples)):
        t0 = clock()
        call()
        samples[i] = clock() - t0
    out.put((elapsed, sorted(samples), core()))


def worker(
    variant: str,
    shared: Balancer | None,
    backends: int,
    strategy: str,
    calls: int,
    barrier: Any,
    out: Any,
) -> None:
    balancer: Any = shared
    if variant == "minimal":
        balancer = Minimal(addresses(backends))
    elif variant == "minimal_unlocked":
        balancer = MinimalUnlocked(addresses(backends))
    elif variant == "unshared":
        balancer = Balancer(
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
    fork = multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("spawn") if variant == "dispatcher_py" else fork
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    shared: Balancer | None = None
    peer: Peer | None = None
    if variant.startswith("dispatcher"):
        shared = Balancer(
            addresses(backends),
            backend_factory=Null,
            strategy=strategy,
            max_workers=procs + 1,
            monitor=False,
        )
    if variant in PEERS:
        peer = make_peer(variant, fork, backends)
        target, args = peer_worker, (peer, calls, barrier, out)
    else:
        target, args = worker, (variant, shared, backends, strategy, calls, barrier, out)
    children = [ctx.Process(target=target, args=args) for _ in range(procs)]
    with pure_python(variant == "dispatcher_py"):
        for child in children:
            child.start()
    results = [out.get() for _ in children]
    for child in children:
        child.join()
    if shared is not None:
        total = (calls + calls // 10 + WARMUP) * procs
        assert sum(s.requests for s in shared.snapshot()) == total
        assert sum(s.in_flight for s in shared.snapshot()) == 0
        shared.close()
    if peer is not None:
        assert peer.in_flight() == 0, f"{variant} leaked in-flight counts"
        peer.close()
    cores = {c for _, _, c in results}
    if variant.startswith("dispatcher"):
        wanted = "pure Python" if variant == "dispatcher_py" else "compiled"
        assert {core.split(" (")[0] for core in cores} == {wanted}, f"{variant} ran {cores}"
    merged = sorted(x for _, samples, _ in results for x in samples)
    n = len(merged)
    wall = max(elapsed for elapsed, _, _ in results)
    return {
        "us": statistics.mean(elapsed / calls for elapsed, _, _ in results) / 1e3,
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
            style = "s--" if variant in PEERS else "o-"
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
    parser.add_argument("--scale", action="store_true", help="the figures that grow with size")
    args = parser.parse_args()

    if args.scale:
        rows = measure_scale(args)
    else:
        with peer_factory(args.peers) as (peers, make_peer):
            rows = measure(args, peers, make_peer)
        if args.plot:
            plot(rows, args.plot)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def measure(args: argparse.Namespace, peers: list[str], make_peer: Any) -> list[dict[str, Any]]:
    cpus = multiprocessing.cpu_count()
    compiled = core() == "compiled"
    ours = [v for v in VARIANTS if compiled or v != "dispatcher"]
    print(
        f"pick + release, strategy={args.strategy}, {args.calls} calls/process "
        f"({args.peer_calls} for peers), median of {args.rounds} rounds, {cpus} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start"
        f"{'' if compiled else ' (the compiled core is not built: pure Python only)'}"
    )
    header = (
        f"{'backends':>8} {'procs':>5} {'variant':>16} {'us/call':>8} {'calls/s':>9} "
        f"{'p50 us':>7} {'p99 us':>8} {'p99.9 us':>9} {'x minimal':>10}"
    )
    print(header)
    print("-" * len(header))
    rows: list[dict[str, Any]] = []
    verdicts: list[str] = []
    for backends in args.backends:
        for procs in args.procs:
            variants = list(ours)
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
            ratio = Ratios(rounds)

            for variant in variants:
                m = medians[variant]
                x_minimal = ratio(variant, YARDSTICK)
                rows.append(
                    {"backends": backends, "procs": procs, "variant": variant, **m,
                     "x_minimal": x_minimal}
                )  # fmt: skip
                print(
                    f"{backends:>8} {procs:>5} {variant:>16} {m['us']:>8.2f} "
                    f"{m['cps']:>9.0f} {m['p50']:>7.2f} {m['p99']:>8.2f} "
                    f"{m['p999']:>9.2f} {x_minimal:>9.2f}x"
                )
            verdicts += judge(backends, procs, variants, ratio, medians, compiled)
    print()
    for verdict in verdicts:
        print(verdict)
    return rows


class Ratios:
    """The median over rounds of one variant's time over another's, measured side by side."""

    def __init__(self, rounds: dict[str, list[dict[str, float]]]) -> None:
        self.rounds = rounds

    def __call__(self, a: str, b: str) -> float:
        pairs = zip(self.rounds[a], self.rounds[b], strict=True)
        return statistics.median(x["us"] / y["us"] for x, y in pairs)


def judge(
    backends: int,
    procs: int,
    variants: list[str],
    ratio: Callable[[str, str], float],
    medians: dict[str, dict[str, float]],
    compiled: bool,
) -> list[str]:
    """The issue's targets that this backend and process count decides."""

    def verdict(what: str, value: float, target: float, at_most: bool = True) -> str:
        met = value <= target if at_most else value >= target
        bound = "<=" if at_most else ">="
        return (
            f"{backends} backends, {procs} process{'es' * (procs > 1)}: {what} "
            f"{value:.2f}x (target {bound} {target}x: {'met' if met else 'NOT met'})"
        )

    out = []
    if backends == 8 and procs == 1:
        out.append(verdict("pure Python / minimal", ratio("dispatcher_py", YARDSTICK), PURE_TARGET))
        if compiled:
            out.append(
                verdict("compiled / minimal", ratio("dispatcher", YARDSTICK), COMPILED_TARGET)
            )
    if procs == 2:
        out.append(
            verdict("pure Python shared / unshared", ratio("dispatcher_py", "unshared"),
                    SHARING_TARGET)
        )  # fmt: skip
    present = [v for v in variants if v in PEERS]
    if present and compiled:
        best = min(present, key=lambda v: medians[v]["us"])
        out.append(
            verdict(f"best peer ({best}) / compiled", ratio(best, "dispatcher"), PEER_TARGET,
                    at_most=False)
        )  # fmt: skip
    return out


# Scale --------------------------------------------------------------------------------------


class Parked(Null):
    """`Null`, except for the request "park": that call stays in flight until `PARKED` is set."""

    def invoke(self, request: Any, *, timeout: float | None = None) -> None:
        if request == "park":
            PARKED.wait()


PARKED = threading.Event()


def per_call(sizes: list[int], calls: int, rounds: int, busy: bool) -> tuple[str, dict[int, float]]:
    """Median ns per call through one process's shared balancer at each of `sizes` backends,
    the sizes interleaved in every round; with `busy`, one call stays in flight throughout, so
    every pick breaks a partial tie."""
    balancers = [
        Balancer(
            addresses(n), backend_factory=Parked, capacity=max(n, 8), max_workers=2, monitor=False
        )
        for n in sizes
    ]
    parked = []
    if busy:
        for balancer in balancers:
            parked.append(threading.Thread(target=balancer.invoke, args=("park",)))
            parked[-1].start()
        while any(sum(s.in_flight for s in b.snapshot()) < 1 for b in balancers):
            time.sleep(0.001)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for balancer in balancers:
        for _ in range(WARMUP):
            balancer.invoke(None)
    for _ in range(rounds):
        for n, balancer in zip(sizes, balancers, strict=True):
            invoke = balancer.invoke
            begin = time.perf_counter_ns()
            for _ in range(calls):
                invoke(None)
            times[n].append((time.perf_counter_ns() - begin) / calls)
    PARKED.set()
    for thread in parked:
        thread.join()
    for balancer in balancers:
        balancer.close()
    return core().split(" (")[0], {n: statistics.median(t) for n, t in times.items()}


def in_child(pure: bool, function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a fresh process with the pure Python core or the compiled one."""
    ctx = multiprocessing.get_context("spawn")
    with pure_python(pure), ctx.Pool(1) as pool:
        return pool.apply(function, args)


class Holds:
    """The longest lock hold of each operation run under `watch`: the time its update ran
    with the lock taken, read by wrapping the lock's `run` (every hold but a call's own two)."""

    def __init__(self, balancer: Balancer) -> None:
        self._lock = balancer._state.lock  # a benchmark's look inside: not an API
        self._run = self._lock.run
        self.longest = 0

    def _timed_run(self, update: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        def timed_update() -> Any:
            begin = time.perf_counter_ns()
            try:
                return update()
            finally:
                self.longest = max(self.longest, time.perf_counter_ns() - begin)

        return self._run(timed_update, *args, **kwargs)

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        self.longest = 0
        self._lock.run = self._timed_run  # type: ignore[method-assign]
        try:
            yield
        finally:
            del self._lock.run


class Gate(Null):
    """`Null`, except in a process that set `HELD`: there each call holds until killed."""

    def invoke(self, request: Any, *, timeout: float | None = None) -> None:
        if HELD:
            ready, go = HELD
            ready.release()
            go.wait()


HELD: list[Any] = []
"""(ready, go) in a process whose calls hold."""


def hold_calls(balancer: Balancer, counted: Any, go: Any) -> None:
    """A worker that counts 64 calls on as many backends, then waits to be killed."""
    ready = threading.Semaphore(0)
    HELD[:] = [ready, go]
    threads = [threading.Thread(target=balancer.invoke, args=(None,)) for _ in range(64)]
    for thread in threads:
        thread.start()
    for _ in threads:
        ready.acquire()
    counted.set()
    go.wait()


def measure_scale(args: argparse.Namespace) -> list[dict[str, Any]]:
    logging.getLogger("dispatcher").setLevel(logging.ERROR)  # the reaps' events
    rows: list[dict[str, Any]] = []
    print(f"scale: {multiprocessing.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} at start")
    sizes = [8, 64, 512, 4096]
    print("\nA call through invoke, one process, sizes interleaved in each round; ns per call:")
    print(f"{'backends':>8} {'core':>12} {'load':>9} {'ns/call':>8} {'x 8 backends':>13}")
    for pure in (True, False):
        for busy in (False, True):
            which, medians = in_child(pure, per_call, sizes, args.calls // 4, args.rounds, busy)
            if not pure and which != "compiled":
                print("(the compiled core is not built)")
                break
            load = "one busy" if busy else "all idle"
            for n in sizes:
                ns = medians[n]
                rows.append({"what": "call", "backends": n, "core": which, "load": load, "ns": ns})
                print(f"{n:>8} {which:>12} {load:>9} {ns:>8.0f} {ns / medians[8]:>12.2f}x")

    print("\nAt 4096 backends x 1024 worker rows:")
    begin = time.perf_counter()
    balancer = Balancer(
        addresses(4096), backend_factory=Gate, capacity=4096, max_workers=1024, monitor=False
    )
    created = time.perf_counter() - begin
    size = os.path.getsize(f"/dev/shm/{balancer.name}") / 2**20
    print(f"  Balancer(4096 addresses): {created * 1e3:.0f} ms; segment {size:.1f} MiB")
    rows.append({"what": "create", "ms": created * 1e3, "mib": size})
    holds = Holds(balancer)
    balancer.invoke(None)

    def hold(what: str, operation: Callable[[], Any], before: Callable[[], Any] = list) -> None:
        samples = []
        for _ in range(args.rounds):
            before()
            with holds.watch():
                operation()
            samples.append(holds.longest / 1e6)
        ms = statistics.median(samples)
        rows.append({"what": what, "hold_ms": ms})
        print(f"  {what:<42} lock held {ms:7.3f} ms (median of {args.rounds})")

    victim = addresses(4096)[-1]

    def churn() -> None:
        balancer.unregister(victim)
        balancer.register(victim)

    hold("unregister + register (the longer hold)", churn)
    hold("view rebuild (a pick after a change)", lambda: balancer.invoke(None), churn)
    hold("snapshot", balancer.snapshot)

    ctx = multiprocessing.get_context("fork")
    reaps = []
    for _ in range(args.rounds):
        counted, go = ctx.Event(), ctx.Event()
        holder = ctx.Process(target=hold_calls, args=(balancer, counted, go))
        holder.start()
        counted.wait()
        os.kill(holder.pid or 0, signal.SIGKILL)
        holder.join()
        with holds.watch():
            reaped = balancer.reap()
        assert reaped == 1, reaped
        assert sum(s.in_flight for s in balancer.snapshot()) == 0
        reaps.append(holds.longest / 1e6)
    ms = statistics.median(reaps)
    rows.append({"what": "reap", "hold_ms": ms})
    print(f"  {'reap one dead worker (64 calls in flight)':<42} lock held {ms:7.3f} ms "
          f"(median of {args.rounds})")  # fmt: skip
    balancer.close()
    return rows


if __name__ == "__main__":
    main()
