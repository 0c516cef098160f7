"""Simulate W worker processes balancing over B backends: shared load state against per-worker.

A discrete-event simulation (pure Python, heapq) of the situation the project exists for:

* 8 backends, each a FIFO single server with exponential service times: 6 fast (mean 1, the
  unit every latency is reported in), 2 three times slower, and one fast backend turns 3x slow
  at the midpoint of the run;
* open-loop Poisson arrivals at `--load` (default 0.8) of the starting capacity (6 + 2/3
  requests per unit): 80% before the midpoint, 89% after it;
* each request lands on one of W worker processes at random (as a kernel spreads accepted
  connections), and that worker picks a backend with a strategy.

Each strategy is the REAL class from `dispatcher._strategies`, given `View` objects over plain
lists and the simulated clock (so `peak_ewma` reads its averages decayed, and stale after 2 s
without an answer, as it does in a `Balancer`), in three settings:

* shared: every worker reads one set of in-flight counts and latency averages, and cursor
  strategies share one cursor: what a `Balancer` gives a multi-process server;
* per-worker: each worker sees only the calls it made itself and keeps its own cursor and
  averages: what each process has when balancing state is not shared;
* ideal: join-the-shortest-queue on the exact global counts (ties at random), computed here.

Workers are asynchronous (each may have many calls outstanding). With synchronous workers,
one call each, a worker's own in-flight count is always 0 when it picks, so every per-worker
load-aware strategy would degrade entirely to its tie-break; here it degrades as W grows.

A second table runs the load-aware strategies (W = 8, shared) with background errors
(``--errors``, 0.1% and 1% of answers by default): a failed answer is recorded as the balancer
records one, in the latency average (`peak_ewma` scores it as a 5 s answer) and in the failure
score that load-aware strategies count as calls in flight.

Run: ``python scripts/simulate.py`` (about a minute), ``--quick`` (seconds). Prints
p50/p99/p99.9 latency and the ratio of p99 to ideal, and writes a latency-CDF plot to
docs/simulation.png (needs matplotlib, from the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dispatcher._latency import failed_once_more, failure_score, peak_ewma, sample_ns
from dispatcher._strategies import STRATEGIES, Strategy
from dispatcher._view import View

MEANS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0)
"""Mean service time of each backend, in units of a fast backend's."""
TURNS_SLOW = 5
"""The fast backend that becomes 3x slower at the midpoint."""
UNIT_NS = 10_000_000
"""One time unit as nanoseconds (a 10 ms backend), for the peak EWMA's 10 s decay."""
LOAD_AWARE = ("least_loaded", "power_of_two", "peak_ewma")
OBLIVIOUS = ("round_robin", "random", "weighted_round_robin", "weighted_random", "consistent_hash")
WORKERS = (2, 8, 32, 64)
PLOT_WORKERS = 32
UNSTABLE_BACKLOG = 0.02
"""A run is unstable if this fraction of its requests is still queued at the last arrival."""


@dataclass
class Arrivals:
    """One sequence of requests, replayed identically for every strategy."""

    times: list[float]
    workers: dict[int, list[int]]
    """The worker of each request, for each W."""
    work: list[float]
    """Each request's service demand, as a multiple of the chosen backend's mean."""
    keys: list[int]


def arrivals(count: int, load: float, seed: int) -> Arrivals:
    rng = random.Random(seed)
    rate = load * sum(1.0 / m for m in MEANS)
    now, times = 0.0, []
    for _ in range(count):
        now += rng.expovariate(rate)
        times.append(now)
    return Arrivals(
        times=times,
        workers={w: [rng.randrange(w) for _ in range(count)] for w in WORKERS},
        work=[rng.expovariate(1.0) for _ in range(count)],
        keys=[rng.getrandbits(64) for _ in range(count)],
    )


@dataclass
class Result:
    name: str
    mode: str
    workers: int
    latencies: list[float]
    backlog: int
    shares: list[float] = field(default_factory=list)

    @property
    def unstable(self) -> bool:
        return self.backlog > UNSTABLE_BACKLOG * len(self.latencies)

    def quantile(self, q: float) -> float:
        data = self.latencies
        return data[min(int(q * len(data)), len(data) - 1)]


