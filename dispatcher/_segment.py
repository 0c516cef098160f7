"""A balancer's shared segment, as one process holds it: create or open it, reap, close it.

`Segment` is the handle on a segment apart from any balancer: the monitor process and
``dispatcher top`` hold one alone, a `Balancer` holds one beside its strategy and proxies.
A process opens each segment once: every `Balancer` of that segment in the process (the
owner's, those attached or unpickled later) shares one `Segment`, and with it one worker row,
which goes back to the pool when the last of them is closed or collected.

CPython 3.11 and 3.12 register a segment with the resource tracker on *attach* as well as on
create, and a process with a tracker of its own (anything not started by `multiprocessing`)
unlinks every registered segment when it exits. So only the creator registers; every attach
suppresses the registration (``track=False`` on 3.13+). Calling ``unregister`` after the fact
does not work: the tracker is shared with the creator and would drop the creator's entry. The
creator's registration is kept on purpose: if the owner is SIGKILLed, its tracker unlinks the
segment (and its lock's name) once every process holding it has exited.

Only files that are regular, owned by this user and named by this package are opened: /dev/shm
is shared by every user of the machine.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import resource_tracker, shared_memory
from typing import Any

from . import _layout as L
from ._lock import Semaphore, new_semaphore, open_semaphore, unlink_semaphore
from ._policy import EjectionPolicy
from ._state import SharedState
from ._view import BackendStats
from ._workers import any_stopped_mapping, is_alive, start_time
from .errors import CapacityExceeded, DispatcherError, LockBusy, SegmentError

NAME_PREFIX = "dispatcher_"
SHM_DIR = "/dev/shm"
CLOSE_WAIT_S = 2.0
"""How long closing waits for a lock another process holds before detaching without it."""

_registry_lock = threading.Lock()
_open: dict[str, Segment] = {}
"""The segments open in this process, by name: a second `open` shares the first."""


class Segment:
    """One balancer segment open in this process: its mapping, its lock, its `SharedState`.

    `create` makes a segment; `open` attaches to one made elsewhere, or shares the one this
    process already has open. Each `create` or `open` is one handle, given back by `close`;
    the mapping goes when the last handle does. Closing with ``unlink=True`` (the owner) also
    marks the segment closed (every attached process gets `SegmentError` on its next pick)
    and removes its names. Interpreter exit closes what is left.
    """

    def __init__(
        self,
        state: SharedState,
        shm: shared_memory.SharedMemory | None,
        fd: int | None,
        lock_name: str,
        created: bool,
    ) -> None:
        self.state = state
        self._shm = shm
        self._lock_name = lock_name
        self._created_by = os.getpid() if created else -1
        self._handles = 1
        self._closing = threading.Lock()
        self._finalizer = weakref.finalize(self, _detach, shm, fd, state)

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
        fd: int | None = None
        semaphore: Semaphore
        if shared:
            semaphore, lock_name = new_semaphore()
            try:
                shm, fd = _create_shm(layout.size)
            except BaseException:
                unlink_semaphore(lock_name)
                raise
            path = f"{SHM_DIR}/{shm.name}"
            state = SharedState(
                _buffer(shm),
                layout,
                semaphore,
                recovery_fd=fd,
                behalf=open_semaphore(lock_name),
                any_stopped=lambda: any_stopped_mapping(path),
            )
        else:
            semaphore, lock_name = threading.Lock(), ""
            state = SharedState(bytearray(layout.size), layout, semaphore)
        try:
            L.write_header(state.words, layout, os.getpid(), start_time(os.getpid()) or 0)
            L.write_name(state.buffer, L.H_LOCK_NAME, lock_name)
            L.write_name(state.buffer, L.H_STRATEGY_NAME, strategy_name)
            state.store_policy(policy)
            state.populate(list(addrs))
        except BaseException:
            state.release_views()
            if shm is not None:
                shm.close()
                shm.unlink()
                os.close(fd)  # type: ignore[arg-type]
                unlink_semaphore(lock_name)
            raise
        segment = cls(state, shm, fd, lock_name, created=True)
        if shm is not None:
            with _registry_lock:
                _open[shm.name] = segment
        return segment

    @classmethod
    def open(cls, name: str) -> Segment:
        """Attach to the segment `name` (or share this process's handle on it), once its file
        and header check: a regular file of this user's, with a dispatcher header."""
        with _registry_lock:
            segment = _open.get(name)
            if segment is not None and not segment.closed:
                segment._handles += 1
                return segment
            segment = cls._attach(name)
            _open[name] = segment
            return segment

    @classmethod
    def _attach(cls, name: str) -> Segment:
        if not isinstance(name, str) or not name.startswith(NAME_PREFIX) or "/" in name:
            raise SegmentError(f"{name!r} is not the name of a dispatcher segment")
        fd = _open_own_file(f"{SHM_DIR}/{name}")
        try:
            shm = _attach_shm(name)
        except BaseException:
            os.close(fd)
            raise
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
            lock_name = L.read_name(buf, L.H_LOCK_NAME)
            _check_own_file(f"{SHM_DIR}/sem.{lock_name.lstrip('/')}")
            path = f"{SHM_DIR}/{name}"
            state = SharedState(
                buf,
                layout,
                open_semaphore(lock_name),
                recovery_fd=fd,
                behalf=open_semaphore(lock_name),
                any_stopped=lambda: any_stopped_mapping(path),
            )
            state.load_policy()
        except BaseException:
            shm.close()
            os.close(fd)
            raise
        return cls(state, shm, fd, lock_name, created=False)

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
        """Whether this process created the segment."""
        return self._created_by == os.getpid()

    @property
    def strategy_name(self) -> str:
        """The owner's strategy, by name ("" for a custom strategy object)."""
        return L.read_name(self.state.buffer, L.H_STRATEGY_NAME)

    @property
    def closed(self) -> bool:
        """Whether every handle on the segment in this process was closed."""
        return not self._finalizer.alive

    @property
    def closed_by_owner(self) -> bool:
        """Whether the owner closed the segment: it is unlinked, its numbers frozen."""
        return self.state.version() == L.CLOSED

    # What every holder may do ------------------------------------------------------------

    def snapshot(self, *, timeout: float | None = None) -> list[BackendStats]:
        """Every registered backend's numbers, the same from every attached process.

        With a `timeout`, raise `LockBusy` rather than wait longer for the lock.
        """
        return self.state.snapshot(self.state.clock(), timeout=timeout)

    def workers(self) -> list[int]:
        """Pids of the live processes that hold a worker row (that have picked)."""
        return [pid for _, pid, start in self.state.rows() if is_alive(pid, start)]

    def reap(
        self,
        *,
        blocking: bool = True,
        reaped: Callable[[int, int, int], object] | None = None,
    ) -> int:
        """Reclaim the in-flight counts of worker processes that died; return how many died.

        Not `blocking`: raise `LockBusy` rather than wait for the lock. `reaped(pid, start,
        calls)` is called, with the lock released, for each dead worker reclaimed here.
        """
        state = self.state
        dead = 0
        for row, pid, start in state.rows():
            if is_alive(pid, start):
                continue
            base = state.row_base(row)
            calls = sum(state.words[base : base + state.layout.capacity])
            if state.reap(row, pid, start, blocking):
                dead += 1
                if reaped is not None:
                    reaped(pid, start, calls)
        return dead

    def claim_row(self, blocking: bool = True) -> int:
        """This process's worker row (word index of its slot 0), claimed on first use."""
        state = self.state
        with self._closing:
            if state.own_row >= 0:
                return state.own_row
            pid = os.getpid()
            start = start_time(pid)
            if start is None:
                raise DispatcherError(f"cannot read the start time of this process ({pid})")
            row = state.claim_row(pid, start, blocking)
            if row < 0 and not blocking:
                raise LockBusy("no free worker row: reaping may take the lock for long")
            if row < 0 and self.reap():
                row = state.claim_row(pid, start)
            if row < 0:
                raise CapacityExceeded(
                    f"all {state.layout.max_workers} worker rows are taken by live "
                    f"processes; create the balancer with a larger max_workers"
                )
            self._row = (row, pid, start)
            state.use_row(state.row_base(row))
            return state.own_row

    def after_fork(self) -> None:
        """In a forked child: no worker row yet; an unshared state gets a lock of its own."""
        self.state.after_fork(None if self._shm is not None else threading.Lock())

    def close(self, *, unlink: bool = False) -> None:
        """Give back one handle; with `unlink` (the owner), first mark the segment closed and
        remove its names, so no process can attach any more."""
        with _registry_lock:
            if self.closed:
                return
            if unlink and self.is_owner and self.state.version() != L.CLOSED:
                self._give_back_row()
                self.state.mark_closed()
                if self._shm is not None:
                    with contextlib.suppress(FileNotFoundError):
                        self._shm.unlink()
                    unlink_semaphore(self._lock_name)
            self._handles -= 1
            if self._handles > 0:
                return
            if _open.get(self.name) is self:
                del _open[self.name]
        self._give_back_row()
        self._finalizer()

    def _give_back_row(self) -> None:
        """Return this process's worker row, with whatever it still counts."""
        with self._closing:
            if self.state.own_row >= 0 and self.state.version() != L.CLOSED:
                row, pid, start = self._row
                with contextlib.suppress(LockBusy):  # left to the monitor, once we are gone
                    self.state.reap(row, pid, start, timeout=CLOSE_WAIT_S)
                self.state.use_row(-1)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "owner" if self.is_owner else "attached"
        return f"<Segment {self.name or 'unshared'} {'closed' if self.closed else role}>"


def _detach(shm: shared_memory.SharedMemory | None, fd: int | None, state: SharedState) -> None:
    """Drop the mapping. Under the lock, so no thread of this process is inside it then; a
    thread that takes the lock afterwards finds the views released before it writes a word."""
    if state.closed:
        return

    def release() -> None:
        state.words[L.H_LOCK_PID] = 0  # the views go before the lock is released
        state.release_views()

    try:
        state.lock.run(release, timeout=CLOSE_WAIT_S)
    except (LockBusy, SegmentError, ValueError):
        state.release_views()
    if shm is not None:
        with contextlib.suppress(BufferError):  # a thread still reads a view: at collection
            shm.close()
    if fd is not None:
        os.close(fd)


def _forget_after_fork() -> None:
    for segment in list(_open.values()):
        if not segment.closed:
            segment.after_fork()


os.register_at_fork(after_in_child=_forget_after_fork)


def find_by_owner(pid: int, *, closed: bool = False, directory: str = SHM_DIR) -> list[str]:
    """Names of the balancer segments process `pid` created; closed ones too if `closed`.

    Only this user's regular files are read (never a FIFO, a link or another user's file).
    """
    found = []
    for name in sorted(os.listdir(directory)):
        if not name.startswith(NAME_PREFIX):
            continue
        try:
            fd = _open_own_file(os.path.join(directory, name))
        except SegmentError:
            continue
        try:
            head = os.read(fd, L.HEADER_WORDS * L.WORD)
        except OSError:
            continue
        finally:
            os.close(fd)
        if len(head) < L.HEADER_WORDS * L.WORD:
            continue
        words = memoryview(head).cast("q")
        if (
            words[L.H_MAGIC] == L.MAGIC
            and words[L.H_OWNER_PID] == pid
            and (closed or words[L.H_VERSION] != L.CLOSED)
        ):
            found.append(name)
    return found


# Files and shared memory -----------------------------------------------------------------


def _open_own_file(path: str) -> int:
    """A read-only descriptor of `path`, if it is a regular file of this user's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentError(f"{path} does not exist (its owner closed it?)") from None
    except OSError as exc:
        raise SegmentError(f"cannot open {path}: {exc}") from None
    try:
        _check_own(os.fstat(fd), path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_own_file(path: str) -> None:
    try:
        info = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        raise SegmentError(f"{path} does not exist (its owner closed it?)") from None
    except OSError as exc:
        raise SegmentError(f"cannot read {path}: {exc}") from None
    _check_own(info, path)


def _check_own(info: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise SegmentError(f"{path} is not a regular file")
    if info.st_uid != os.getuid():
        raise SegmentError(f"{path} belongs to uid {info.st_uid}, not to this user")


def _create_shm(size: int) -> tuple[shared_memory.SharedMemory, int]:
    """A new owner-only (0600) segment under an unguessable name, its pages reserved now.

    tmpfs allocates pages lazily: a segment bigger than what /dev/shm has left would fail
    later with SIGBUS at a random write, so the space is reserved here or refused.
    """
    shm = shared_memory.SharedMemory(NAME_PREFIX + secrets.token_hex(8), create=True, size=size)
    path = f"{SHM_DIR}/{shm.name}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            raise
    except OSError as exc:
        shm.close()
        shm.unlink()
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise SegmentError(
                f"{SHM_DIR} has no room for the balancer's segment: it needs {size:,} bytes "
                f"({size / 2**20:.1f} MiB); make /dev/shm larger (Docker: --shm-size) or the "
                f"balancer smaller (capacity, max_workers)"
            ) from None
        raise SegmentError(f"cannot reserve {size:,} bytes in {SHM_DIR}: {exc}") from None
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    return shm, fd


def _attach_shm(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment without ever letting this process's tracker unlink it."""
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
    original = resource_tracker.register

    def register(name: Any, rtype: str) -> None:
        if rtype != "shared_memory":
            original(name, rtype)

    resource_tracker.register = register
    try:
        yield
    finally:
        resource_tracker.register = original
