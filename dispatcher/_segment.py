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

A segment made by `Balancer.shared` belongs to no process: it is shared by the processes of
one server (the children of one parent process, or the holders of one scope string), any of
which may be SIGKILLed. It is registered with nobody's tracker, and its monitor removes it
once no live process holds a worker row in it (`remove_unheld`). Its processes find it through
a creation lock: an owner-only file in /dev/shm whose name is a digest of the user, the scope
and the balancer's name, holding the segment's (random) name. ``flock`` on it, which the kernel
releases if its holder dies, makes "find it or create it, and take a row in it" one step, so
workers that all start at once make one segment, and the monitor never removes a segment a
process is joining.

Only files that are regular, owned by this user and named by this package are opened: /dev/shm
is shared by every user of the machine.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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
SCOPE_PREFIX = "dispatcher-scope-"
"""The creation locks of shared segments, in /dev/shm: `SCOPE_PREFIX` + 32 hex digits."""
SHM_DIR = "/dev/shm"
CLOSE_WAIT_S = 2.0
"""How long closing waits for a lock another process holds before detaching without it."""
CREATION_WAIT_S = 30.0
"""How long `Segment.shared` waits for another process's creation lock (held for the few
milliseconds a creation takes) before it gives up with `SegmentError`."""


@dataclass(frozen=True)
class Scope:
    """Which processes share the segment of a `Balancer.shared` name, and what names its
    creation lock.

    By default the scope is the parent process, by pid and start time: the workers of one
    server share, and a restarted server (a new parent) never finds the old one's segment.
    A `named` scope is a string the caller picks, for processes that are not siblings.
    """

    kind: int
    """`_layout.SCOPE_PARENT` or `_layout.SCOPE_NAMED`."""
    key: bytes
    """16 bytes: the digest of (user, scope, name)."""
    owner_pid: int
    """The parent whose life the segment may not outlast; 0 for a named scope."""
    owner_start: int
    balancer: str
    """The name given to `Balancer.shared`."""

    @classmethod
    def of(cls, balancer: str, named: str | None = None, parent: int | None = None) -> Scope:
        """The scope of `balancer` in this process: children of `parent` (default: this
        process's parent), or `named`."""
        cls.check(balancer, named)
        if named is not None:
            kind, pid, start, label = L.SCOPE_NAMED, 0, 0, f"scope\0{named}"
        else:
            pid = os.getppid() if parent is None else parent
            start = (start_time(pid) or 0) if pid > 0 else 0
            if not start:
                pid = 0  # no parent to watch (we are pid 1, or it is gone): no owner
            kind, label = L.SCOPE_PARENT, f"parent\0{pid}\0{start}"
        text = f"{os.getuid()}\0{label}\0{balancer}".encode("utf-8", "surrogatepass")
        key = hashlib.blake2b(text, digest_size=16).digest()
        return cls(kind, key, pid, start, balancer)

    @staticmethod
    def check(balancer: object, named: object) -> None:
        """Raise `TypeError` or `ValueError` unless `balancer` and `named` are a balancer's name
        (what a header holds) and a scope string (or None)."""
        if not isinstance(balancer, str):
            raise TypeError(f"the balancer's name must be a str, not {type(balancer).__name__}")
        if not (0 < len(balancer) < L.NAME_BYTES and balancer.isascii() and balancer.isprintable()):
            raise ValueError(
                f"the balancer's name must be 1-{L.NAME_BYTES - 1} printable ASCII characters, "
                f"not {balancer!r}"
            )
        if named is not None and not isinstance(named, str):
            raise TypeError(f"scope must be a str, not {type(named).__name__}")
        if named == "":
            raise ValueError("scope must not be empty")

    @property
    def lock_path(self) -> str:
        return f"{SHM_DIR}/{SCOPE_PREFIX}{self.key.hex()}"


