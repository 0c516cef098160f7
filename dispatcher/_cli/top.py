"""``python -m dispatcher top``: watch the balancer of a running server without disturbing it.

`top` opens the server's segment with a `Segment` handle, by name or by its owner's pid
(`find_by_owner` reads the headers in /dev/shm). It only takes snapshots and reads the worker
rows: it never picks, so it claims no worker row and changes no count of the server it watches,
and it takes the lock only for the microseconds a snapshot's copy lasts.
"""

from __future__ import annotations

import functools
import threading
import time

import psutil
from rich.console import Console

from .. import _layout as L
from .._segment import Segment, find_by_owner
from ..errors import LockBusy, SegmentError
from .dashboard import Sampler, Screen, render

LOCK_WAIT_S = 1.0
"""The longest `top` waits for the shared lock per frame, so that Ctrl-C and SIGTERM are
heard even while a process holds the lock for long."""


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
    interval: float = 0.25,
) -> int:
    """Show the live state of the balancer named `target` (or owned by pid `target`)."""
    try:
        segment = open_target(target)
    except SegmentError as exc:
        console.print(f"dispatcher top: {exc}", highlight=False)
        return 1
    try:
        owner = segment.owner_pid
        sampler = Sampler(
            functools.partial(segment.snapshot, timeout=LOCK_WAIT_S),
            segment.workers,
            title="dispatcher top",
            source=f"{segment.name} (owner pid {owner})",
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
        if segment.closed_by_owner:
            console.print(f"dispatcher top: {segment.name} was closed by its owner")
        elif not stop.is_set():
            console.print(
                f"dispatcher top: the owner of {segment.name} (pid {owner}) exited "
                "without closing it"
            )
    finally:
        segment.close()
    return 0