def simulate(
    name: str, mode: str, workers: int, requests: Arrivals, error_rate: float = 0.0
) -> Result:
    """Replay `requests` with strategy `name` ("ideal" for JSQ) in `mode` (shared/per-worker).

    `error_rate`: the chance that an answer is a failure (recorded as the balancer records
    one: in the latency average, and in the failure score counted as calls in flight)."""
    b = len(MEANS)
    slots = tuple(range(b))
    weights = (1.0,) * b
    times, work, keys = requests.times, requests.work, requests.keys
    worker_of = requests.workers[workers]
    midpoint = times[-1] / 2

    # What the pickers see: one set of arrays, or one per worker.
    views = 1 if mode == "shared" else workers
    # Counts in words, as the shared segment holds them: strategies read them the same way.
    in_flight = [memoryview(bytearray(8 * b)).cast("q") for _ in range(views)]
    latency = [[0.0] * b for _ in range(views)]
    stamps = [[0] * b for _ in range(views)]
    scores = [[0.0] * b for _ in range(views)]
    score_stamps = [[0] * b for _ in range(views)]
    penalties = [[0] * b for _ in range(views)]
    clock = [0]  # the simulated time in ns, as `View.clock` reads it
    view = [
        View(
            1,
            slots,
            weights,
            in_flight[v],
            latency[v],
            stamps=stamps[v],
            clock=lambda: clock[0],
            penalties=penalties[v],
            penalized=error_rate > 0,
        )
        for v in range(views)
    ]
    errors = random.Random(11)
    cursors = [0] * views
    strategy: list[Strategy] = []
    if name != "ideal":
        factory = STRATEGIES[name]
        for w in range(workers):
            s = factory()
            rng = getattr(s, "_rng", None)
            if rng is not None:
                rng.seed(1000 + w)
            strategy.append(s)
    uses_cursor = bool(strategy and strategy[0].uses_cursor)
    tie_rng = random.Random(7)

    # The backends: a FIFO queue each, and the global count JSQ reads.
    system = [0] * b
    queues: list[deque[int]] = [deque() for _ in range(b)]
    busy = [False] * b
    means = list(MEANS)
    served = [0] * b
    done: list[tuple[float, int, int]] = []  # (time, request, backend) completions
    finished = [0.0] * len(times)
    backlog = -1

    def start(request: int, backend: int, now: float) -> None:
        busy[backend] = True
        heapq.heappush(done, (now + work[request] * means[backend], request, backend))

    i, n = 0, len(times)
    while i < n or done:
        if i < n and (not done or times[i] <= done[0][0]):
            now = times[i]
            clock[0] = now_ns = round(now * UNIT_NS)
            if error_rate:  # what a balancer's view would show: the whole part of each score
                v = 0 if views == 1 else worker_of[i]
                for s, score in enumerate(scores[v]):
                    penalties[v][s] = int(failure_score(score, score_stamps[v][s], now_ns))
            if backlog < 0 and now >= midpoint:
                means[TURNS_SLOW] = 3.0
            worker = worker_of[i]
            v = 0 if views == 1 else worker
            if name == "ideal":
                low = min(system)
                backend = tie_rng.choice([s for s in slots if system[s] == low])
            else:
                cursor = cursors[v] if uses_cursor else -1
                backend = strategy[worker].pick(view[v], cursor, keys[i])
                cursors[v] += 1
            in_flight[v][backend] += 1
            system[backend] += 1
            served[backend] += 1
            if busy[backend]:
                queues[backend].append(i)
            else:
                start(i, backend, now)
            i += 1
            if i == n:
                backlog = sum(system)
            continue
        now, request, backend = heapq.heappop(done)
        finished[request] = now - times[request]
        system[backend] -= 1
        v = 0 if views == 1 else worker_of[request]
        in_flight[v][backend] -= 1
        now_ns = round(now * UNIT_NS)
        failed = bool(error_rate) and errors.random() < error_rate
        sample = sample_ns(round(finished[request] * UNIT_NS), failed)
        latency[v][backend] = peak_ewma(latency[v][backend], stamps[v][backend], sample, now_ns)
        stamps[v][backend] = now_ns
        if failed:
            score_at = score_stamps[v][backend]
            scores[v][backend] = failed_once_more(scores[v][backend], score_at, now_ns)
            score_stamps[v][backend] = now_ns
        if queues[backend]:
            start(queues[backend].popleft(), backend, now)
        else:
            busy[backend] = False

    skip = n // 20  # warm-up
    total = sum(served)
    return Result(
        name,
        mode,
        workers,
        sorted(finished[skip:]),
        backlog,
        [s / total for s in served],
    )


