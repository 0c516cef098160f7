"""What a membership change costs `consistent_hash` in each process: the ring, and the first pick.

The ring holds 160 points per backend in rotation, sorted. It is built once per registration
change: a registration or an unregistration merges in or takes out one backend's points
(`_Ring.moved_to`); an ejection or a health flip leaves it as it is (a pick steps over the
points of backends not eligible). This script times, at each ``--backends`` size:

* ``full build``: sorting every backend's points into a new ring, with each backend's points
  already hashed (``cold``: hashing them too, as a process does the first time);
* ``one in`` / ``one out``: `moved_to` with one backend more or one fewer;
* through a real `Balancer` (``monitor=False``, backends that answer at once without I/O), the
  first keyed pick after ``register``, ``unregister`` and an ejection, against a pick with no
  change (``steady``) and the first pick of a process that builds the whole ring.

Each figure is the median of ``--repeats`` timings, the kinds interleaved in every repeat; the
ring's memory is traced with `tracemalloc`. Private names of `dispatcher._strategies` are used
on purpose: the ring is what is measured.

    python scripts/ring_timing.py                      # 64, 512 and 4096 backends, ~1 min
    python scripts/ring_timing.py --backends 512 --repeats 51
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dispatcher import Balancer, ConsistentHash, _strategies


class Instant:
    """A backend that answers at once with its address; it fails when asked to (`FAIL`)."""

    FAIL = "fail"

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def invoke(self, request: Any, *, timeout: float | None = None) -> str:
        if request == self.FAIL:
            raise ConnectionError(f"{self.addr} fails")
        return self.addr


def address(i: int) -> str:
    return f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}:80"


def timed(action: Callable[[], object]) -> float:
    began = time.perf_counter_ns()
    action()
    return (time.perf_counter_ns() - began) / 1e6


def ring_timings(n: int, repeats: int) -> dict[str, list[float]]:
    """The ring alone: a full build, cold and warm, and one backend in or out."""
    members = frozenset(range(n))
    points = _strategies._points
    full = _strategies._Ring(members, sorted(chain.from_iterable(map(points, members))))
    fewer = members - {n // 2}
    times: dict[str, list[float]] = {"full build, cold": [], "full build": []}
    times |= {"one in": [], "one out": []}
    for _ in range(repeats):
        _strategies._points_of.clear()
        times["full build, cold"].append(
            timed(lambda: sorted(chain.from_iterable(map(points, members))))
        )
        times["full build"].append(timed(lambda: sorted(chain.from_iterable(map(points, members)))))
        times["one out"].append(timed(lambda: full.moved_to(fewer)))
        smaller = full.moved_to(fewer)
        times["one in"].append(timed(lambda smaller=smaller: smaller.moved_to(members)))
    grown = smaller.moved_to(members)
    assert grown.points == full.points, "a ring moved back and forth must be the full one"
    return times


def ring_memory(n: int) -> float:
    """MiB that one ring of `n` backends holds (its points and the per-slot point cache)."""
    _strategies._points_of.clear()
    gc.collect()
    tracemalloc.start()
    members = frozenset(range(n))
    ring = _strategies._Ring(
        members, sorted(chain.from_iterable(map(_strategies._points, members)))
    )
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del ring
    return size / 2**20


MAX_CAPACITY = 4096
"""The most backends a segment holds."""
MAX_BACKENDS = MAX_CAPACITY - 1


def pick_timings(n: int, repeats: int) -> dict[str, list[float]]:
    """First keyed pick after each kind of change, through a Balancer (of at most
    `MAX_BACKENDS`: the registration needs a free slot)."""
    n = min(n, MAX_BACKENDS)
    addrs = [address(i) for i in range(n)]
    spare = address(n)
    times: dict[str, list[float]] = {"steady": [], "after register": [], "after unregister": []}
    times |= {"after an ejection": [], "first pick, whole ring": []}
    with Balancer(
        addrs,
        backend_factory=Instant,
        strategy=ConsistentHash(),
        capacity=min(n + 8, MAX_CAPACITY),
        failure_threshold=1,
        ejection_seconds=3600,
        max_ejection_seconds=3600,
        max_ejected_percent=100,
        monitor=False,
    ) as balancer:
        invoke = balancer.invoke
        key = "user-42"
        invoke(None, key=key)
        for k in range(repeats):
            times["steady"].append(timed(lambda: invoke(None, key=key)))
            balancer.register(spare)
            times["after register"].append(timed(lambda: invoke(None, key=key)))
            balancer.unregister(spare)
            times["after unregister"].append(timed(lambda: invoke(None, key=key)))
            victim = addrs[k % n]
            with contextlib.suppress(ConnectionError):
                invoke(Instant.FAIL, key=victim_key(balancer, victim))
            assert sum(s.ejected for s in balancer.snapshot()) == 1
            times["after an ejection"].append(timed(lambda: invoke(None, key=key)))
            other = Balancer.attach(
                balancer.name, backend_factory=Instant, strategy=ConsistentHash()
            )
            times["first pick, whole ring"].append(
                timed(lambda other=other: other.invoke(None, key=key))
            )
            other.close()
            # Back in rotation for the next repeat: re-register the ejected backend.
            balancer.unregister(victim)
            balancer.register(victim)
            invoke(None, key=key)
    return times


def victim_key(balancer: Balancer, victim: str) -> str:
    """A key that `balancer` sends to `victim`."""
    for i in range(1_000_000):
        key = f"k{i}"
        if balancer.invoke(None, key=key) == victim:
            return key
    raise RuntimeError(f"no key found for {victim}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=int, nargs="+", default=[64, 512, 4096])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"{_strategies.RING_POINTS} points per backend; medians of {args.repeats} repeats, ms"
    )
    for n in args.backends:
        ring = ring_timings(n, args.repeats)
        picks = pick_timings(n, max(args.repeats // 3, 3) if n > 1024 else args.repeats)
        memory = ring_memory(n)
        print(f"\n{n} backends ({n * _strategies.RING_POINTS} points, ring {memory:.1f} MiB)")
        if n > MAX_BACKENDS:
            print(f"  (picks through a Balancer of {MAX_BACKENDS}: a registration needs a slot)")
        full = statistics.median(ring["full build"])
        for name, values in ring.items():
            ms = statistics.median(values)
            print(f"  ring: {name:<22} {ms:8.3f} ms  ({ms / full:.2f}x a full build)")
        for name, values in picks.items():
            print(f"  pick: {name:<22} {statistics.median(values):8.3f} ms")


if __name__ == "__main__":
    main()
