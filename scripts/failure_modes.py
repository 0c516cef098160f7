"""Failure modes over real HTTP: how much traffic each strategy sends to one bad backend.

Eleven backends on loopback (``--backends``), each its own process (`_bench_http_backend.py`,
one request served at a time, exponential service times of mean ``--mean-ms``, 5 ms by
default). One of them (``--bad``, slot 0) misbehaves; W client worker processes (``--workers``,
forked, 8 by default) call through dispatcher at a steady total rate (``--rate``, 1200 calls/s:
the ten good backends about 60% busy), paced open loop: each worker's threads take the next due
time from one schedule, so a call stuck on the bad backend does not hold the others back. Every
call has a 1 s timeout. How much a load-aware strategy favours an idle-looking backend depends
on how busy the others are, so the share in ``fast-fail`` grows with ``--rate``. Scenarios:

* ``fast-fail``: the bad backend answers 503 at once for the whole run. A load-aware strategy
  that counts only calls in flight sees it idle and keeps choosing it.
* ``slow-then-fast``: backends answer in ~5 ms; from ``--slow-at`` s the bad one answers in
  ``--slow-ms`` (500 ms) for ``--slow-seconds`` s, then is fast again. The table shows its
  share before, and its calls and share in the ``--after`` seconds after it recovered (and in
  the last half of them): does it come back to its fair share?
* ``slow-once``: the same with a single 500 ms answer.
* ``held``: the bad backend holds every request ``--hold-ms`` (2 s) against the 1 s client
  timeout, as in Linkerd's "Beyond Round Robin" test (11 backends, one held: round robin
  about 95.5% success, least-loaded about 99%, peak EWMA about 99.9%).
* ``cpu-bound``: the client, not the backends, is the bottleneck. Every backend answers after
  a fixed time with no queue (``--cpu-fast-ms``, 5 ms; the bad one ``--cpu-slow-ms``,
  200 ms), and each worker calls in a closed loop with ``--tasks`` callers (64; several
  values sweep them): asyncio tasks awaiting ``balancer.ainvoke(...)`` on one event loop per
  worker (``async``, through ``--async-backend``, `dispatcher.aio.AsyncHttpBackend` by
  default) or threads calling ``balancer.invoke(...)`` (``sync``, `HttpBackend`)
  (``--clients``). With more callers than the workers' CPU can serve promptly, every call
  waits in its own worker (for the event loop, or for the GIL) before and after the backend
  answers. The table shows the calls/s, the share sent to the slow backend, the time callers
  saw for fast and slow answers, the calls in flight on each as the balancers counted them,
  and the client's lag (how late a 50 ms sleep in each worker wakes).

Each strategy (``--strategies``; round_robin, least_loaded, power_of_two and peak_ewma by
default) runs **shared** (the workers attach to one `Balancer`, as a pre-fork server does) and
**unshared** (a ``Balancer(..., shared=False)`` in each worker), with ejection **on** (the
defaults: 5 consecutive failures eject for 30 s, at most 50% out) and **off**
(``failure_threshold`` out of reach; note that ``max_ejected_percent=0`` would still let one
backend go). Columns: calls measured, success %, p50 / p99 over all calls and p99 over the
successful ones (ms, from the moment the call starts), the share of calls sent to the bad
backend against its fair share, the bad backend's peak-EWMA latency as the balancer holds it
at the end of the run (median over the workers' handles), and "late p99": how far behind its
schedule the client started calls (if it is large, the client, not the balancer, was the
bottleneck). Every row is the median over ``--rounds`` rounds; in each round the runs of a
scenario go in a rotated order, so noise on this shared machine falls on every row alike. The
1-minute load average after each run is printed with it, and summed up before the tables.

Only the public API is used (``from dispatcher import Balancer, HttpBackend, HttpRequest``, plus
``dispatcher.STRATEGIES`` to build seeded strategy objects). ``--seed`` seeds the backends'
service times and every strategy's random choices (each worker attaches with its own seeded
strategy object); thread timing on a loaded machine still varies between runs.

    python scripts/failure_modes.py                            # everything, 3 rounds: ~65 min
    python scripts/failure_modes.py --quick                    # setup check: ~30 s
    python scripts/failure_modes.py --scenarios fast-fail --strategies least_loaded peak_ewma
    python scripts/failure_modes.py --rounds 1 --json /tmp/failure-modes.json --seed 7
    python scripts/failure_modes.py --scenarios held --states shared --ejection off --rate 400
    python scripts/failure_modes.py --scenarios cpu-bound --states shared --ejection on \
        --tasks 4 16 64 --strategies least_loaded power_of_two peak_ewma
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import inspect
import itertools
import json
import math
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dispatcher
from dispatcher import Balancer, HttpBackend, HttpRequest

HERE = Path(__file__).resolve().parent
BACKEND_SCRIPT = HERE / "_bench_http_backend.py"
STRATEGIES = ("round_robin", "least_loaded", "power_of_two", "peak_ewma")
SCENARIOS = ("fast-fail", "slow-then-fast", "slow-once", "held", "cpu-bound")
SLOW = ("slow-then-fast", "slow-once")
CPU_BOUND = "cpu-bound"
CLIENTS = ("async", "sync")
REQUEST = HttpRequest("GET", "/")
NO_EJECTION = 1 << 31
"""A `failure_threshold` no backend reaches: ejection off."""
START_DELAY_S = 0.8
"""Time between creating a run's balancer and its first call: forking and attaching."""


