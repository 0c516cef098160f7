"""``python -m dispatcher top``: watch the balancer of a running server without disturbing it.

`top` opens the server's segment with a `Segment` handle, by name or by its owner's pid
(`find_by_owner` reads the headers in /dev/shm). It only takes snapshots and reads the worker
rows: it never picks, so it claims no worker row and changes no count of the server it watches,
and it takes the lock only for the microseconds a snapshot's copy lasts.

``--json`` prints snapshots for programs instead of a picture: one JSON object (two
snapshots `ONE_SHOT_S` apart, so the recent numbers cover that second), or with
``--interval`` one object per line until stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import threading
import time
from typing import Any, TextIO

import psutil
from rich.console import Console

from .. import _layout as L
from .._latency import BUCKET_BOUNDS
from .._segment import Segment, find_by_owner
from .._view import BackendStats
from ..errors import LockBusy, SegmentError
from .dashboard import Sampler, Screen, backend_state, render, worker_rows

LOCK_WAIT_S = 1.0
"""The longest `top` waits for the shared lock per frame, so that Ctrl-C and SIGTERM are
heard even while a process holds the lock for long."""
LIVE_INTERVAL_S = 0.25
ONE_SHOT_S = 1.0
"""``--json`` alone: the recent window of the snapshot it prints."""


def open_target(target: str) -> Segment:
    """The segment given by name, or by its owner's pid if `target` is a number."""
    if target.isdigit():
        names = find_by_owner(int(target))
        if not names:
            raise SegmentError(f"process {target} owns no open dispatcher balancer")
        if len(names) > 1:
            raise SegmentError(f"process {target} owns several balancers, name one: {names}")
        target = names[0]
    return Segment.open(target)


def top(
    target: str,
    console: Console,
    stop: threading.Event,
    *,
    once: bool = False,
    interval: float | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
) -> int:
    """Show the live state of the balancer named `target` (or owned by pid `target`)."""
    try:
        segment = open_target(target)
    except SegmentError as exc:
        console.print(f"dispatcher top: {exc}", highlight=False)
        return 1
    try:
        if as_json:
            return _json(segment, console, stop, interval, out)
        return _show(segment, console, stop, once, interval or LIVE_INTERVAL_S)
    finally:
        segment.close()


def _show(
    segment: Segment, console: Console, stop: threading.Event, once: bool, interval: float
) -> int:
    owner = segment.owner_pid
    sampler = Sampler(
        functools.partial(segment.snapshot, timeout=LOCK_WAIT_S),
        functools.partial(worker_rows, segment),
        title="dispatcher top",
        source=f"{segment.name} (pid {owner})",
        strategy=segment.strategy_name,
    )
    if once:
        try:
            sampler.sample()
            time.sleep(min(interval * 2, 1.0))
            console.print(render(sampler.sample()))
        except LockBusy as exc:
            console.print(f"dispatcher top: {exc}", highlight=False)
            return 1
        return 0
    with Screen(console) as screen:
        while not stop.is_set() and not segment.closed_by_owner and psutil.pid_exists(owner):
            try:
                screen.show(sampler.sample())
            except LockBusy:
                holder = int(segment.state.words[L.H_LOCK_PID]) or "unknown"
                sampler.note(f"the shared lock is busy for {LOCK_WAIT_S:g} s (pid {holder})")
            stop.wait(interval)
    _say_why_it_ended(segment, console, stop, owner)
    return 0


def _say_why_it_ended(
    segment: Segment, console: Console, stop: threading.Event, owner: int
) -> None:
    if segment.closed_by_owner:
        console.print(f"dispatcher top: {segment.name} was closed by its owner")
    elif not stop.is_set():
        console.print(
            f"dispatcher top: the owner of {segment.name} (pid {owner}) exited without closing it"
        )


def _json(
    segment: Segment,
    console: Console,
    stop: threading.Event,
    interval: float | None,
    out: TextIO | None,
) -> int:
    def emit() -> None:
        text = json.dumps(snapshot_document(segment), separators=(",", ":"))
        if out is not None:
            out.write(text + "\n")
            out.flush()
        else:
            print(text, flush=True)

    try:
        segment.snapshot(timeout=LOCK_WAIT_S)  # the base of the first window
        if interval is None:
            stop.wait(ONE_SHOT_S)
            emit()
            return 0
        owner = segment.owner_pid
        while not stop.wait(interval):
            if segment.closed_by_owner or not psutil.pid_exists(owner):
                break
            emit()
    except LockBusy as exc:
        console.print(f"dispatcher top: {exc}", highlight=False)
        return 1
    if interval is not None:
        _say_why_it_ended(segment, Console(stderr=True), stop, segment.owner_pid)
    return 0


def snapshot_document(segment: Segment) -> dict[str, Any]:
    """One snapshot as plain JSON data: what ``top --json`` prints (see docs/demo.md)."""
    backends = segment.snapshot(timeout=LOCK_WAIT_S)
    by_slot = {b.slot: b.addr for b in backends}
    return {
        "balancer": segment.name,
        "owner_pid": segment.owner_pid,
        "strategy": segment.strategy_name,
        "time": time.time(),
        "monotonic": time.monotonic(),
        "retries_in_flight": max(segment.state.retries(), 0),
        "bucket_bounds": [None if math.isinf(b) else b for b in BUCKET_BOUNDS],
        "backends": [_backend(b) for b in backends],
        "workers": [
            {
                "pid": row.pid,
                "retries": row.retries,
                "in_flight": {by_slot[s]: n for s, n in row.in_flight.items() if s in by_slot},
            }
            for row in worker_rows(segment)
        ],
    }


def _backend(stats: BackendStats) -> dict[str, Any]:
    fields = dataclasses.asdict(stats)
    for name in ("histogram", "recent_histogram"):
        fields[name] = list(fields[name])
    fields["state"] = backend_state(stats)
    fields["rate"] = stats.rate
    fields["error_ratio"] = stats.error_ratio
    return fields
