"""The lifetime of a shared-memory segment: create, attach, detach, unlink.

CPython 3.11 and 3.12 register a segment with the resource tracker on *attach* as well as on
create, and a process with a tracker of its own (anything not started by `multiprocessing`)
unlinks every registered segment when it exits. So only the creator registers; every attach
suppresses the registration (``track=False`` on 3.13+). Calling ``unregister`` after the fact
does not work: the tracker is shared with the creator and would drop the creator's entry.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import threading
from collections.abc import Iterator
from multiprocessing import resource_tracker, shared_memory
from typing import Any

from . import layout as L
from .errors import SegmentError

NAME_PREFIX = "dispatcher_"

_register_lock = threading.Lock()


def new_name() -> str:
    """An unguessable name, short enough for macOS's 31-character limit."""
    return NAME_PREFIX + secrets.token_hex(8)


def create(size: int) -> shared_memory.SharedMemory:
    """Create a zeroed owner-only (0600) segment, touched so a full /dev/shm fails now.

    tmpfs allocates pages lazily: an untouched segment on a full /dev/shm fails later with
    SIGBUS at a random write instead of an error here.
    """
    shm = shared_memory.SharedMemory(new_name(), create=True, size=size)
    try:
        buffer(shm)[:size] = bytes(size)
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    return shm


def attach(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment without ever letting this process's tracker unlink it."""
    if not isinstance(name, str) or not name or "/" in name or "\0" in name:
        raise SegmentError(f"{name!r} is not a shared memory segment name")
    try:
        if sys.version_info >= (3, 13):
            return shared_memory.SharedMemory(name, track=False)
        with _untracked():
            return shared_memory.SharedMemory(name)
    except FileNotFoundError:
        raise SegmentError(f"shared memory {name!r} does not exist (its owner closed?)") from None
    except (OSError, ValueError) as exc:
        raise SegmentError(f"cannot attach shared memory {name!r}: {exc}") from None


def buffer(shm: shared_memory.SharedMemory) -> memoryview:
    """The mapped bytes of an open segment."""
    buf = shm.buf
    if buf is None:
        raise SegmentError(f"shared memory {shm.name!r} is closed")
    return buf


def find_by_owner(pid: int, *, closed: bool = False, directory: str = "/dev/shm") -> list[str]:
    """Names of the balancer segments process `pid` created; closed ones too if `closed`."""
    found = []
    for name in sorted(os.listdir(directory)):
        if not name.startswith(NAME_PREFIX):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as file:
                head = file.read(L.HEADER_WORDS * L.WORD)
        except OSError:
            continue
        if len(head) < L.HEADER_WORDS * L.WORD:
            continue
        words = memoryview(head).cast("q")
        if (
            words[L.H_MAGIC] == L.MAGIC
            and words[L.H_OWNER_PID] == pid
            and (closed or words[L.H_VERSION] >= 0)
        ):
            found.append(name)
    return found


def path(shm: shared_memory.SharedMemory | None) -> str | None:
    """Where Linux shows the segment as a file, for locks that the kernel must release."""
    return None if shm is None else f"/dev/shm/{shm.name}"


@contextlib.contextmanager
def _untracked() -> Iterator[None]:
    with _register_lock:
        original = resource_tracker.register

        def register(name: Any, rtype: str) -> None:
            if rtype != "shared_memory":
                original(name, rtype)

        resource_tracker.register = register
        try:
            yield
        finally:
            resource_tracker.register = original