@dataclass(frozen=True)
class Config:
    backends: int
    workers: int
    threads: int
    rate: float
    mean_ms: float
    slots: int
    timeout: float
    bad: int
    seed: int
    warmup: float
    seconds: float
    slow_at: float
    slow_ms: float
    slow_seconds: float
    after: float
    hold_ms: float
    cpu_fast_ms: float = 5.0
    cpu_slow_ms: float = 200.0
    async_backend: str = "dispatcher.aio:AsyncHttpBackend"

    def duration(self, scenario: str) -> float:
        if scenario == "slow-then-fast":
            return self.slow_at + self.slow_seconds + self.after
        if scenario == "slow-once":
            return self.slow_at + self.slow_ms / 1e3 + self.after
        return self.warmup + self.seconds


@dataclass(frozen=True)
class Run:
    scenario: str
    strategy: str
    shared: bool
    ejection: bool
    client: str = "paced"
    """How the workers call: "paced" (threads on a schedule), or in ``cpu-bound`` a closed loop
    of "async" tasks on one event loop per worker or of "sync" threads."""
    tasks: int = 0
    """``cpu-bound``: callers per worker (tasks or threads)."""

    @property
    def state(self) -> str:
        return "shared" if self.shared else "unshared"

    @property
    def name(self) -> str:
        name = f"{self.strategy} {self.state} ejection {'on' if self.ejection else 'off'}"
        if self.scenario == CPU_BOUND:
            name = f"{self.strategy} {self.client} x{self.tasks} {name.partition(' ')[2]}"
        return name


# Backends --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"backend did not start listening on port {port}")
        time.sleep(0.05)


@contextlib.contextmanager
def backends(cfg: Config) -> Iterator[list[str]]:
    """Start the backends; yield their addresses, slot order = backend id."""
    processes: list[subprocess.Popen[bytes]] = []
    ports = [free_port() for _ in range(cfg.backends)]
    try:
        for i, port in enumerate(ports):
            command = [sys.executable, str(BACKEND_SCRIPT), "--port", str(port), "--id", str(i)]
            command += ["--mean-ms", str(cfg.mean_ms), "--slots", str(cfg.slots)]
            command += ["--seed", str(cfg.seed * 1000 + i)]
            processes.append(subprocess.Popen(command))
        for port, process in zip(ports, processes, strict=True):
            wait_port(port, process)
        yield [f"127.0.0.1:{port}" for port in ports]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def behave(addr: str, **query: object) -> None:
    """Set the failure mode of one backend (see `_bench_http_backend.py`)."""
    path = "/_behave?" + "&".join(f"{k}={v}" for k, v in query.items())
    HttpBackend(addr).invoke(HttpRequest("GET", path), timeout=5)


def misbehave(cfg: Config, scenario: str, addrs: list[str], t0: float) -> None:
    """Make the bad backend misbehave as `scenario` wants, relative to the run's start `t0`."""
    addr = addrs[cfg.bad]
    at = int((t0 + cfg.slow_at) * 1e9)
    if scenario == "fast-fail":
        behave(addr, mode="fail", status=503)
    elif scenario == "held":
        behave(addr, mode="hold", ms=cfg.hold_ms)
    elif scenario == "slow-then-fast":
        until = at + int(cfg.slow_seconds * 1e9)
        behave(addr, mode="slow", ms=cfg.slow_ms, **{"from": at, "until": until})
    elif scenario == "slow-once":
        behave(addr, mode="slow", ms=cfg.slow_ms, count=1, **{"from": at})
    elif scenario == CPU_BOUND:
        # Fixed answer times with no queue at the backends: any queue is the client's own.
        for i, other in enumerate(addrs):
            behave(other, mode="slow", ms=cfg.cpu_slow_ms if i == cfg.bad else cfg.cpu_fast_ms)
    else:
        raise ValueError(scenario)


# Clients ---------------------------------------------------------------------------------


