"""Who a worker process is, and whether it is still alive.

A pid alone is not an identity: a dead worker's pid can be reused by a new process. A worker
row stores the pid with the process's start time, and a row whose process is gone, a zombie,
or a different process under the same pid belongs to a dead worker.
"""

from __future__ import annotations

import psutil


def start_time(pid: int) -> int | None:
    """The start time of `pid` in hundredths of a second since the epoch, or None if gone."""
    try:
        return round(psutil.Process(pid).create_time() * 100)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_alive(pid: int, start: int | None) -> bool:
    """Whether the process that started at `start` (if known) with this `pid` still runs."""
    try:
        process = psutil.Process(pid)
        if start is not None and round(process.create_time() * 100) != start:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
