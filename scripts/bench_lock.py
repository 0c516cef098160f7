"""Acquire + release cost: the spawn-context multiprocessing.Lock (a named POSIX semaphore,
what a balancer uses) against fcntl.flock on a file (released by the kernel if its holder
dies), uncontended and with two processes taking turns as fast as they can.

Each round runs both locks side by side; the table shows medians over rounds, in ns per
acquire + release pair, and the flock / semaphore ratio.

    python scripts/bench_lock.py
    python scripts/bench_lock.py --rounds 9 --pairs 200000
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing
import os
import statistics
import tempfile
import time
from typing import Any

SPAWN = multiprocessing.get_context("spawn")


def semaphore_pairs(lock: Any, pairs: int) -> float:
    acquire, release = lock.acquire, lock.release
    start = time.perf_counter_ns()
    for _ in range(pairs):
        acquire()
        release()
    return (time.perf_counter_ns() - start) / pairs


def flock_pairs(path: str, pairs: int) -> float:
    fd = os.open(path, os.O_RDWR)
    try:
        flock, ex, un = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN
        start = time.perf_counter_ns()
        for _ in range(pairs):
            flock(fd, ex)
            flock(fd, un)
        return (time.perf_counter_ns() - start) / pairs
    finally:
        os.close(fd)


def contender(kind: str, lock: Any, path: str, pairs: int, barrier: Any, out: Any) -> None:
    barrier.wait()
    out.put(semaphore_pairs(lock, pairs) if kind == "semaphore" else flock_pairs(path, pairs))


def contended(kind: str, lock: Any, path: str, pairs: int) -> float:
    """Two processes, each doing `pairs` pairs at once; the mean of their ns per pair."""
    barrier, out = SPAWN.Barrier(2), SPAWN.Queue()
    procs = [
        SPAWN.Process(target=contender, args=(kind, lock, path, pairs, barrier, out))
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
    return statistics.mean(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=100_000)
    args = parser.parse_args()

    lock = SPAWN.Lock()
    with tempfile.NamedTemporaryFile(prefix="bench_lock_") as file:
        rows: dict[str, list[float]] = {k: [] for k in ("sem1", "flock1", "sem2", "flock2")}
        for _ in range(args.rounds):
            rows["sem1"].append(semaphore_pairs(lock, args.pairs))
            rows["flock1"].append(flock_pairs(file.name, args.pairs))
            rows["sem2"].append(contended("semaphore", lock, file.name, args.pairs // 4))
            rows["flock2"].append(contended("flock", lock, file.name, args.pairs // 4))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{args.rounds} rounds, medians in ns per acquire + release, {os.cpu_count()} CPUs")
    print(f"{'':14}{'mp.Lock (sem)':>15}{'fcntl.flock':>14}{'flock / sem':>13}")
    for label, sem, flk in (
        ("uncontended", med["sem1"], med["flock1"]),
        ("2 processes", med["sem2"], med["flock2"]),
    ):
        print(f"{label:14}{sem:>15.0f}{flk:>14.0f}{flk / sem:>12.1f}x")


if __name__ == "__main__":
    main()