def make_strategy(name: str, seed: int) -> Any:
    """A seeded strategy object for `name` when the strategy draws random numbers."""
    factory = getattr(dispatcher, "STRATEGIES", {}).get(name)
    if factory is None:
        return name
    try:
        return factory(seed=seed)
    except TypeError:
        return factory()


def run_seed(cfg: Config, run: Run, round_: int) -> int:
    return zlib.crc32(f"{cfg.seed} {round_} {run.scenario} {run.name}".encode())


def bad_stats(balancer: Balancer, bad_addr: str) -> tuple[float, float]:
    """The bad backend's peak-EWMA latency (ms, NaN if unmeasured) and times ejected."""
    try:
        for stats in balancer.snapshot():
            if stats.addr == bad_addr:
                ewma = getattr(stats, "latency_ewma", None)
                times = getattr(stats, "times_ejected", None)
                return (
                    math.nan if ewma is None else ewma * 1e3,
                    math.nan if times is None else float(times),
                )
    except Exception:  # the snapshot is a diagnostic: never fail a run for it
        pass
    return math.nan, math.nan


def client_balancer(
    cfg: Config, run: Run, segment: str, addrs: list[str], strategy: Any, factory: Any
) -> Balancer:
    """This worker's balancer: attached to the run's shared one, or its own."""
    if run.shared:
        return Balancer.attach(segment, backend_factory=factory, strategy=strategy)
    return Balancer(
        addrs,
        strategy=strategy,
        shared=False,
        monitor=False,
        backend_factory=factory,
        failure_threshold=5 if run.ejection else NO_EJECTION,
    )


def async_factory(spec: str, pool_size: int) -> Any:
    """The async backend class named by `spec` ("module:Name"), with a pool of `pool_size`
    connections if it takes one."""
    module, _, name = spec.partition(":")
    backend = getattr(importlib.import_module(module), name)
    if "pool_size" in inspect.signature(backend).parameters:
        return functools.partial(backend, pool_size=pool_size)
    return backend


def outcome_of(exc: BaseException, where_of: dict[str, int]) -> int:
    """A failed call's code: -(slot + 2), or -1 for a failure with no backend to blame."""
    return -where_of.get(getattr(exc, "addr", ""), -1) - 2


