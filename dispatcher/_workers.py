"""Who a worker process is, and whether it is still alive.

A pid alone is not an identity: a dead worker's pid can be reused by a new process. A worker
row stores the pid with the process's start time, and a row whose process is gone, a zombie,
or a different process under the same pid belongs to a dead worker.

The start time is counted from boot, not from the epoch: psutil derives a process's epoch
start time from the system's boot time, which moves whenever the wall clock is stepped (NTP, a
resumed VM), and then every live worker would look like a different process.
"""

from __future__ import annotations

import contextlib
import os

import psutil


def _started(process: psutil.Process) -> int:
    """Hundredths of a second from boot to the start of `process`."""
    return round((process.create_time() - psutil.boot_time()) * 100)


def start_time(pid: int) -> int | None:
    """The start time of `pid` (hundredths of a second since boot), or None if it is gone."""
    try:
        return _started(psutil.Process(pid))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_alive(pid: int, start: int | None) -> bool:
    """Whether the process that started at `start` (if known) with this `pid` still runs."""
    try:
        process = psutil.Process(pid)
        if start is not None and _started(process) != start:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def any_stopped_mapping(path: str) -> bool:
    """Whether some other process that maps `path` is stopped (SIGSTOP, Ctrl-Z, a debugger)
    or in uninterruptible sleep: such a process may have taken a lock and not yet said so."""
    needle = path.encode()
    me = os.getpid()
    with os.scandir("/proc") as entries:
        pids = [e.name for e in entries if e.name.isdigit() and int(e.name) != me]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", "rb") as maps:
                if needle not in maps.read():
                    continue
            with open(f"/proc/{pid}/stat", "rb") as stat:
                state = stat.read().rpartition(b") ")[2][:1]
        except OSError:
            continue
        if state in (b"T", b"t", b"D"):
            return True
    return False


IMPORTED_IN = os.getpid()
"""The process that imported this package: a forked child of it has another pid."""
SPAWNED = "--multiprocessing-fork"
"""The last argument of a process that `multiprocessing` spawned (a fresh interpreter)."""


def prefork_siblings() -> tuple[int, int, str] | None:
    """If this process is one of several workers of a pre-fork server, and loaded this package
    itself: how many sibling workers it has, and their parent's (the server's) pid and name.
    None otherwise.

    Precisely, all of these hold: this package was imported in this process, not inherited
    through a fork (a forked child may be using the balancer its parent made, as gunicorn's
    ``preload_app`` workers do); the parent process runs the same executable (a Python server
    master: gunicorn, uvicorn, hypercorn, uWSGI, Celery, a `multiprocessing` pool's parent;
    not a shell); and the parent has another live child that runs the same program as this
    one: the same command line (forked workers), or a `multiprocessing` spawn child's
    (uvicorn, hypercorn, a spawn pool). A plain script's parent is a shell; a script run by
    a Python supervisor has no sibling with its command line unless it runs twice at once.
    """
    if os.getpid() != IMPORTED_IN:
        return None
    try:
        me = psutil.Process()
        parent = me.parent()
        if parent is None or parent.exe() != me.exe():
            return None
        mine = _program(me.cmdline())
        siblings = 0
        for child in parent.children():
            if child.pid == me.pid:
                continue
            with contextlib.suppress(psutil.Error):
                if _program(child.cmdline()) == mine and child.status() != psutil.STATUS_ZOMBIE:
                    siblings += 1
        return (siblings, parent.pid, parent.name()) if siblings else None
    except psutil.Error:
        return None


def _program(cmdline: list[str]) -> tuple[str, ...]:
    """What a process runs, as far as telling workers of one server apart goes: spawn
    children differ only in the descriptor numbers of their command lines."""
    if cmdline and cmdline[-1] == SPAWNED:
        return (SPAWNED,)
    return tuple(cmdline)