def table(results: Sequence[Result], ideal: dict[int, Result]) -> str:
    lines = [
        "| strategy | state | W | p50 | p99 | p99.9 | p99 / ideal | to the 2 slow |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        base = ideal[r.workers].quantile(0.99)
        ratio = r.quantile(0.99) / base
        slow = sum(r.shares[s] for s in range(len(MEANS)) if MEANS[s] > 1.0)
        flag = " (unstable)" if r.unstable else ""
        lines.append(
            f"| {r.name} | {r.mode} | {r.workers} | {r.quantile(0.5):.1f} | "
            f"{r.quantile(0.99):.1f} | {r.quantile(0.999):.1f} | {ratio:.2f}{flag} | "
            f"{slow:.0%} |"
        )
    return "\n".join(lines)


def plot(results: Sequence[Result], path: Path, workers: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("matplotlib is not installed (pip install 'dispatcher-lb[bench]'): no plot written")
        return
    chosen = [r for r in results if r.workers == workers and r.name in ("ideal", *LOAD_AWARE)]
    colours = {"ideal": "black", "least_loaded": "C0", "power_of_two": "C1", "peak_ewma": "C2"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for r in chosen:
        data = r.latencies
        step = max(len(data) // 2000, 1)
        xs = [*data[::step], data[-1]]
        ys = [*(k / len(data) for k in range(0, len(data), step)), 1.0]
        style = "-" if r.mode == "shared" else "--"
        if r.name == "ideal":
            style = ":"
        label = "ideal JSQ" if r.name == "ideal" else f"{r.name}, {r.mode}"
        colour = colours[r.name]
        left.plot(xs, ys, style, label=label, color=colour)
        tail = [(x, 1.0 - y) for x, y in zip(xs, ys, strict=True) if y < 1.0]
        right.plot([x for x, _ in tail], [y for _, y in tail], style, color=colour)
    left.set_xscale("log")
    left.set_xlim(0.05, None)
    right.set_xlim(1, None)
    left.set_xlabel("latency (fast backend mean service times)")
    left.set_ylabel("CDF")
    left.legend(fontsize=8)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_ylim(1e-4, 1)
    right.set_xlabel("latency (fast backend mean service times)")
    right.set_ylabel("1 - CDF (tail)")
    fig.suptitle(
        f"W = {workers} workers, 8 backends (2 at 3x, 1 turns 3x slow midway), "
        f"open-loop Poisson at 80-89% load (round-robin and random: unstable, not shown)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300_000)
    parser.add_argument("--quick", action="store_true", help="20,000 requests, no plot")
    parser.add_argument("--load", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", type=Path, default=Path("docs/simulation.png"))
    parser.add_argument(
        "--errors",
        type=float,
        nargs="*",
        default=[0.001, 0.01],
        help="background error rates to run the load-aware strategies with (W = 8, shared)",
    )
    args = parser.parse_args(argv)
    count = 20_000 if args.quick else args.requests
    began = time.monotonic()
    requests = arrivals(count, args.load, args.seed)
    ideal_run = simulate("ideal", "global", WORKERS[0], requests)
    ideal = {}
    results = []
    for w in WORKERS:
        ideal[w] = Result("ideal", "global", w, ideal_run.latencies, ideal_run.backlog)
        ideal[w].shares = ideal_run.shares
        results.append(ideal[w])
        for name in LOAD_AWARE:
            for mode in ("shared", "per-worker"):
                results.append(simulate(name, mode, w, requests))
    for name in OBLIVIOUS:
        for mode in ("shared", "per-worker"):
            results.append(simulate(name, mode, 8, requests))
    with_errors = []
    for rate in args.errors:
        for name in LOAD_AWARE:
            result = simulate(name, "shared", 8, requests, error_rate=rate)
            result.mode = f"shared, {rate:.1%} errors"
            with_errors.append(result)
    print(
        f"{count} requests, load {args.load:.0%} rising to "
        f"{args.load * sum(1 / m for m in MEANS) / (sum(1 / m for m in MEANS) - 2 / 3):.0%}; "
        f"latency in fast-backend mean service times; {time.monotonic() - began:.0f} s\n"
    )
    print(table(results, ideal))
    if with_errors:
        print(
            "\nWith background errors: each answer fails at random with the given chance, "
            "recorded as a balancer records a failure\n"
        )
        print(table(with_errors, ideal))
    if not args.quick:
        plot(results, args.plot, PLOT_WORKERS)


if __name__ == "__main__":
    main()
