"""Worker CPU per request of real servers that call a backend through a Balancer: a uvicorn
worker (``await ainvoke``, `AsyncHttpBackend`) against gunicorn sync workers (``invoke``,
`HttpBackend`, and the urllib3 backend it replaced).

Each server is one worker process running ``_bench_workers_app.py``; ``/call`` makes one call
through a ``least_loaded`` Balancer to a loopback backend that answers at once
(``_bench_clients_server.py``), ``/noop`` answers without calling, so ``call - noop`` is what
the outbound call costs the worker. This script sends ``--requests`` of each, ``--concurrency``
at a time (threads with keep-alive clients of their own; gunicorn's sync worker closes every
connection), and reads the worker's CPU time (user + system) before and after, so neither the
load generator's CPU nor the backend's is counted (the worker's threads' time on a CPU, from
``/proc/PID/task/*/schedstat``). Every round runs every server, in a
rotating order; the tables give medians over rounds and medians of per-round ratios.

uvicorn runs as ``uvicorn[standard]`` installs it (uvloop and httptools when present: the
script prints what it found), one process, no access log; gunicorn ``-k sync -w 1``.

    python scripts/bench_workers.py                    # 5 rounds x 3000 requests: ~3 min
    python scripts/bench_workers.py --concurrency 1 8 --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dispatcher._http_client import HttpClient

HERE = Path(__file__).resolve().parent
BACKEND_SCRIPT = HERE / "_bench_clients_server.py"


@dataclass(frozen=True)
class Server:
    name: str
    client: str
    kind: str  # "uvicorn" or "gunicorn"


SERVERS = [
    Server("uvicorn, ainvoke + AsyncHttpBackend", "aio", "uvicorn"),
    Server("gunicorn sync, invoke + HttpBackend", "sync", "gunicorn"),
    Server("gunicorn sync, invoke + urllib3 (before)", "urllib3", "gunicorn"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start listening on port {port}")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def started(command: list[str], port: int, what: str, env: dict[str, str]) -> Iterator[int]:
    process = subprocess.Popen(command, env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    try:
        wait_port(port, process, what)
        yield process.pid
    finally:
        stop(process)


def worker_pid(pid: int, kind: str) -> int:
    if kind == "uvicorn":
        return pid
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children()
        if children:
            return children[0].pid
        time.sleep(0.05)
    raise RuntimeError("gunicorn started no worker")


def server_command(server: Server, port: int) -> list[str]:
    if server.kind == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", "--app-dir", str(HERE), "--port", str(port),
            "--no-access-log", "--log-level", "warning", "_bench_workers_app:asgi",
        ]  # fmt: skip
    gunicorn = shutil.which("gunicorn") or str(Path(sys.executable).parent / "gunicorn")
    return [
        gunicorn, "--chdir", str(HERE), "-k", "sync", "-w", "1", "-b", f"127.0.0.1:{port}",
        "--log-level", "warning", "_bench_workers_app:wsgi",
    ]  # fmt: skip


def cpu(pid: int) -> float:
    """Seconds on a CPU of every thread of `pid`, to the nanosecond (``/proc``'s schedstat;
    psutil's times tick at 10 ms)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def load(port: int, path: str, requests: int, concurrency: int) -> None:
    """`requests` GETs of `path`, `concurrency` at a time, each thread with its own client."""
    each = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    errors: list[BaseException] = []

    def loop(count: int) -> None:
        with HttpClient("127.0.0.1", port, pool_size=1, timeout=30) as client:
            try:
                for _ in range(count):
                    answer = client.request("GET", path)
                    if answer.status != 200:
                        raise RuntimeError(f"{path}: HTTP {answer.status}")
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=loop, args=(n,)) for n in each]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def measure(
    server: Server, backend: str, requests: int, concurrencies: list[int]
) -> dict[tuple[int, str], float]:
    """Worker CPU us per request of ``/noop`` and ``/call`` at each concurrency."""
    port = free_port()
    env = {"BENCH_BACKENDS": backend, "BENCH_CLIENT": server.client}
    found: dict[tuple[int, str], float] = {}
    with started(server_command(server, port), port, server.name, env) as pid:
        worker = worker_pid(pid, server.kind)
        for path in ("/noop", "/call"):
            load(port, path, 200, 4)  # warm up: imports, the balancer, connections
        for concurrency in concurrencies:
            for path in ("/noop", "/call"):
                before = cpu(worker)
                load(port, path, requests, concurrency)
                found[concurrency, path] = (cpu(worker) - before) / requests * 1e6
    return found


def versions() -> str:
    found = [f"Python {sys.version.split()[0]}"]
    for name in ("uvicorn", "uvloop", "httptools", "gunicorn", "aiohttp", "urllib3"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", "--requests", type=int, default=3000, help="per path and round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    print(f"# {versions()}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    backend_port = free_port()
    command = [sys.executable, str(BACKEND_SCRIPT), "--port", str(backend_port)]
    results: dict[str, list[dict[tuple[int, str], float]]] = {s.name: [] for s in SERVERS}
    with started(command, backend_port, "the backend", {}):
        backend = f"127.0.0.1:{backend_port}"
        for k in range(args.rounds):
            order = SERVERS[k % len(SERVERS) :] + SERVERS[: k % len(SERVERS)]
            for server in order:
                results[server.name].append(
                    measure(server, backend, args.requests, args.concurrency)
                )
            print(f"# round {k + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    base_new, base_old = SERVERS[1].name, SERVERS[2].name
    for concurrency in args.concurrency:
        print(
            f"\n{concurrency} request(s) in flight: worker CPU us per request, median of "
            f"{args.rounds} rounds; ratios are medians of per-round ratios of call - noop\n"
        )
        print(
            "| server | /noop | /call | call - noop | x sync HttpBackend | x sync urllib3 before |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for server in SERVERS:
            rows = results[server.name]
            noop = [r[concurrency, "/noop"] for r in rows]
            call = [r[concurrency, "/call"] for r in rows]
            net = [c - n for c, n in zip(call, noop, strict=True)]

            def ratio(base: str, net: list[float] = net, at: int = concurrency) -> str:
                other = [r[at, "/call"] - r[at, "/noop"] for r in results[base]]
                return f"{statistics.median(a / b for a, b in zip(net, other, strict=True)):.2f}x"

            print(
                f"| {server.name} | {statistics.median(noop):.0f} | {statistics.median(call):.0f}"
                f" | {statistics.median(net):.0f} | {ratio(base_new)} | {ratio(base_old)} |"
            )


if __name__ == "__main__":
    main()