def worker(
    cfg: Config,
    run: Run,
    index: int,
    segment: str,
    addrs: list[str],
    t0: float,
    end: float,
    seed: int,
    out: Any,
) -> None:
    """One client worker process: paced calls from `t0` to `end`, then report through `out`."""
    random.seed(seed)
    strategy = make_strategy(run.strategy, seed)
    factory = functools.partial(HttpBackend, pool_size=cfg.threads)
    balancer = client_balancer(cfg, run, segment, addrs, strategy, factory)
    where_of = {addr: i for i, addr in enumerate(addrs)}
    invoke, timeout, clock = balancer.invoke, cfg.timeout, time.monotonic
    interval = cfg.workers / cfg.rate
    first = t0 + index / cfg.rate  # workers interleave on one global schedule
    due_times = (first + k * interval for k in itertools.count())
    take = threading.Lock()
    results: list[tuple[array[float], array[float], array[float], array[int]]] = []

    def loop() -> None:
        starts, latencies, lateness, where = array("d"), array("d"), array("d"), array("b")
        while True:
            with take:
                due = next(due_times)
            if due >= end:
                break
            delay = due - clock()
            if delay > 0:
                time.sleep(delay)
            began = clock()
            try:
                answer = invoke(REQUEST, timeout=timeout)
                slot = int(answer.body)
            except Exception as exc:
                slot = outcome_of(exc, where_of)
            finished = clock()
            starts.append(began - t0)
            latencies.append(finished - began)
            lateness.append(began - due)
            where.append(slot)
        results.append((starts, latencies, lateness, where))

    threads = [threading.Thread(target=loop) for _ in range(cfg.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report(cfg, balancer, addrs, index, results, {}, out)


def report(
    cfg: Config,
    balancer: Balancer,
    addrs: list[str],
    index: int,
    results: list[tuple[array[float], array[float], array[float], array[int]]],
    extra: dict[str, Any],
    out: Any,
) -> None:
    """Close this worker's balancer and send its calls (and `extra` measures) to the parent."""
    ewma_ms, ejected = bad_stats(balancer, addrs[cfg.bad])
    balancer.close()
    merged = [array("d"), array("d"), array("d"), array("b")]
    for part in results:
        for into, values in zip(merged, part, strict=True):
            into.extend(values)  # type: ignore[arg-type]
    out.put((index, *(a.tobytes() for a in merged), ewma_ms, ejected, extra))


def in_flight_sampler(
    balancer: Balancer, where_of: dict[str, int], since: float, end: float, sums: list[float]
) -> Any:
    """A thread that adds up, every 0.1 s from `since` to `end`, the calls in flight on each
    backend as `balancer` sees them; ``sums[-1]`` counts the samples."""

    def sample() -> None:
        while (now := time.monotonic()) < end:
            if now >= since:
                for stats in balancer.snapshot():
                    sums[where_of[stats.addr]] += stats.in_flight
                sums[-1] += 1
            time.sleep(0.1)

    return threading.Thread(target=sample, daemon=True)


PROBE_S = 0.05
"""How long the lag probe sleeps: how much later than that it wakes is the client's lag."""


def closed_worker(
    cfg: Config,
    run: Run,
    index: int,
    segment: str,
    addrs: list[str],
    start: tuple[Any, Any, Any],
    seed: int,
    out: Any,
) -> None:
    """A ``cpu-bound`` worker: `run.tasks` callers in a closed loop (asyncio tasks awaiting
    `Balancer.ainvoke` on one event loop, or threads calling `Balancer.invoke`), with the calls
    in flight per backend and the client's own lag sampled meanwhile.

    Its backend clients are made and used once each before the run (an HTTP client's first
    use can cost tens of milliseconds of CPU, e.g. loading CA certificates); then it says it is
    ready and waits for the parent's start time: `start` is (ready queue, go event, start
    time as a shared double)."""
    ready, go, start_at = start
    random.seed(seed)
    strategy = make_strategy(run.strategy, seed)
    if run.client == "async":
        factory = async_factory(cfg.async_backend, run.tasks)
    else:
        factory = functools.partial(HttpBackend, pool_size=run.tasks)
    made = {addr: factory(addr) for addr in addrs}
    balancer = client_balancer(cfg, run, segment, addrs, strategy, made.__getitem__)
    where_of = {addr: i for i, addr in enumerate(addrs)}
    timeout, clock = cfg.timeout, time.monotonic
    results: list[tuple[array[float], array[float], array[float], array[int]]] = []
    lags: list[float] = []
    sums = [0.0] * (len(addrs) + 1)

    def begin() -> tuple[float, float, float]:
        """Ready: wait for the start; (start, end of warm-up, end), and start sampling."""
        ready.put(index)
        go.wait()
        t0 = start_at.value
        since, end = t0 + cfg.warmup, t0 + cfg.duration(CPU_BOUND)
        in_flight_sampler(balancer, where_of, since, end, sums).start()
        return t0, since, end

    def record() -> tuple[array[float], array[float], array[float], array[int]]:
        part: Any = (array("d"), array("d"), array("d"), array("b"))
        results.append(part)
        return part  # type: ignore[no-any-return]

    if run.client == "async":

        async def caller(t0: float, end: float) -> None:
            starts, latencies, _, where = record()
            while (began := clock()) < end:
                try:
                    answer = await balancer.ainvoke(REQUEST, timeout=timeout)
                    slot = int(answer.body)
                except Exception as exc:
                    slot = outcome_of(exc, where_of)
                starts.append(began - t0)
                latencies.append(clock() - began)
                where.append(slot)

        async def probe(since: float, end: float) -> None:
            while (began := clock()) < end:
                await asyncio.sleep(PROBE_S)
                if began >= since:
                    lags.append(clock() - began - PROBE_S)

        async def main() -> None:
            for backend in made.values():
                await backend.ainvoke(REQUEST, timeout=10)
            t0, since, end = await asyncio.get_running_loop().run_in_executor(None, begin)
            await asyncio.sleep(max(t0 - clock(), 0.0))
            await asyncio.gather(probe(since, end), *(caller(t0, end) for _ in range(run.tasks)))
            for backend in made.values():
                close = getattr(backend, "aclose", None)
                if close is not None:
                    await close()

        asyncio.run(main())
    else:
        invoke = balancer.invoke
        for backend in made.values():
            backend.invoke(REQUEST, timeout=10)
        t0, since, end = begin()

        def caller() -> None:
            starts, latencies, _, where = record()
            time.sleep(max(t0 - clock(), 0.0))
            while (began := clock()) < end:
                try:
                    slot = int(invoke(REQUEST, timeout=timeout).body)
                except Exception as exc:
                    slot = outcome_of(exc, where_of)
                starts.append(began - t0)
                latencies.append(clock() - began)
                where.append(slot)

        def probe() -> None:
            time.sleep(max(t0 - clock(), 0.0))
            while (began := clock()) < end:
                time.sleep(PROBE_S)
                if began >= since:
                    lags.append(clock() - began - PROBE_S)

        threads = [threading.Thread(target=caller) for _ in range(run.tasks)]
        threads.append(threading.Thread(target=probe))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for starts, _, lateness, _ in results:
        lateness.extend(array("d", bytes(8 * len(starts))))  # a closed loop is never late
    samples = max(sums[-1], 1.0)
    extra = {"in_flight": [s / samples for s in sums[:-1]], "lags": lags}
    report(cfg, balancer, addrs, index, results, extra, out)


@dataclass
class Calls:
    """Every call of one run: start (s from the run's start), latency (s), lateness, outcome;
    for ``cpu-bound``, the calls in flight on each backend (mean over the run, the fleet's)
    and the client's lag samples."""

    starts: array[float]
    latencies: array[float]
    lateness: array[float]
    where: array[int]
    ewma_ms: float
    times_ejected: float
    in_flight: list[float]
    lags: list[float]


def run_once(cfg: Config, run: Run, addrs: list[str], round_: int) -> Calls:
    ctx = multiprocessing.get_context("fork")
    seed = run_seed(cfg, run, round_)
    owner: Balancer | None = None
    if run.shared:
        owner = Balancer(
            addrs,
            strategy=run.strategy,
            monitor=False,
            max_workers=cfg.workers + 4,
            failure_threshold=5 if run.ejection else NO_EJECTION,
            backend_factory=functools.partial(HttpBackend, pool_size=cfg.threads),
        )
    try:
        out = ctx.Queue()
        owner_name = owner.name if owner else ""
        if run.scenario == CPU_BOUND:
            misbehave(cfg, run.scenario, addrs, 0.0)
            ready, go, start_at = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
            children = [
                ctx.Process(
                    target=closed_worker,
                    args=(cfg, run, i, owner_name, addrs, (ready, go, start_at), seed + i, out),
                )
                for i in range(cfg.workers)
            ]
            for child in children:
                child.start()
            for _ in children:
                ready.get(timeout=120)
            start_at.value = t0 = time.monotonic() + 0.2
            go.set()
        else:
            t0 = time.monotonic() + START_DELAY_S
            misbehave(cfg, run.scenario, addrs, t0)
            end = t0 + cfg.duration(run.scenario)
            children = [
                ctx.Process(
                    target=worker,
                    args=(cfg, run, i, owner_name, addrs, t0, end, seed + i, out),
                )
                for i in range(cfg.workers)
            ]
            for child in children:
                child.start()
        end = t0 + cfg.duration(run.scenario)
        reports = [out.get(timeout=end - time.monotonic() + 60) for _ in children]
        for child in children:
            child.join(30)
    finally:
        for addr in addrs if run.scenario == CPU_BOUND else [addrs[cfg.bad]]:
            behave(addr, mode="normal")
        if owner is not None:
            owner.close()
    calls = Calls(array("d"), array("d"), array("d"), array("b"), math.nan, math.nan, [], [])
    ewmas, ejections, in_flight = [], [], []
    for _, starts, latencies, lateness, where, ewma_ms, ejected, extra in sorted(
        reports, key=lambda r: r[0]
    ):
        calls.starts.frombytes(starts)
        calls.latencies.frombytes(latencies)
        calls.lateness.frombytes(lateness)
        calls.where.frombytes(where)
        ewmas.append(ewma_ms)
        ejections.append(ejected)
        if extra:
            in_flight.append(extra["in_flight"])
            calls.lags.extend(extra["lags"])
    calls.ewma_ms = statistics.median(ewmas)
    calls.times_ejected = statistics.median(ejections)
    if in_flight:
        # Shared, every worker sampled the fleet's counts; unshared, each its own: add them.
        per_backend = [statistics.fmean(column) for column in zip(*in_flight, strict=True)]
        calls.in_flight = per_backend if run.shared else [v * len(in_flight) for v in per_backend]
    return calls


# Measures --------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def share(where: list[int], bad: int) -> float:
    if not where:
        return math.nan
    return sum(1 for w in where if w in (bad, -bad - 2)) / len(where)


def measure(cfg: Config, run: Run, calls: Calls) -> dict[str, float]:
    bad = cfg.bad
    rows = list(zip(calls.starts, calls.latencies, calls.lateness, calls.where, strict=True))
    since = cfg.slow_at if run.scenario in SLOW else cfg.warmup
    window = [r for r in rows if r[0] >= since]
    where = [r[3] for r in window]
    latencies = [r[1] * 1e3 for r in window]
    result = {
        "calls": float(len(window)),
        "success": sum(1 for w in where if w >= 0) / max(1, len(where)),
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
        "p99_ok": percentile([r[1] * 1e3 for r in window if r[3] >= 0], 0.99),
        "bad_share": share(where, bad),
        "late_p99": percentile([r[2] * 1e3 for r in window], 0.99),
        "bad_ewma_ms": calls.ewma_ms,
        "times_ejected": calls.times_ejected,
    }
    if run.scenario == CPU_BOUND:
        seen_fast = [r[1] * 1e3 for r in window if r[3] >= 0 and r[3] != bad]
        seen_slow = [r[1] * 1e3 for r in window if r[3] == bad]
        fast = [n for i, n in enumerate(calls.in_flight) if i != bad]
        result.update(
            rate=len(window) / cfg.seconds,
            seen_fast_ms=percentile(seen_fast, 0.5),
            seen_slow_ms=percentile(seen_slow, 0.5),
            in_flight_fast=statistics.fmean(fast) if fast else math.nan,
            in_flight_slow=calls.in_flight[bad] if calls.in_flight else math.nan,
            lag_ms=percentile([lag * 1e3 for lag in calls.lags], 0.5),
            lag_p99_ms=percentile([lag * 1e3 for lag in calls.lags], 0.99),
        )
    if run.scenario not in SLOW:
        return result
    end = cfg.duration(run.scenario)
    to_bad = sorted(r for r in rows if r[3] in (bad, -bad - 2))
    if run.scenario == "slow-then-fast":
        recovered = cfg.slow_at + cfg.slow_seconds
    else:  # the slow answer's end, or when it would have ended had nobody called
        slow = [r for r in to_bad if r[0] >= cfg.slow_at and r[1] * 1e3 >= 0.8 * cfg.slow_ms]
        recovered = slow[0][0] + slow[0][1] if slow else cfg.slow_at + cfg.slow_ms / 1e3
    half = recovered + (end - recovered) / 2
    first = [r[0] for r in to_bad if r[0] >= recovered]
    result.update(
        before=share([r[3] for r in rows if cfg.warmup <= r[0] < cfg.slow_at], bad),
        after_calls=float(len(first)),
        after=share([r[3] for r in rows if r[0] >= recovered], bad),
        last_half=share([r[3] for r in rows if r[0] >= half], bad),
        first_after_s=first[0] - recovered if first else math.inf,
        recovered_at_s=recovered,
    )
    return result


def median(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def plain(value: Any) -> Any:
    """`value` for JSON: NaN (not measured) becomes null, infinity (never) the string "never"."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "never"
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# Report ----------------------------------------------------------------------------------


def fmt(value: float, spec: str = ".1f", pct: bool = False) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "never"
    return f"{value * 100 if pct else value:{spec}}"


def table(cfg: Config, scenario: str, rows: dict[Run, dict[str, float]], rounds: int) -> str:
    if scenario == CPU_BOUND:
        return cpu_table(cfg, rows, rounds)
    fair = 100 / cfg.backends
    head = ["strategy", "state", "ejection", "calls", "ok %", "p50 ms", "p99 ms", "p99 ok ms"]
    if scenario in SLOW:
        head += [
            "to bad before %",
            "to bad after %",
            "calls to bad after",
            "first call after s",
            "last half %",
        ]
    else:
        head += [f"to bad % (fair {fair:.1f})"]
    head += ["bad ewma ms", "late p99 ms"]
    lines = [
        f"### {scenario}: {describe(cfg, scenario)}",
        "",
        f"median of {rounds} round(s); fair share of the bad backend {fair:.1f}%",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" if i < 3 else "---:" for i in range(len(head))) + " |",
    ]
    for run, m in rows.items():
        cells = [run.strategy, run.state, "on" if run.ejection else "off"]
        cells += [fmt(m["calls"], ".0f"), fmt(m["success"], ".2f", pct=True)]
        cells += [fmt(m["p50"]), fmt(m["p99"]), fmt(m["p99_ok"])]
        if scenario in SLOW:
            cells += [fmt(m["before"], pct=True), fmt(m["after"], pct=True)]
            cells += [fmt(m["after_calls"], ".0f"), fmt(m["first_after_s"], ".2f")]
            cells += [fmt(m["last_half"], pct=True)]
        else:
            cells += [fmt(m["bad_share"], pct=True)]
        cells += [fmt(m["bad_ewma_ms"], ".0f"), fmt(m["late_p99"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_table(cfg: Config, rows: dict[Run, dict[str, float]], rounds: int) -> str:
    fair = 100 / cfg.backends
    head = ["strategy", "client", "callers", "state", "ejection", "calls/s", "ok %", "p50 ms"]
    head += ["p99 ms", f"to slow % (fair {fair:.1f})", "seen fast ms", "seen slow ms"]
    head += ["in flight fast", "in flight slow", "lag p50 ms", "lag p99 ms"]
    lines = [
        f"### {CPU_BOUND}: {describe(cfg, CPU_BOUND)}",
        "",
        f'median of {rounds} round(s); callers per worker; "seen": the median time a call '
        f"took as its caller saw it; in flight: the fleet's calls in flight on the slow backend "
        f"and on each fast one, as the balancers counted them (mean of 10 samples/s); lag: how "
        f"late a {PROBE_S * 1e3:g} ms sleep in each worker woke",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" if i < 5 else "---:" for i in range(len(head))) + " |",
    ]
    for run, m in rows.items():
        cells = [run.strategy, run.client, str(run.tasks), run.state]
        cells += ["on" if run.ejection else "off", fmt(m["rate"], ".0f")]
        cells += [fmt(m["success"], ".2f", pct=True), fmt(m["p50"]), fmt(m["p99"])]
        cells += [fmt(m["bad_share"], pct=True), fmt(m["seen_fast_ms"]), fmt(m["seen_slow_ms"])]
        cells += [fmt(m["in_flight_fast"], ".2f"), fmt(m["in_flight_slow"], ".2f")]
        cells += [fmt(m["lag_ms"]), fmt(m["lag_p99_ms"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(cfg: Config, scenario: str) -> str:
    bad = f"backend {cfg.bad}"
    if scenario == CPU_BOUND:
        return (
            f"{bad} answers in {cfg.cpu_slow_ms:g} ms, the others in {cfg.cpu_fast_ms:g} ms, "
            f"with no queue at any backend; each worker calls in a closed loop; "
            f"{cfg.seconds:g} s measured after {cfg.warmup:g} s"
        )
    if scenario == "fast-fail":
        return f"{bad} answers 503 at once; {cfg.seconds:g} s measured after {cfg.warmup:g} s"
    if scenario == "held":
        return (
            f"{bad} holds every request {cfg.hold_ms:g} ms, client timeout {cfg.timeout:g} s; "
            f"{cfg.seconds:g} s measured after {cfg.warmup:g} s"
        )
    slow = f"{bad} answers in {cfg.slow_ms:g} ms from {cfg.slow_at:g} s"
    if scenario == "slow-then-fast":
        slow += f" for {cfg.slow_seconds:g} s"
    else:
        slow += " for one call"
    return (
        f"{slow}, then is fast again; {cfg.after:g} s watched after it recovers "
        f"(ok %, p50, p99 from {cfg.slow_at:g} s on)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=None)
    parser.add_argument("--strategies", nargs="+", default=None)
    parser.add_argument("--states", nargs="+", choices=("shared", "unshared"), default=None)
    parser.add_argument("--ejection", nargs="+", choices=("on", "off"), default=None)
    parser.add_argument("--rounds", type=int, default=None, help="3; 1 with --quick")
    parser.add_argument("--backends", type=int, default=11)
    parser.add_argument("--bad", type=int, default=0, help="which backend misbehaves")
    parser.add_argument("--workers", type=int, default=8, help="client worker processes")
    parser.add_argument("--threads", type=int, default=32, help="threads per worker")
    parser.add_argument("--rate", type=float, default=1200.0, help="calls/s, all workers")
    parser.add_argument("--mean-ms", type=float, default=5.0, help="a backend's service time")
    parser.add_argument("--slots", type=int, default=1, help="requests a backend serves at once")
    parser.add_argument("--timeout", type=float, default=1.0, help="client timeout per call, s")
    parser.add_argument("--warmup", type=float, default=None, help="s before measuring (1)")
    parser.add_argument("--seconds", type=float, default=None, help="measured s (8)")
    parser.add_argument("--slow-at", type=float, default=None, help="s before slowness (3)")
    parser.add_argument("--slow-ms", type=float, default=500.0)
    parser.add_argument("--slow-seconds", type=float, default=None, help="slow for (2)")
    parser.add_argument("--after", type=float, default=None, help="s watched after (12)")
    parser.add_argument("--hold-ms", type=float, default=2000.0)
    parser.add_argument("--clients", nargs="+", choices=CLIENTS, default=None, help="cpu-bound")
    parser.add_argument(
        "--tasks", type=int, nargs="+", default=None, help="cpu-bound: callers per worker (64)"
    )
    parser.add_argument("--cpu-fast-ms", type=float, default=5.0, help="cpu-bound: fast answer")
    parser.add_argument("--cpu-slow-ms", type=float, default=200.0, help="cpu-bound: slow answer")
    parser.add_argument(
        "--async-backend",
        default="dispatcher.aio:AsyncHttpBackend",
        help="cpu-bound: the async backend class, module:name",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a setup check in about 30 s")
    parser.add_argument("--json", type=Path, help="also write every round and the medians here")
    args = parser.parse_args()
    quick = args.quick

    def pick(value: Any, normal: Any, fast: Any) -> Any:
        return value if value is not None else (fast if quick else normal)

    if not 0 <= args.bad < args.backends:
        parser.error("--bad must be the index of one of the --backends")
    strategies = pick(args.strategies, list(STRATEGIES), ["least_loaded", "peak_ewma"])
    known = set(getattr(dispatcher, "STRATEGIES", STRATEGIES))
    if unknown := [s for s in strategies if s not in known]:
        parser.error(f"unknown strategies {unknown}; choose from {sorted(known)}")
    cfg = Config(
        backends=args.backends,
        workers=args.workers,
        threads=args.threads,
        rate=args.rate,
        mean_ms=args.mean_ms,
        slots=args.slots,
        timeout=args.timeout,
        bad=args.bad,
        seed=args.seed,
        warmup=pick(args.warmup, 1.0, 0.5),
        seconds=pick(args.seconds, 8.0, 1.5),
        slow_at=pick(args.slow_at, 3.0, 1.0),
        slow_seconds=pick(args.slow_seconds, 2.0, 0.5),
        slow_ms=args.slow_ms,
        after=pick(args.after, 12.0, 2.0),
        hold_ms=args.hold_ms,
        cpu_fast_ms=args.cpu_fast_ms,
        cpu_slow_ms=args.cpu_slow_ms,
        async_backend=args.async_backend,
    )
    scenarios = pick(args.scenarios, list(SCENARIOS), list(SCENARIOS))
    states = pick(args.states, ["shared", "unshared"], ["shared"])
    ejection = pick(args.ejection, ["off", "on"], ["off"])
    rounds = pick(args.rounds, 3, 1)
    clients = pick(args.clients, list(CLIENTS), list(CLIENTS))
    tasks = pick(args.tasks, [64], [16])
    runs = {
        scenario: [
            Run(scenario, strategy, state == "shared", e == "on", client, n)
            for strategy in strategies
            for client, n in (
                itertools.product(clients, tasks) if scenario == CPU_BOUND else [("paced", 0)]
            )
            for state in states
            for e in ejection
        ]
        for scenario in scenarios
    }
    total = sum((cfg.duration(s) + START_DELAY_S + 0.5) * len(r) for s, r in runs.items()) * rounds
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; dispatcher from "
        f"{Path(dispatcher.__file__).parent}\n{cfg.backends} backends x {cfg.slots} slot, "
        f"mean service {cfg.mean_ms:g} ms, bad backend {cfg.bad}; {cfg.workers} workers x "
        f"{cfg.threads} threads, {cfg.rate:g} calls/s in all, timeout {cfg.timeout:g} s; "
        f"{rounds} round(s), seed {cfg.seed}; about {total / 60:.0f} min",
        flush=True,
    )
    results: dict[str, dict[Run, list[dict[str, float]]]] = {
        s: {run: [] for run in r} for s, r in runs.items()
    }
    with backends(cfg) as addrs:
        for k in range(rounds):
            for scenario, scenario_runs in runs.items():
                turn = k % len(scenario_runs)
                for run in scenario_runs[turn:] + scenario_runs[:turn]:
                    m = measure(cfg, run, run_once(cfg, run, addrs, k))
                    m["load"] = os.getloadavg()[0]
                    results[scenario][run].append(m)
                    print(
                        f"  round {k + 1} {scenario:<14} {run.name:<46} ok "
                        f"{fmt(m['success'], '.2f', pct=True):>6}% to bad "
                        f"{fmt(m.get('after', m['bad_share']), pct=True):>5}% p99 "
                        f"{fmt(m['p99']):>7} ms late p99 {fmt(m['late_p99']):>6} ms "
                        f"load {m['load']:.1f}",
                        flush=True,
                    )
    medians = {
        scenario: {
            run: {key: median([m[key] for m in ms]) for key in ms[0]} for run, ms in by_run.items()
        }
        for scenario, by_run in results.items()
    }
    loads = sorted(m["load"] for by_run in results.values() for ms in by_run.values() for m in ms)
    print(
        f"\nload average (1 min) after each run: median {statistics.median(loads):.1f}, "
        f"from {loads[0]:.1f} to {loads[-1]:.1f} ({os.cpu_count()} CPUs)\n"
    )
    for scenario, rows in medians.items():
        print(table(cfg, scenario, rows, rounds))
        print()
    if args.json:
        args.json.write_text(
            json.dumps(
                plain(
                    {
                        "config": asdict(cfg),
                        "rounds": rounds,
                        "scenarios": {
                            scenario: [
                                {
                                    **asdict(run),
                                    "median": medians[scenario][run],
                                    "rounds": ms,
                                }
                                for run, ms in by_run.items()
                            ]
                            for scenario, by_run in results.items()
                        },
                    }
                ),
                indent=1,
            )
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
