"""Who a worker process is, and whether it is still alive.

A pid alone is not an identity: a dead worker's pid can be reused by a new process. A worker
row stores the pid with the process's start time, and a row whose process is gone, a zombie,
or a different process under the same pid belongs to a dead worker.

The start time is counted from boot, not from the epoch: psutil derives a process's epoch
start time from the system's boot time, which moves whenever the wall clock is stepped (NTP, a
resumed VM), and then every live worker would look like a different process.
"""

from __future__ import annotations

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