@dataclass(frozen=True)
class Recorded:
    """What a shared segment's header says it was made with, for later callers to compare."""

    capacity: int
    max_workers: int
    policy: EjectionPolicy
    strategy_name: str
    strategy_digest: int
    addrs_digest: int
    spec: bytes


log = logging.getLogger("dispatcher")

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
        scope: Scope | None = None,
        digests: tuple[int, int] = (0, 0),
    ) -> Segment:
        """A new segment holding `addrs` (canonical, at full weight at once), owned here.

        Not `shared`: the same state in this process's memory, under a `threading.Lock`.
        With a `scope` (see `shared`), no process owns it: nothing is registered with this
        process's resource tracker, and `digests` (of a custom strategy's class, of `addrs`)
        are recorded for later callers to compare.
        """
        shm: shared_memory.SharedMemory | None = None
        fd: int | None = None
        semaphore: Semaphore
        tracked = scope is None
        if shared:
            semaphore, lock_name = new_semaphore(tracked=tracked)
            try:
                shm, fd = _create_shm(layout.size, tracked)
            except BaseException:
                unlink_semaphore(lock_name, tracked=tracked)
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
            if scope is not None:
                _write_scope(state, scope, digests)
            state.populate(list(addrs))
        except BaseException:
            state.release_views()
            if shm is not None:
                shm.close()
                _unlink_shm(shm, tracked)
                os.close(fd)  # type: ignore[arg-type]
                unlink_semaphore(lock_name, tracked=tracked)
            raise
        segment = cls(state, shm, fd, lock_name, created=tracked)
        if shm is not None:
            with _registry_lock:
                _open[shm.name] = segment
        return segment

    @classmethod
    def shared(
        cls,
        scope: Scope,
        create: Callable[[], Segment],
        start: Callable[[Segment], None],
        check: Callable[[Segment], None],
    ) -> tuple[Segment, bool]:
        """The segment of `scope`, and whether this call made it; this process holds a worker
        row in it on return.

        Under the scope's creation lock: the segment its file names, if that one is still
        open and passes `check` (which raises if it was made with other options), or else a
        new one from `create`, with its row claimed and `start` (its monitor) done before its
        name is written, so the monitor never finds it unheld and no other process finds it
        half made. A segment that fails `check` is replaced if no live process holds it (a
        server restarted with new options, as ``uvicorn --reload`` does), else the error
        stands.
        """
        fd = _take_creation_lock(scope.lock_path)
        try:
            found = _read_creation_lock(fd)
            if found:
                with contextlib.suppress(SegmentError):
                    segment = cls.open(found)
                    try:
                        if segment.scope_key == scope.key and not segment.closed_by_owner:
                            _check_or_replace(segment, check, fd)
                            segment.claim_row()
                            return segment, False
                    except _Replaced:
                        pass
                    except BaseException:
                        segment.close()
                        raise
                    segment.close()
                _write_creation_lock(fd, "")
            segment = create()
            try:
                segment.claim_row()
                start(segment)
                _write_creation_lock(fd, segment.name)
            except BaseException:
                segment.remove_unheld(force=True, lock_fd=fd)
                segment.close()
                raise
            return segment, True
        finally:
            os.close(fd)

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
    def scope_kind(self) -> int:
        """`_layout.OWNED`, or how a segment with no owner is shared (`_layout.SCOPE_*`)."""
        return int(self.state.words[L.H_SCOPE])

    @property
    def scope_key(self) -> bytes:
        """The digest that names a shared segment's creation lock (zeros if owned)."""
        words = self.state.words
        return b"".join(
            int(words[L.H_SCOPE_KEY + i]).to_bytes(8, "little", signed=True) for i in range(2)
        )

    @property
    def shared_name(self) -> str:
        """The name given to `Balancer.shared` ("" for an owned segment)."""
        return L.read_name(self.state.buffer, L.H_SHARED_NAME)

    def recorded(self) -> Recorded:
        """What the segment was made with, as its header records it."""
        state, words = self.state, self.state.words
        return Recorded(
            state.layout.capacity,
            state.layout.max_workers,
            state.policy,
            self.strategy_name,
            int(words[L.H_STRATEGY_DIGEST]),
            int(words[L.H_ADDRS_DIGEST]),
            L.read_spec(state.buffer),
        )

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
        return self.reclaim(blocking=blocking, reaped=reaped)[0]

    def reclaim(
        self,
        *,
        blocking: bool = True,
        reaped: Callable[[int, int, int], object] | None = None,
    ) -> tuple[int, int]:
        """`reap`, returning (dead workers reaped, calls in flight reclaimed from them)."""
        state = self.state
        dead = calls = 0
        for row, pid, start in state.rows():
            if is_alive(pid, start):
                continue
            base = state.row_base(row)
            # No lock: a dead process's row changes only by a reap, which this one repeats.
            counted = sum(state.words[base : base + state.layout.capacity].tolist())
            if state.reap(row, pid, start, blocking):
                dead += 1
                calls += counted
                if reaped is not None:
                    reaped(pid, start, counted)
        return dead, calls

    def remove_unheld(
        self,
        *,
        force: bool = False,
        lock_fd: int | None = None,
        keep_creation_lock: bool = False,
    ) -> bool:
        """A shared segment's end: if no live process holds a worker row in it (or `force`),
        mark it closed and remove its names (segment, lock, and its creation lock if that
        still names it or nothing, unless `keep_creation_lock`); return whether it did.

        Under its creation lock, so that no process joins it meanwhile; a creation lock held
        elsewhere means someone is joining: try again later (return False). `lock_fd`: this
        process holds the creation lock already, on that descriptor.
        """
        path = f"{SHM_DIR}/{SCOPE_PREFIX}{self.scope_key.hex()}"
        fd = lock_fd
        if fd is None:
            try:
                fd = _take_creation_lock(path, wait=False, create=False)
            except LockBusy:
                return False
            except FileNotFoundError:
                fd = None  # nobody can find the segment to join it
        try:
            if not force:
                self.reap()
                if self.state.rows():
                    return False
            if not self.closed_by_owner:
                self.state.mark_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{SHM_DIR}/{self.name}")
            unlink_semaphore(self._lock_name, tracked=False)
            if (
                fd is not None
                and not keep_creation_lock
                and _read_creation_lock(fd) in ("", self.name)
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            return True
        finally:
            if fd is not None and lock_fd is None:
                os.close(fd)

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


def _create_shm(size: int, tracked: bool = True) -> tuple[shared_memory.SharedMemory, int]:
    """A new owner-only (0600) segment under an unguessable name, its pages reserved now;
    registered with this process's resource tracker if `tracked`.

    tmpfs allocates pages lazily: a segment bigger than what /dev/shm has left would fail
    later with SIGBUS at a random write, so the space is reserved here or refused.
    """
    name = NAME_PREFIX + secrets.token_hex(8)
    if tracked:
        shm = shared_memory.SharedMemory(name, create=True, size=size)
    elif sys.version_info >= (3, 13):
        shm = shared_memory.SharedMemory(name, create=True, size=size, track=False)
    else:
        with _untracked():
            shm = shared_memory.SharedMemory(name, create=True, size=size)
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
        _unlink_shm(shm, tracked)
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise SegmentError(
                f"{SHM_DIR} has no room for the balancer's segment: it needs {size:,} bytes "
                f"({size / 2**20:.1f} MiB); make /dev/shm larger (Docker: --shm-size) or the "
                f"balancer smaller (capacity, max_workers)"
            ) from None
        raise SegmentError(f"cannot reserve {size:,} bytes in {SHM_DIR}: {exc}") from None
    except BaseException:
        shm.close()
        _unlink_shm(shm, tracked)
        raise
    return shm, fd


class _Replaced(Exception):
    """A shared segment made with other options, held by nobody, was removed."""


def _check_or_replace(segment: Segment, check: Callable[[Segment], None], fd: int) -> None:
    """`check(segment)`; if it raises and no live process holds the segment, remove it (the
    creation lock, held on `fd`, stays: the caller writes a new name in it) and raise
    `_Replaced`."""
    try:
        check(segment)
    except DispatcherError:
        if not segment.remove_unheld(lock_fd=fd, keep_creation_lock=True):
            raise
        log.warning(
            "%s: removed the shared balancer %r: made with other options, and no process "
            "holds it any more (a server restarted with new options?)",
            segment.name,
            segment.shared_name,
        )
        raise _Replaced from None


def _unlink_shm(shm: shared_memory.SharedMemory, tracked: bool) -> None:
    """Remove a segment's name; one this process never registered is removed without telling
    the resource tracker, which would complain of an unknown name (or start just for that)."""
    if tracked:
        shm.unlink()
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{SHM_DIR}/{shm.name}")


def _write_scope(state: SharedState, scope: Scope, digests: tuple[int, int]) -> None:
    """Record in a fresh header that the segment is shared under `scope`: no owner but the
    scope's parent, whose life it may not outlast."""
    words = state.words
    words[L.H_OWNER_PID] = scope.owner_pid
    words[L.H_OWNER_START] = scope.owner_start
    for i in range(2):
        words[L.H_SCOPE_KEY + i] = int.from_bytes(
            scope.key[8 * i : 8 * i + 8], "little", signed=True
        )
    words[L.H_STRATEGY_DIGEST], words[L.H_ADDRS_DIGEST] = digests
    L.write_name(state.buffer, L.H_SHARED_NAME, scope.balancer)
    words[L.H_SCOPE] = scope.kind


# Creation locks --------------------------------------------------------------------------


def _take_creation_lock(path: str, *, wait: bool = True, create: bool = True) -> int:
    """A descriptor of the creation lock file `path`, exclusively locked (``flock``: the
    kernel releases it if this process dies); closing the descriptor releases it.

    The file must be a regular, owner-only file of this user's. A file removed (by
    `remove_unheld`) while this process waited is not the lock any more: open it afresh.
    Not `wait`: raise `LockBusy` if another process holds it. Not `create`: an absent file
    is `FileNotFoundError`.
    """
    deadline = time.monotonic() + CREATION_WAIT_S
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    while True:
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and not create:
                raise
            raise SegmentError(f"cannot open the creation lock {path}: {exc}") from None
        try:
            info = os.fstat(fd)
            _check_own(info, path)
            if info.st_mode & 0o077:
                raise SegmentError(f"{path} is readable by others (mode {info.st_mode & 0o777:o})")
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not wait:
                        raise LockBusy(f"{path} is held by another process") from None
                    if time.monotonic() > deadline:
                        raise SegmentError(
                            f"the creation lock {path} stayed taken for {CREATION_WAIT_S:g} s "
                            f"(a process stopped while creating the balancer?)"
                        ) from None
                    time.sleep(0.005)
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if not create:
            raise FileNotFoundError(path)


def _read_creation_lock(fd: int) -> str:
    """The segment name a creation lock holds ("" if none or not a segment name)."""
    data = os.pread(fd, 64, 0)
    name = data.decode("ascii", "replace").strip()
    valid = name.startswith(NAME_PREFIX) and name[len(NAME_PREFIX) :].isalnum()
    return name if valid else ""


def _write_creation_lock(fd: int, name: str) -> None:
    data = name.encode("ascii") + b"\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


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
    """Keep this package's segments out of the resource tracker meanwhile (3.11 and 3.12
    register a segment on attach as well as on create)."""
    original = resource_tracker.register

    def register(name: Any, rtype: str) -> None:
        if rtype != "shared_memory" or not str(name).lstrip("/").startswith(NAME_PREFIX):
            original(name, rtype)

    resource_tracker.register = register
    try:
        yield
    finally:
        resource_tracker.register = original
