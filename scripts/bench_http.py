"""End to end over real HTTP: shared and unshared balancers in the client against NGINX and HAProxy.

Eight backends on loopback, each its own process (`_bench_http_backend.py`): one request served
at a time, the rest queued, exponential service times that are slept, not burned. Six are fast
(``--mean-ms``, 4 ms by default), two are 3x slower, and one fast backend turns 10x slower
halfway through every run. A closed loop of W client worker processes (forked), with
``--concurrency`` requests in flight in total (threads spread evenly over the workers), sends
``GET /`` for ``--seconds`` by each route:

* ``shared <strategy>``: every worker calls through one shared dispatcher ``Balancer``;
* ``unshared <strategy>``: every worker has its own ``Balancer(shared=False)``;
* ``nginx least_conn``: every request goes through a local NGINX (``upstream`` with ``zone``
  and ``least_conn``, keep-alive to the backends, one worker per core);
* ``haproxy leastconn``: the same through HAProxy (``balance leastconn``, ``http-reuse always``,
  one thread per core).

Every client uses the same HTTP client (dispatcher's urllib3 ``HttpBackend``, keep-alive); a
proxy route is that client pointed at the proxy. NGINX and HAProxy (Debian's ``nginx-light``
and ``haproxy``) are configured and started by this script on loopback ports in a temp dir, in
the foreground, and stopped after; a proxy that is not installed is skipped. Every round runs
every route, in a rotating order; the tables show medians over rounds and the median of
per-round ratios to NGINX. CPU per component (psutil, over the measured window, in % of one
core) shows what was saturated.

    python scripts/bench_http.py                       # W=8, 3 rounds of 8 s per route: ~4 min
    python scripts/bench_http.py --workers 2 8 --rounds 5
    python scripts/bench_http.py --quick               # 1 round of 3 s, to check the setup
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dispatcher import Balancer, HttpBackend, HttpRequest

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"
BACKEND_SCRIPT = HERE / "_bench_http_backend.py"
SLOWNESS = (1, 1, 1, 1, 1, 1, 3, 3)
"""Each backend's mean service time as a multiple of ``--mean-ms``."""
SLOW = frozenset(i for i, s in enumerate(SLOWNESS) if s > 1)
TURNS = 5
"""The fast backend that turns 10x slower halfway through each run."""
STRATEGIES = ("least_loaded", "power_of_two", "peak_ewma")
PROXY_BALANCE = {"nginx": "least_conn", "haproxy": "leastconn"}
REQUEST = HttpRequest("GET", "/")
WARMUP_S = 0.5
CPU_WORKERS = 8
CPU_CONCURRENCY = 24
"""The CPU-bound case's clients, the same for every route (see `main`'s ``--cpu-*``)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start listening on port {port}")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# Servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    """A process this script started, with the pids whose CPU counts as this component."""

    name: str
    port: int
    process: subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        try:
            main = psutil.Process(self.process.pid)
            return [self.process.pid] + [c.pid for c in main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def start_backends(mean_ms: float) -> list[Server]:
    backends: list[Server] = []
    try:
        for i, slowness in enumerate(SLOWNESS):
            port = free_port()
            command = [sys.executable, str(BACKEND_SCRIPT), "--port", str(port), "--id", str(i)]
            command += ["--mean-ms", str(mean_ms * slowness)]
            backends.append(Server(f"backend {i}", port, subprocess.Popen(command)))
        for backend in backends:
            wait_port(backend.port, backend.process, backend.name)
    except BaseException:
        for backend in backends:
            stop(backend.process)
        raise
    return backends


NGINX_CONF = """
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    upstream backends {{
        zone backends 64k;
        least_conn;
{servers}
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""

HAPROXY_CONF = """
global
    nbthread {workers}
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
frontend front
    bind 127.0.0.1:{port}
    default_backend backends
backend backends
    balance leastconn
{servers}
"""


def start_proxy(kind: str, backends: list[Server], prefix: str) -> Server | None:
    """Start NGINX or HAProxy in the foreground on a loopback port; None if not installed."""
    binary = shutil.which(kind) or shutil.which(f"/usr/sbin/{kind}")
    if binary is None:
        print(f"skipping {kind}: not installed (Debian: apt-get install nginx-light haproxy)")
        return None
    port, workers = free_port(), os.cpu_count() or 1
    conf = os.path.join(prefix, f"{kind}.conf")
    if kind == "nginx":
        servers = "\n".join(f"        server 127.0.0.1:{b.port};" for b in backends)
        text = NGINX_CONF.format(workers=workers, prefix=prefix, servers=servers, port=port)
        command = [binary, "-p", prefix, "-c", conf, "-g", "daemon off;"]
    else:
        servers = "\n".join(f"    server b{i} 127.0.0.1:{b.port}" for i, b in enumerate(backends))
        text = HAPROXY_CONF.format(workers=workers, servers=servers, port=port)
        command = [binary, "-f", conf, "-db"]
    Path(conf).write_text(text)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server(kind, port, process)
    try:
        wait_port(port, process, kind)
        HttpBackend(f"127.0.0.1:{port}").invoke(REQUEST, timeout=5)
    except BaseException:
        stop(process, signal.SIGQUIT if kind == "nginx" else signal.SIGTERM)
        raise
    return server


@contextlib.contextmanager
def servers(mean_ms: float, proxies: list[str]) -> Iterator[tuple[list[Server], dict[str, Server]]]:
    prefix = tempfile.mkdtemp(prefix="bench-http-")
    backends = start_backends(mean_ms)
    started: dict[str, Server] = {}
    try:
        for kind in proxies:
            server = start_proxy(kind, backends, prefix)
            if server is not None:
                started[kind] = server
        yield backends, started
    finally:
        for kind, server in started.items():
            stop(server.process, signal.SIGQUIT if kind == "nginx" else signal.SIGTERM)
        for backend in backends:
            stop(backend.process)
        shutil.rmtree(prefix, ignore_errors=True)


# Clients ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    name: str
    kind: str
    """``shared``, ``unshared``, or a proxy's name."""
    strategy: str = ""


def client(
    route: Route,
    shared: Balancer | None,
    addrs: list[str],
    target: str,
    threads: int,
    start_ns: int,
    end_ns: int,
    out: Any,
) -> None:
    """One client worker process: `threads` closed loops until `end_ns`, then report."""
    if route.kind == "shared":
        assert shared is not None
        invoke = shared.invoke
    elif route.kind == "unshared":
        own = Balancer(
            addrs,
            strategy=route.strategy,
            shared=False,
            backend_factory=lambda a: HttpBackend(a, pool_size=threads),
        )
        invoke = own.invoke
    else:
        invoke = HttpBackend(target, pool_size=threads).invoke
    clock = time.monotonic_ns
    results: list[tuple[array[int], array[int], bytearray, int]] = []

    def loop() -> None:
        starts, latencies, ids, errors = array("q"), array("q"), bytearray(), 0
        while True:
            t0 = clock()
            if t0 >= end_ns:
                break
            try:
                response = invoke(REQUEST, timeout=10)
            except Exception:
                errors += t0 >= start_ns
                continue
            if t0 >= start_ns:
                starts.append(t0 - start_ns)
                latencies.append(clock() - t0)
                ids.append(int(response.body))
        results.append((starts, latencies, ids, errors))

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    starts, latencies, ids, errors = array("q"), array("q"), bytearray(), 0
    for s, lat, i, e in results:
        starts.extend(s)
        latencies.extend(lat)
        ids.extend(i)
        errors += e
    out.put((starts.tobytes(), latencies.tobytes(), bytes(ids), errors))


def turn(backend: Server, at_ns: int) -> None:
    HttpBackend(f"127.0.0.1:{backend.port}").invoke(
        HttpRequest("GET", f"/_turn?at={at_ns}"), timeout=5
    )


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def busy_seconds() -> float:
    times = psutil.cpu_times()
    return float(times.user + times.nice + times.system + times.irq + times.softirq + times.steal)


def run(
    route: Route,
    workers: int,
    concurrency: int,
    seconds: float,
    backends: list[Server],
    proxies: dict[str, Server],
) -> dict[str, Any]:
    """One closed-loop run of `route`; latencies, where requests went, and CPU per component."""
    ctx = multiprocessing.get_context("fork")
    addrs = [f"127.0.0.1:{b.port}" for b in backends]
    threads = [concurrency // workers + (i < concurrency % workers) for i in range(workers)]
    shared = None
    if route.kind == "shared":
        shared = Balancer(
            addrs,
            strategy=route.strategy,
            monitor=False,
            max_workers=workers + 1,
            backend_factory=lambda a: HttpBackend(a, pool_size=max(threads)),
        )
    target = f"127.0.0.1:{proxies[route.kind].port}" if route.kind in proxies else ""
    start_ns = time.monotonic_ns() + int((WARMUP_S + 0.2) * 1e9)
    end_ns = start_ns + int(seconds * 1e9)
    turn(backends[TURNS], start_ns + (end_ns - start_ns) // 2)
    out = ctx.Queue()
    children = [
        ctx.Process(target=client, args=(route, shared, addrs, target, n, start_ns, end_ns, out))
        for n in threads
    ]
    for child in children:
        child.start()
    groups = {
        "clients": lambda: [c.pid for c in children if c.pid],
        "backends": lambda: [p for b in backends for p in b.pids()],
        "proxy": lambda: proxies[route.kind].pids() if route.kind in proxies else [],
    }
    time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
    before = {name: cpu_seconds(pids()) for name, pids in groups.items()}
    machine = busy_seconds()
    time.sleep(max(0.0, (end_ns - time.monotonic_ns()) / 1e9))
    cpu = {name: cpu_seconds(pids()) - before[name] for name, pids in groups.items()}
    cpu["machine"] = busy_seconds() - machine
    reports = [out.get() for _ in children]
    for child in children:
        child.join()
    turn(backends[TURNS], 0)
    if shared is not None:
        assert sum(s.in_flight for s in shared.snapshot()) == 0
        shared.close()
    starts, latencies, ids, errors = array("q"), array("q"), bytearray(), 0
    for s, lat, i, e in reports:
        starts.frombytes(s)
        latencies.frombytes(lat)
        ids.extend(i)
        errors += e
    n = len(latencies)
    ordered = sorted(latencies)
    half = (end_ns - start_ns) // 2
    second = [ids[k] for k in range(n) if starts[k] >= half]
    return {
        "rps": n / seconds,
        "p50": ordered[n // 2] / 1e6,
        "p99": ordered[int(n * 0.99)] / 1e6,
        "p999": ordered[int(n * 0.999)] / 1e6,
        "slow": sum(1 for i in ids if i in SLOW) / n,
        "turned": second.count(TURNS) / max(1, len(second)),
        "errors": errors,
        **{f"cpu_{k}": v / seconds * 100 for k, v in cpu.items()},
        "latencies": ordered,
    }


# Report ----------------------------------------------------------------------------------


@dataclass
class Table:
    workers: int
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    vs_nginx: dict[str, dict[str, float]] = field(default_factory=dict)
    latencies: dict[str, list[int]] = field(default_factory=dict)


def summarize(workers: int, rounds: dict[str, list[dict[str, Any]]]) -> Table:
    table = Table(workers)
    keys = [k for k in next(iter(rounds.values()))[0] if k != "latencies"]
    for name, results in rounds.items():
        table.rows[name] = {k: statistics.median(r[k] for r in results) for k in keys}
        table.latencies[name] = sorted(x for r in results for x in r["latencies"])
    base = rounds.get("nginx least_conn")
    if base:
        for name, results in rounds.items():
            table.vs_nginx[name] = {
                k: statistics.median(r[k] / b[k] for r, b in zip(results, base, strict=True))
                for k in ("rps", "p99")
            }
    return table


def print_table(table: Table, seconds: float, concurrency: int) -> None:
    print(
        f"\nW={table.workers} client processes, {concurrency} requests in flight, "
        f"{seconds:g} s per run; medians over rounds; x nginx = median of per-round ratios"
    )
    header = (
        f"{'route':<24} {'req/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} "
        f"{'slow %':>6} {'turned %':>8} {'err':>4} {'req/s x nginx':>13} {'p99 x nginx':>11} "
        f"{'cpu% clients':>12} {'backends':>8} {'proxy':>5} {'machine':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, m in table.rows.items():
        ratio = table.vs_nginx.get(name, {})
        print(
            f"{name:<24} {m['rps']:>6.0f} {m['p50']:>7.2f} {m['p99']:>7.2f} {m['p999']:>8.2f} "
            f"{m['slow'] * 100:>6.1f} {m['turned'] * 100:>8.1f} {m['errors']:>4.0f} "
            f"{ratio.get('rps', float('nan')):>12.2f}x {ratio.get('p99', float('nan')):>10.2f}x "
            f"{m['cpu_clients']:>12.0f} {m['cpu_backends']:>8.0f} {m['cpu_proxy']:>5.0f} "
            f"{m['cpu_machine']:>7.0f}"
        )
    proxies = [n for n in table.rows if n.startswith(("nginx", "haproxy"))]
    if proxies:
        best_rps = max(proxies, key=lambda n: table.rows[n]["rps"])
        best_p99 = min(proxies, key=lambda n: table.rows[n]["p99"])
        print(
            f"best proxy: {best_rps} by req/s ({table.rows[best_rps]['rps']:.0f}), "
            f"{best_p99} by p99 ({table.rows[best_p99]['p99']:.2f} ms)"
        )


def verdicts(table: Table) -> list[str]:
    lines = []
    for strategy in STRATEGIES:
        shared, unshared = f"shared {strategy}", f"unshared {strategy}"
        if shared in table.vs_nginx:
            r = table.vs_nginx[shared]
            lines.append(
                f"W={table.workers} {shared}: p99 {r['p99']:.2f}x nginx's (target <= 1: "
                f"{'met' if r['p99'] <= 1 else 'not met'}), req/s {r['rps']:.2f}x nginx's "
                f"(target >= 1.3: {'met' if r['rps'] >= 1.3 else 'not met'})"
            )
        if shared in table.rows and unshared in table.rows:
            gain = table.rows[unshared]["p99"] / table.rows[shared]["p99"]
            lines.append(
                f"W={table.workers} {strategy}: unshared p99 / shared p99 = {gain:.2f}x "
                f"(target >= 2 at W=8: {'met' if gain >= 2 else 'not met'})"
            )
    return lines


def plot(tables: list[Table], path: Path) -> None:
    """Latency CDF per route and its tail (1 - CDF, log scale), one row per W."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 2, figsize=(12, 4.4 * len(tables)), squeeze=False)
    balances = dict.fromkeys(n.partition(" ")[2] for t in tables for n in t.latencies)
    colors = {b: f"C{i}" for i, b in enumerate(balances)}
    for (cdf, tail), table in zip(axes, tables, strict=True):
        for name, data in table.latencies.items():
            n = len(data)
            xs = [x / 1e6 for x in data]
            ys = [(k + 1) / n for k in range(n)]
            mode, _, balance = name.partition(" ")
            look = {
                "color": colors[balance],
                "linestyle": {"shared": "-", "unshared": ":"}.get(mode, "--"),
                "linewidth": 1.6 if mode == "shared" else 1.2,
                "label": name,
            }
            cdf.plot(xs, ys, **look)
            tail.plot(xs, [1 - y + 1 / n for y in ys], **look)
        for ax in (cdf, tail):
            ax.set_xscale("log")
            ax.set_xlabel("latency (ms, log scale)")
            ax.grid(True, which="both", alpha=0.3)
        cdf.set_ylabel("fraction of requests")
        cdf.set_title(f"W={table.workers}: latency CDF per route (all rounds)")
        tail.set_yscale("log")
        tail.set_ylim(1e-4, 1)
        tail.set_ylabel("fraction slower (1 - CDF)")
        tail.set_title("the tail")
        tail.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def print_cpu_table(table: Table, seconds: float, concurrency: int) -> None:
    """The CPU-bound case: throughput, and the CPU each component spends per request."""
    print(
        f"\nCPU-bound (backends answer at once): W={table.workers} client processes, "
        f"{concurrency} requests in flight, {seconds:g} s per run; medians over rounds; "
        f"x nginx = median of per-round ratios; CPU in us per request"
    )
    header = (
        f"{'route':<24} {'req/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'err':>4} "
        f"{'req/s x nginx':>13} {'p99 x nginx':>11} {'client us':>9} {'backends us':>11} "
        f"{'proxy us':>8} {'total us':>8} {'machine %':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, m in table.rows.items():
        ratio = table.vs_nginx.get(name, {})
        per = {k: m[f"cpu_{k}"] / 100 / m["rps"] * 1e6 for k in ("clients", "backends", "proxy")}
        print(
            f"{name:<24} {m['rps']:>6.0f} {m['p50']:>7.2f} {m['p99']:>7.2f} {m['errors']:>4.0f} "
            f"{ratio.get('rps', float('nan')):>12.2f}x {ratio.get('p99', float('nan')):>10.2f}x "
            f"{per['clients']:>9.0f} {per['backends']:>11.0f} {per['proxy']:>8.0f} "
            f"{sum(per.values()):>8.0f} {m['cpu_machine']:>9.0f}"
        )


def measure(
    label: str,
    routes: list[Route],
    workers: int,
    concurrency: int,
    seconds: float,
    rounds: int,
    backends: list[Server],
    proxies: dict[str, Server],
) -> Table:
    """Every route once per round, in an order that rotates; the medians as a `Table`."""
    results: dict[str, list[dict[str, Any]]] = {r.name: [] for r in routes}
    for k in range(rounds):
        order = routes[k % len(routes) :] + routes[: k % len(routes)]
        for route in order:
            result = run(route, workers, concurrency, seconds, backends, proxies)
            results[route.name].append(result)
            print(
                f"  {label} W={workers} round {k + 1} {route.name:<22} {result['rps']:>6.0f} "
                f"req/s p99 {result['p99']:>7.2f} ms  cpu% machine {result['cpu_machine']:.0f}",
                flush=True,
            )
    return summarize(workers, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--case",
        choices=["service", "cpu", "both"],
        default="both",
        help="service-bound backends (--mean-ms), CPU-bound ones (answer at once), or both",
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[8])
    parser.add_argument("--concurrency", type=int, default=24, help="requests in flight, total")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mean-ms", type=float, default=4.0, help="a fast backend's service")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--proxies", nargs="*", default=["nginx", "haproxy"])
    parser.add_argument("--cpu-workers", type=int, default=CPU_WORKERS)
    parser.add_argument("--cpu-concurrency", type=int, default=CPU_CONCURRENCY)
    parser.add_argument("--cpu-seconds", type=float, default=4.0)
    parser.add_argument("--cpu-rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s")
    parser.add_argument("--plot", type=Path, default=DOCS / "bench_http_cdf.png")
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None)
    parser.add_argument("--json", type=Path, help="also write the medians to this file")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 3.0
        args.cpu_rounds, args.cpu_seconds = 1, 3.0
    tables: list[Table] = []
    cpu_table: Table | None = None
    if args.case in ("service", "both"):
        print(
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; backends: "
            f"{len(SLOWNESS)} x 1 slot, mean service {args.mean_ms:g} ms, "
            f"{sorted(SLOW)} 3x slower, {TURNS} 10x slower from halfway"
        )
        with servers(args.mean_ms, args.proxies) as (backends, proxies):
            routes = [Route(f"shared {s}", "shared", s) for s in args.strategies]
            routes += [Route(f"unshared {s}", "unshared", s) for s in args.strategies]
            routes += [Route(f"{k} {PROXY_BALANCE[k]}", k) for k in proxies]
            for workers in args.workers:
                table = measure(
                    "service",
                    routes,
                    workers,
                    args.concurrency,
                    args.seconds,
                    args.rounds,
                    backends,
                    proxies,
                )
                tables.append(table)
                print_table(table, args.seconds, args.concurrency)
    if args.case in ("cpu", "both"):
        print(
            f"\nCPU-bound: load average {os.getloadavg()[0]:.2f}; {len(SLOWNESS)} backends "
            f"that answer at once, least_loaded against the proxies"
        )
        with servers(0.0, args.proxies) as (backends, proxies):
            routes = [Route(f"{k} least_loaded", k, "least_loaded") for k in ("shared", "unshared")]
            routes += [Route(f"{k} {PROXY_BALANCE[k]}", k) for k in proxies]
            cpu_table = measure(
                "cpu",
                routes,
                args.cpu_workers,
                args.cpu_concurrency,
                args.cpu_seconds,
                args.cpu_rounds,
                backends,
                proxies,
            )
        print_cpu_table(cpu_table, args.cpu_seconds, args.cpu_concurrency)
    print()
    for table in tables:
        for line in verdicts(table):
            print(line)
    if cpu_table is not None and "shared least_loaded" in cpu_table.vs_nginx:
        ratio = cpu_table.vs_nginx["shared least_loaded"]["rps"]
        print(
            f"CPU-bound shared least_loaded: req/s {ratio:.2f}x nginx's "
            f"(target >= 1.3: {'met' if ratio >= 1.3 else 'not met'})"
        )
    if args.json:
        dump = [
            {"case": "service", "workers": t.workers, "rows": t.rows, "vs_nginx": t.vs_nginx}
            for t in tables
        ]
        if cpu_table is not None:
            dump.append(
                {
                    "case": "cpu",
                    "workers": cpu_table.workers,
                    "rows": cpu_table.rows,
                    "vs_nginx": cpu_table.vs_nginx,
                }
            )
        args.json.write_text(json.dumps(dump, indent=1))
    if args.plot and tables:
        plot(tables, args.plot)


if __name__ == "__main__":
    main()
