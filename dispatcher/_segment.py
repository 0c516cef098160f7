"""A balancer's shared segment, as one process holds it: create or open it, reap, close it.

`Segment` is the handle on a segment apart from any balancer: the monitor process and
``dispatcher top`` hold one alone, a `Balancer` holds one beside its strategy and proxies.

CPython 3.11 and 3.12 register a segment with the resource tracker on *attach* as well as on
create, and a process with a tracker of its own (anything not started by `multiprocessing`)
unlinks every registered segment when it exits. So only the creator registers; every attach
suppresses the registration (``track=False`` on 3.13+). Calling ``unregister`` after the fact
does not work: the tracker is shared with the creator and would drop the creator's entry. The
creator's registration is kept on purpose: if the owner is SIGKILLed, its tracker unlinks the
segment once every process holding it has exited.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator
from multiprocessing import resource_tracker, shared_memory
from typing import Any

from . import _layout as L
from ._lock import Semaphore, new_semaphore, open_semaphore
from ._policy import EjectionPolicy
from ._state import SharedState
from ._view import BackendStats
from ._workers import is_alive
from .errors import SegmentError

NAME_PREFIX = "dispatcher_"

_register_lock = threading.Lock()


class Segment:
    """One balancer segment open in this process: its mapping, its lock, its `SharedState`.

    `create` makes a segment that this process owns: closing it here marks it closed (every
    attached process gets `SegmentError` on its next pick) and unlinks it. `open` attaches to
    a segment made elsewhere; closing it only detaches. Interpreter exit closes what is left.
    """

    def __init__(
        self, state: SharedState, shm: shared_memory.SharedMemory | None, created: bool
    ) -> None:
        self.state = state
        self._shm = shm
        self._created_by = os.getpid() if created else -1
        """This handle owns the segment in this process only: a forked child just detaches."""
        self._finalizer = weakref.finalize(self, _release, shm, state, self._created_by)

    @classmethod
    def create(
        cls,
        layout: L.Layout,
        policy: EjectionPolicy,
        addrs: Iterable[str] = (),
        *,
        strategy_name: str = "",
        shared: bool = True,
    ) -> Segment:
        """A new segment holding `addrs` (canonical, at full weight at once), owned here.

        Not `shared`: the same state in this process's memory, under a `threading.Lock`.
        """
        shm: shared_memory.SharedMemory | None = None
        semaphore: Semaphore
        if shared:
            semaphore, lock_name = new_semaphore()
            shm = _create_shm(layout.size)
            buf = _buffer(shm)
            state = SharedState(buf, layout, semaphore, f"/dev/shm/{shm.name}")
        else:
            semaphore, lock_name = threading.Lock(), ""
            buf = memoryview(bytearray(layout.size))
            state = SharedState(buf, layout, semaphore)
        try:
            L.write_header(state.words, layout, os.getpid())
            L.write_name(buf, L.H_LOCK_NAME, lock_name)
            L.write_name(buf, L.H_STRATEGY_NAME, strategy_name)
            state.store_policy(policy)
            for addr in addrs:
                state.register(addr, 1, warm_up=False)
        except BaseException:
            state.release_views()
            del buf
            if shm is not None:
                shm.close()
                shm.unlink()
            raise
        return cls(state, shm, created=True)

    @classmethod
    def open(cls, name: str) -> Segment:
        """Attach to the segment `name` that another process created, once its header checks."""
        shm = _attach_shm(name)
        try:
            buf = _buffer(shm)
            header = buf[: L.HEADER_WORDS * L.WORD].cast("q")
            try:
                layout = L.read_layout(header, name, shm.size)
                closed = header[L.H_VERSION] == L.CLOSED
            finally:
                header.release()
            if closed:
                raise SegmentError(f"the balancer {name!r} was closed by its owner")
            semaphore = open_semaphore(L.read_name(buf, L.H_LOCK_NAME))
            state = SharedState(buf, layout, semaphore, f"/dev/shm/{name}")
            state.load_policy()
        except BaseException:
            shm.close()
            raise
        return cls(state, shm, created=False)

    # Identity ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The segment's name in /dev/shm; "" when the state is not shared."""
        return self._shm.name if self._shm is not None else ""

    @property
    def owner_pid(self) -> int:
        """The pid of the process that created the segment."""
        return int(self.state.words[L.H_OWNER_PID])

    @property
    def is_owner(self) -> bool:
        """Whether this handle created the segment, in this process: closing it unlinks it."""
        return self._created_by == os.getpid()

    @property
    def strategy_name(self) -> str:
        """The owner's strategy, by name ("" for a custom strategy object)."""
        return L.read_name(self.state.buffer, L.H_STRATEGY_NAME)

    @property
    def closed(self) -> bool:
        """Whether this handle was closed (in this process)."""
        return not self._finalizer.alive

    @property
    def closed_by_owner(self) -> bool:
        """Whether the owner closed the segment: it is unlinked, its numbers frozen."""
        return self.state.version() == L.CLOSED

    # What every holder may do ------------------------------------------------------------

    def snapshot(self) -> list[BackendStats]:
        """Every registered backend's numbers, the same from every attached process."""
        return self.state.snapshot(self.state.clock())

    def workers(self) -> list[int]:
        """Pids of the live processes that hold a worker row (that have picked)."""
        return [pid for _, pid, start in self.state.rows() if is_alive(pid, start)]

    def reap(self, *, blocking: bool = True) -> int:
        """Reclaim the in-flight counts of worker processes that died; return how many died.

        Not `blocking`: raise `LockBusy` rather than wait for the lock.
        """
        state = self.state
        dead = 0
        for row, pid, start in state.rows():
            if not is_alive(pid, start) and state.reap(row, pid, start, blocking):
                dead += 1
        return dead

    def after_fork(self) -> None:
        """In a forked child: an unshared state gets a lock of its own."""
        self.state.after_fork(None if self._shm is not None else threading.Lock())

    def close(self) -> None:
        """Detach; in the owner, first mark the segment closed and unlink it."""
        self._finalizer()

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "owner" if self.is_owner else "attached"
        return f"<Segment {self.name or 'unshared'} {'closed' if self.closed else role}>"


def _release(shm: shared_memory.SharedMemory | None, state: SharedState, owner_pid: int) -> None:
    owner = owner_pid == os.getpid()
    if owner:
        state.mark_closed()
    state.release_views()
    if shm is not None:
        shm.close()
        if owner:
            shm.unlink()


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


# Shared memory ---------------------------------------------------------------------------


def _create_shm(size: int) -> shared_memory.SharedMemory:
    """Create a zeroed owner-only (0600) segment under an unguessable name, touched so a full
    /dev/shm fails now: tmpfs allocates lazily, and an untouched segment would fail later with
    SIGBUS at a random write instead of an error here."""
    shm = shared_memory.SharedMemory(NAME_PREFIX + secrets.token_hex(8), create=True, size=size)
    try:
        _buffer(shm)[:size] = bytes(size)
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    return shm


def _attach_shm(name: str) -> shared_memory.SharedMemory:
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


def _buffer(shm: shared_memory.SharedMemory) -> memoryview:
    buf = shm.buf
    if buf is None:
        raise SegmentError(f"shared memory {shm.name!r} is closed")
    return buf


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
