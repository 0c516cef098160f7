"""The shared numbers of one balancer and the discipline of the lock that guards them.

Lock discipline, which every method here follows:

* One lock (`_lock.SharedLock`) guards every write to the segment. Reads may be unlocked (a
  strategy scanning in-flight counts sees values at most one commit old); decisions that must
  be exact, like "is this slot still the one I chose", are re-checked under the lock.
* Nothing under the lock blocks, performs I/O, calls user code or allocates more than a
  constant: values are computed before the lock is taken and only written inside it.
* Each update writes the word that makes it visible last (a slot's STATE, the membership
  VERSION), so a process that dies between two writes leaves the update invisible, not
  half-done. The one derived total, global in-flight, can be recomputed from the per-worker
  rows (`repair`).

Each process that picks owns one worker row: its own in-flight per slot, next to its pid and
start time, so the contribution of a process that dies mid-call can be subtracted (`reap`).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from itertools import compress
from time import monotonic_ns
from typing import TYPE_CHECKING, Any, TypeVar

from . import _layout as L
from ._core import speedups
from ._latency import (
    Counters,
    RecentWindow,
    failed_once_more,
    failure_score,
    peak_ewma,
    penalty_drops_at,
    percentiles_ns,
    sample_ns,
)
from ._layout import BUCKETS, DRAINING, H_CURSOR, H_LATENCY, H_LOCK_PID, H_VERSION, bucket_of
from ._lock import Semaphore, SharedLock
from ._orca import REPORT_EXPIRY_NS, WEIGHT_PERIOD_NS, LoadReport, Reported, Weighing
from ._policy import WARMTH_STEPS, EjectionPolicy
from ._view import BackendStats, Membership, View
from ._workers import is_alive
from .errors import CapacityExceeded, DuplicateBackend, SegmentError, UnknownBackend

if TYPE_CHECKING:
    from ._speedups import HotPath

SUCCESS = 0
FAILURE = 1
CANCELLED = 2
"""Outcomes of a call: a cancelled call (KeyboardInterrupt, a killed task) only ends in-flight."""

T = TypeVar("T")

# A call's ticket, made by the balancer, filled by `commit` and closed by `finish`: a list, so
# that the two lock holds can write in it, with no interruptible step between the hold and the
# record of what it did (see `_lock`).
SLOT, GENERATION, PROXY, START = range(4)
UNCOUNTED = -1
"""`call[GENERATION]` before `commit` counted the call."""
ENDED = -2
"""`call[GENERATION]` once `finish` recorded its end (or found nothing to record)."""
WEIGHT_CHANGE = 0.05
"""Reported weights that move less than this (relative) leave every process's view as it is."""
ALL_FIELDS = tuple(range(L.SLOT_FIELDS))
MEMBERSHIP_FIELDS = (
    L.STATE,
    L.GENERATION,
    L.WEIGHT,
    L.EJECTED_UNTIL_NS,
    L.ROTATION_NS,
    L.DOWN,
    L.FAIL_SCORE,
    L.FAIL_STAMP_NS,
    L.REPORTED_WEIGHT,
)
"""What a view is built from: the fields a rebuild copies under the lock."""
REPORT_FIELDS = (
    L.REQUESTS,
    L.FAILURES,
    L.REPORT_LOAD,
    L.REPORT_RPS,
    L.REPORT_EPS,
    L.REPORT_NS,
    L.REPORT_SINCE_NS,
    L.REQUESTS_MARK,
    L.FAILURES_MARK,
)
LOOKUP_TRIES = 3
"""Lookups before the lock that a moving membership version may void, before one under it."""
_MOVED = object()
"""What an update under the lock answers when the version moved since its lookup."""
VIEW_MAX_AGE_NS = 1_000_000_000
"""With a monitor, a view is rebuilt at least this often, so that every process that picks
looks at the monitor's heartbeat (`_monitor.check`)."""


class _End:
    """What recording a call's end writes besides the counts, worked out outside the lock."""

    __slots__ = ("bucket", "ewma", "now", "score", "score_was")

    def __init__(self, now: int) -> None:
        self.now = now
        self.bucket = -1
        """The histogram word to count the call in; -1: latency is not recorded."""
        self.ewma = 0.0
        self.score = self.score_was = 0.0


class SharedState:
    """Operations on one segment's words; every write happens under `lock`.

    `clock` gives every timestamp stored in the segment (CLOCK_MONOTONIC, which Linux shares
    across processes, in nanoseconds); tests replace it to move time at will.
    """

    commit: Callable[[int, int, int, list[Any], bool], bool]
    """Count a call on a slot: `_commit`, or the compiled core's (`_core`)."""
    finish: Callable[..., None]
    """Record a call's end: `_finish`, or the compiled core's (`_core`)."""

    def __init__(
        self,
        buffer: memoryview | bytearray,
        layout: L.Layout,
        semaphore: Semaphore,
        *,
        recovery_fd: int | None = None,
        behalf: Semaphore | None = None,
        any_stopped: Callable[[], bool] = lambda: False,
    ) -> None:
        self.layout = layout
        self.clock: Callable[[], int] = monotonic_ns
        self.own_row = -1
        """Word index of slot 0 of this process's worker row; -1 until it claims one."""
        self.unfinished: list[tuple[list[Any], int]] = []
        self._address_cache: dict[int, tuple[int, str]] = {}
        """Ends of calls that an interrupt kept from being recorded; `settle` records them."""
        self.closed = False
        self._buf = memoryview(buffer)[: layout.size]
        self._words = self._buf.cast("q")
        self._floats = self._buf.cast("d")
        self._views: list[memoryview[Any]] = [self._buf, self._words, self._floats]
        c = layout.capacity
        self._c = c
        self._state = layout.field(L.STATE)
        self._gen = layout.field(L.GENERATION)
        self._weight = layout.field(L.WEIGHT)
        self._inflight = layout.field(L.IN_FLIGHT)
        self._requests = layout.field(L.REQUESTS)
        self._failures = layout.field(L.FAILURES)
        self._consecutive = layout.field(L.CONSECUTIVE_FAILURES)
        self._last_failure = layout.field(L.LAST_FAILURE_NS)
        self._ejected_until = layout.field(L.EJECTED_UNTIL_NS)
        self._times_ejected = layout.field(L.TIMES_EJECTED)
        self._ewma = layout.field(L.EWMA_NS)
        self._stamp = layout.field(L.EWMA_STAMP_NS)
        self._rotation = layout.field(L.ROTATION_NS)
        self._down = layout.field(L.DOWN)
        self._fail_score = layout.field(L.FAIL_SCORE)
        """FAIL_STAMP_NS follows it: ``_fail_score + capacity`` is the same slot's stamp."""
        self._hist = layout.histogram
        self._zero_hist = bytes(L.BUCKETS * L.WORD)
        self._zero_rows = memoryview(bytes(layout.max_workers * L.WORD)).cast("q")
        self._zero_counts = memoryview(bytes(c * L.WORD)).cast("q")
        self.in_flight = self._slice(self._words, self._inflight)
        # The columns the two holds of every call touch, indexed by slot.
        self._gen_col = self._slice(self._words, self._gen)
        self._state_col = self._slice(self._words, self._state)
        self._requests_col = self._slice(self._words, self._requests)
        self._consecutive_col = self._slice(self._words, self._consecutive)
        self._no_row = memoryview(bytearray(c * L.WORD)).cast("q")
        """Where a process without a worker row counts its calls: its own memory."""
        self._own_col = self._no_row
        """This process's worker row, by slot (`use_row`)."""
        self.latency = self._slice(self._floats, self._ewma)
        self.latency_stamps = self._slice(self._words, self._stamp)
        self.lock = SharedLock(
            semaphore,
            self._slice(self._words, H_LOCK_PID, 1),
            alive=self._holder_alive,
            repair=self._normalize,
            any_stopped=any_stopped,
            recovery_fd=recovery_fd,
            behalf=behalf,
        )
        self._hot = self._compiled(semaphore)
        self.commit = self._commit if self._hot is None else self._hot.commit
        self.finish = self._finish if self._hot is None else self._hot.finish
        self._refresh_lock()
        self.policy = EjectionPolicy()
        self.recent = RecentWindow()
        """What this process's earlier snapshots saw, for the recent numbers of the next."""

    def _slice(self, view: memoryview[T], start: int, length: int = 0) -> memoryview[T]:
        part = view[start : start + (length or self._c)]
        self._views.append(part)
        return part

    def _compiled(self, semaphore: Semaphore) -> HotPath | None:
        """The compiled core's holds on this segment, if it is there and the lock is a named
        semaphore (an unshared state's `threading.Lock` is not)."""
        if speedups is None or not hasattr(semaphore, "handle"):
            return None
        hot: HotPath = speedups.HotPath(
            buffer=self._buf,
            semaphore=semaphore,
            commit=self._commit,
            finish=self._finish,
            owner=self,
            header=(H_LOCK_PID, H_VERSION, H_CURSOR),
            columns=(
                self._inflight,
                self._gen,
                self._state,
                self._requests,
                self._consecutive,
                self._ewma,
                self._stamp,
                self._hist,
            ),
            capacity=self._c,
            draining=DRAINING,
            ended=ENDED,
            ticket=(SLOT, GENERATION, START),
        )
        return hot

    def _refresh_lock(self) -> None:
        """Cache what the two hot holds use, straight from the lock."""
        self._take = self.lock.take
        self._release = self.lock.release_semaphore
        self._pid = self.lock.pid
        if self._hot is not None:
            self._hot.pid = self._pid

    def use_row(self, base: int) -> None:
        """Count this process's calls in the worker row whose slot 0 is word `base` (-1: none)."""
        column = self._slice(self._words, base) if base >= 0 else self._no_row
        # Only stores from here: no interrupt can leave `own_row` set with the column unset.
        self._own_col = column
        if self._hot is not None:
            self._hot.own_row = base
        self.own_row = base

    def release_views(self) -> None:
        """Drop every view of the buffer, so the segment can be closed.

        Any use of the state after this raises `ValueError` at its first read, before it
        changes anything; the hot paths take that as "closed".
        """
        self.closed = True
        if self._hot is not None:
            self._hot.release()
        for view in reversed(self._views):
            view.release()

    def after_fork(self, semaphore: Semaphore | None = None) -> None:
        """In a new process: no row yet, no calls of its own; `semaphore` if the old one stays
        behind (an unshared state's `threading.Lock`)."""
        self.lock.use(semaphore or self.lock.semaphore)
        self._refresh_lock()
        self.use_row(-1)
        self.unfinished = []

    # Header ------------------------------------------------------------------------------

    @property
    def words(self) -> memoryview:
        return self._words

    @property
    def buffer(self) -> memoryview:
        return self._buf

    def version(self) -> int:
        return int(self._words[L.H_VERSION])

    def cursor(self) -> int:
        return int(self._words[L.H_CURSOR])

    def load_policy(self) -> None:
        w = self._words
        self.policy = EjectionPolicy(
            int(w[L.H_FAILURE_THRESHOLD]),
            int(w[L.H_EJECTION_BASE_NS]),
            int(w[L.H_EJECTION_MAX_NS]),
            int(w[L.H_MAX_EJECTED_PERCENT]),
            int(w[L.H_SLOW_START_NS]),
            int(w[L.H_PANIC_PERCENT]),
        )

    def store_policy(self, policy: EjectionPolicy) -> None:
        w = self._words
        w[L.H_FAILURE_THRESHOLD] = policy.failure_threshold
        w[L.H_EJECTION_BASE_NS] = policy.base_ns
        w[L.H_EJECTION_MAX_NS] = policy.max_ns
        w[L.H_MAX_EJECTED_PERCENT] = policy.max_ejected_percent
        w[L.H_SLOW_START_NS] = policy.slow_start_ns
        w[L.H_PANIC_PERCENT] = policy.panic_percent
        self.policy = policy

    def mark_closed(self) -> None:
        """Owner only: make every attached process's next pick fail with `SegmentError`."""

        def update() -> None:
            self._words[L.H_VERSION] = L.CLOSED

        self.lock.run(update)

    def _locked(
        self, update: Callable[[], T], blocking: bool = True, timeout: float | None = None
    ) -> T:
        return self.lock.run(update, blocking, timeout)

    def _holder_alive(self, pid: int) -> bool:
        """Whether the process `pid`, recorded as the lock's holder, still runs."""
        for _, row_pid, start in self.rows():
            if row_pid == pid:
                return is_alive(pid, start)
        return is_alive(pid, None)

    # The hot path ------------------------------------------------------------------------

    def _commit(
        self, version: int, slot: int, cursor: int, call: list[Any], blocking: bool = True
    ) -> bool:
        """Count `call` on `slot` if the view it was chosen from still holds; False if stale.

        `cursor` is the shared cursor the choice was made from, or -1 if the choice did not
        use it; a used cursor is advanced only if no other pick got in first. The slot's
        generation goes into ``call[GENERATION]`` inside the hold, so whoever handles an
        interrupt knows whether the call was counted. Not `blocking`: raises `LockBusy`,
        having counted nothing, if the lock stays taken for a few tries.
        """
        words = self._words
        box: list[bool] | None = None
        # `lock.run`, written out: this and `_finish` are the two holds of every call. The
        # first try is a subscript outside the `try`: nothing can interrupt it before `got`
        # holds its result (see `_lock`).
        got = self._take[False]
        try:
            if not got:
                box = [False]
                self.lock.wait(box, blocking)
                got = True
            words[H_LOCK_PID] = self._pid
            counted = words[H_VERSION] == version and (cursor < 0 or words[H_CURSOR] == cursor)
            if counted:
                if cursor >= 0:
                    words[H_CURSOR] = cursor + 1
                self._own_col[slot] += 1
                self.in_flight[slot] += 1
                call[GENERATION] = self._gen_col[slot]
        except BaseException:
            if got or (box is not None and box[0]):
                try:  # noqa: SIM105
                    words[H_LOCK_PID] = 0
                except ValueError:  # the segment was closed meanwhile
                    pass
                self._release()
            raise
        words[H_LOCK_PID] = 0
        self._release()
        return counted

    def _finish(
        self,
        call: list[Any],
        outcome: int,
        blocking: bool = True,
        report: LoadReport | None = None,
    ) -> None:
        """Record the end of a call counted by `commit`: in-flight down, outcome, latency (when
        the call was timed: a start in ``call[START]``), and the load the backend reported
        with its answer, if any.

        Once: ``call[GENERATION]`` becomes ENDED in the same hold, and a call already ended
        (or never counted) is left alone. A call whose slot was unregistered meanwhile leaves
        no trace; one that ends after its balancer was closed, nothing either. Not `blocking`:
        raises `LockBusy`, having recorded nothing, if the lock stays taken.
        """
        slot, generation, _, start = call
        if generation < 0:
            return
        end = None
        if outcome != SUCCESS or start or report is not None:
            end = self._end(slot, outcome, start)
            if end is None:  # closed in this process: nothing left to record
                call[GENERATION] = ENDED
                return
        words = self._words
        box: list[bool] | None = None
        # `lock.run`, written out, as in `_commit`.
        got = self._take[False]
        try:
            if not got:
                box = [False]
                self.lock.wait(box, blocking)
                got = True
            words[H_LOCK_PID] = self._pid
            if call[GENERATION] == generation and self._gen_col[slot] == generation:
                in_flight = self.in_flight
                in_flight[slot] -= 1
                self._own_col[slot] -= 1
                call[GENERATION] = ENDED
                if self._state_col[slot] == DRAINING and in_flight[slot] == 0:
                    self._free(slot)  # the backend is gone: its last outcome goes with it
                elif end is None:
                    self._requests_col[slot] += 1
                    self._consecutive_col[slot] = 0
                elif outcome != CANCELLED:
                    self._record_end(slot, outcome, end, report)
            else:
                call[GENERATION] = ENDED
        except BaseException as exc:
            if got or (box is not None and box[0]):
                try:  # noqa: SIM105
                    words[H_LOCK_PID] = 0
                except ValueError:  # the segment was closed meanwhile
                    pass
                self._release()
            if isinstance(exc, ValueError) and self.closed:
                call[GENERATION] = ENDED  # closed in this process: nothing left to record
                return
            raise
        words[H_LOCK_PID] = 0
        self._release()

    def _end(self, slot: int, outcome: int, start: int) -> _End | None:
        """What recording an end writes, worked out before the lock is taken; `start` is 0 for
        a call whose latency is not recorded. None if the segment was closed in this process."""
        now = self.clock()
        end = _End(now)
        try:
            if start:
                latency = now - start
                end.bucket = self._hist + slot * BUCKETS + bucket_of(latency)
                average, stamp = self._floats[self._ewma + slot], self._words[self._stamp + slot]
                sample = sample_ns(latency, True) if outcome == FAILURE else float(latency)
                end.ewma = sample if sample >= average else peak_ewma(average, stamp, sample, now)
            if outcome == FAILURE:
                at = self._fail_score + slot
                score, stamp = self._floats[at], self._words[at + self._c]
                end.score_was = failure_score(score, stamp, now)
                end.score = failed_once_more(score, stamp, now)
        except ValueError:
            if self.closed:
                return None
            raise
        return end

    def _record_end(self, slot: int, outcome: int, end: _End, report: LoadReport | None) -> None:
        """Lock held. Count an answer or a failure, with what `_end` worked out."""
        words, now = self._words, end.now
        words[self._requests + slot] += 1
        if end.bucket >= 0:
            words[end.bucket] += 1
            self._floats[self._ewma + slot] = end.ewma
            words[self._stamp + slot] = now
        if report is not None:
            self._record_report(slot, report, now)
        if outcome == SUCCESS:
            words[self._consecutive + slot] = 0
            return
        at = self._fail_score + slot
        self._floats[at] = end.score
        words[at + self._c] = now
        if int(end.score) > int(end.score_was):
            words[H_VERSION] += 1  # the backend looks busier to every pick
        self._record_failure(slot, now)

    def record_latency(self, on: bool = True) -> None:
        """Have every process record the latency of each call (histogram and peak EWMA), or
        stop: what latency-aware strategies, dashboards and metrics read. Calls chosen from a
        view built after this are timed (`View.timed`): the new version makes every process
        rebuild its view."""
        words = self._words

        def update() -> None:
            if words[H_LATENCY] != on:
                words[H_LATENCY] = int(on)
                words[H_VERSION] += 1

        self._locked(update)

    def settle(self, blocking: bool = True) -> None:
        """Record the ends queued in `unfinished`. Each is recorded once, whoever gets to it.

        A call's end is queued before anything is called to record it: an interrupt raised
        at a function's entry (see `_lock`) then leaves it queued for the next `settle`
        instead of counted forever."""
        unfinished = self.unfinished
        while unfinished:
            try:
                entry = unfinished[0]
            except IndexError:  # another thread took the last one
                return
            self.finish(entry[0], entry[1], blocking)
            try:  # noqa: SIM105
                unfinished.remove(entry)
            except ValueError:  # another thread got there first
                pass

    def _record_report(self, slot: int, report: LoadReport, now: int) -> None:
        """Lock held. Keep the load `slot` reported of itself with its answer."""
        words, floats = self._words, self._floats
        at = self.layout.field(L.REPORT_NS) + slot
        if not words[at] or now - words[at] >= REPORT_EXPIRY_NS:
            words[self.layout.field(L.REPORT_SINCE_NS) + slot] = now
        floats[self.layout.field(L.REPORT_LOAD) + slot] = report.load
        floats[self.layout.field(L.REPORT_RPS) + slot] = report.rps_fractional
        floats[self.layout.field(L.REPORT_EPS) + slot] = report.eps
        words[at] = now

    def _record_failure(self, slot: int, now: int) -> None:
        """Lock held. Count a failure and eject the slot if the policy says so."""
        words = self._words
        policy = self.policy
        words[self._failures + slot] += 1
        words[self._last_failure + slot] = now
        consecutive = words[self._consecutive + slot] + 1
        words[self._consecutive + slot] = consecutive
        if consecutive < policy.failure_threshold or words[self._ejected_until + slot] > now:
            return
        live = ejected = 0
        for s in range(self._c):
            if words[self._state + s] == L.LIVE:
                live += 1
                ejected += words[self._ejected_until + s] > now
        if policy.may_eject(live, ejected):
            times = words[self._times_ejected + slot] + 1
            words[self._times_ejected + slot] = times
            words[self._ejected_until + slot] = now + policy.duration_ns(times)
            # Back from ejection it counts as unmeasured, so latency-aware picks probe it.
            self._floats[self._ewma + slot] = 0.0
            words[H_VERSION] += 1

    # Membership --------------------------------------------------------------------------

    def _copy_slots(
        self,
        fields: Sequence[int] = ALL_FIELDS,
        blocking: bool = True,
        timeout: float | None = None,
    ) -> tuple[int, memoryview, dict[int, str]]:
        """The membership version and `fields` of every slot, copied together under the lock,
        as words in the segment's field-major order (fields not asked for read 0); and the
        address of every registered slot.

        The buffers are allocated before the lock is taken and only copies run under it. The
        addresses are read outside it, from this process's cache of them by slot and
        generation: a slot keeps its address while it stays registered, and its generation
        moves before a new one is written (`_read_addresses`).
        """
        lay, c = self.layout, self._c
        wanted = sorted({*fields, L.STATE, L.GENERATION})
        out = bytearray(L.SLOT_FIELDS * c * L.WORD)
        sources = [self._buf[lay.field(f) * L.WORD : lay.field(f + 1) * L.WORD] for f in wanted]
        targets = [slice(f * c * L.WORD, (f + 1) * c * L.WORD) for f in wanted]

        def copy() -> int:
            for source, target in zip(sources, targets, strict=True):
                out[target] = source
            return int(self._words[L.H_VERSION])

        try:
            version = self._locked(copy, blocking, timeout)
        finally:
            for source in sources:
                source.release()
        words = memoryview(out).cast("q")
        return version, words, self._read_addresses(words)

    def _read_addresses(self, copied: memoryview) -> dict[int, str]:
        """The address of every slot registered in `copied` (a `_copy_slots` copy), read
        without the lock. A slot re-registered since the copy has another generation by now:
        its address is left out (the copy is stale, and the version that came with it says
        so to whoever uses it)."""
        c, cache, live = self._c, self._address_cache, self._words
        states = copied[L.STATE * c : (L.STATE + 1) * c].tolist()
        generations = copied[L.GENERATION * c : (L.GENERATION + 1) * c].tolist()
        found: dict[int, str] = {}
        base = self.layout.addresses
        for slot, state in enumerate(states):
            if state == L.FREE:
                continue
            generation = generations[slot]
            known = cache.get(slot)
            if known is not None and known[0] == generation:
                found[slot] = known[1]
                continue
            offset = base + slot * L.ADDRESS_BYTES
            addr = L.read_address(bytes(self._buf[offset : offset + L.ADDRESS_BYTES]), 0)
            if live[self._gen + slot] == generation:
                cache[slot] = (generation, addr)
                found[slot] = addr
        return found

    def membership(
        self, now: int, blocking: bool = True, max_age_ns: int | None = None
    ) -> Membership:
        """A consistent copy of who is eligible, taken under the lock and parsed outside it.

        `max_age_ns`: rebuild the view at least this often (a strategy fed by reports).
        """
        c = self._c
        version, f, addresses = self._copy_slots(MEMBERSHIP_FIELDS, blocking)
        if version == L.CLOSED:
            raise SegmentError("the balancer was closed by its owner")

        floats = f.cast("b").cast("d")

        def column(field: int) -> Sequence[int]:
            return f[(field * c) : (field + 1) * c]

        state, weight, down = column(L.STATE), column(L.WEIGHT), column(L.DOWN)
        scores = floats[L.FAIL_SCORE * c : (L.FAIL_SCORE + 1) * c]
        score_stamps = column(L.FAIL_STAMP_NS)
        penalties = [0] * c
        until, rotation_ns = column(L.EJECTED_UNTIL_NS), column(L.ROTATION_NS)
        policy = self.policy
        step = max(policy.slow_start_ns // WARMTH_STEPS, 1)
        weights = [float(w) for w in weight]
        addrs: list[str | None] = [None] * c
        live: list[str] = []
        rotation: list[int] = []
        eligible: list[int] = []
        expires = now + VIEW_MAX_AGE_NS if self._words[L.H_MONITOR] else 1 << 62
        if max_age_ns is not None:
            expires = min(expires, now + max_age_ns)
        for slot in range(c):
            if state[slot] == L.FREE:
                continue
            addr = addrs[slot] = addresses.get(slot)
            if addr is None:  # re-registered since the copy: this view is stale already
                continue
            live.append(addr)
            if state[slot] == L.DRAINING:
                continue
            rotation.append(slot)
            if until[slot] > now:
                expires = min(expires, until[slot])
            elif not down[slot]:
                eligible.append(slot)
                age = now - max(rotation_ns[slot], until[slot])
                if age < policy.slow_start_ns:
                    weights[slot] *= policy.warmth(age)
                    expires = min(expires, now + step)
            if scores[slot] > 0.0:
                score = failure_score(scores[slot], score_stamps[slot], now)
                penalty = penalties[slot] = int(score)
                if penalty:
                    expires = min(expires, penalty_drops_at(score, now, penalty))
        panic = policy.panics(len(rotation), len(eligible))
        slots = rotation if panic else eligible
        if not slots:
            expires = 0  # rebuilt at every pick, until one is eligible
        reported = floats[L.REPORTED_WEIGHT * c : (L.REPORTED_WEIGHT + 1) * c]
        view = View(
            version=version,
            slots=tuple(slots),
            weights=tuple(weights),
            in_flight=self.in_flight,
            latency=self.latency,
            expires_ns=expires,
            panic=panic,
            penalties=tuple(penalties) if any(penalties) else (),
            penalized=any(penalties),
            stamps=self.latency_stamps,
            clock=self.clock,
            members=tuple(rotation),
            reported=tuple(reported) if any(reported) else (),
            timed=bool(self._words[H_LATENCY]),
        )
        picked = set(slots)
        addrs = [addr if slot in picked else None for slot, addr in enumerate(addrs)]
        return Membership(view, tuple(addrs), frozenset(live))

    def populate(self, addrs: Sequence[str]) -> None:
        """Fill a new segment, before any other process can see it, with `addrs` (canonical,
        distinct) at weight 1, in slots 0, 1, ...: one hold, not one registration each."""
        if len(addrs) > self._c:
            raise CapacityExceeded(f"{len(addrs)} addresses do not fit capacity={self._c}")
        records = [L.address_record(addr) for addr in addrs]
        words, buf, base = self._words, self._buf, self.layout.addresses

        def update() -> None:
            for slot, record in enumerate(records):
                offset = base + slot * L.ADDRESS_BYTES
                buf[offset : offset + len(record)] = record
                words[self._weight + slot] = 1
                words[self._gen + slot] += 1
                words[self._state + slot] = L.LIVE
            words[H_VERSION] += 1

        self._locked(update)

    def register(self, addr: str, weight: int, warm_up: bool = True) -> int:
        """Put `addr` (canonical) in a free slot; return the slot.

        `warm_up`: the backend is new to a running pool, so slow start applies to it; the
        backends a pool starts with get their full share at once, as in Envoy.
        """
        record = L.address_record(addr)
        now = self.clock()

        def update(found: int, free: int) -> int:
            words = self._words
            if found >= 0 and words[self._state + found] == L.DRAINING:
                words[self._weight + found] = weight
                words[self._state + found] = L.LIVE
                words[H_VERSION] += 1
                return found
            if found >= 0:
                raise DuplicateBackend(addr)
            if free < 0:
                raise CapacityExceeded(f"all {self._c} backend slots are in use (capacity)")
            slot = free
            for field in range(L.SLOT_FIELDS):
                if field not in (L.STATE, L.GENERATION):
                    words[self.layout.field(field) + slot] = 0
            hist = (self._hist + slot * L.BUCKETS) * L.WORD
            self._buf[hist : hist + len(self._zero_hist)] = self._zero_hist
            offset = self.layout.addresses + slot * L.ADDRESS_BYTES
            self._buf[offset : offset + len(record)] = record
            words[self._weight + slot] = weight
            words[self._rotation + slot] = now if warm_up else 0
            words[self._gen + slot] += 1
            words[self._state + slot] = L.LIVE
            words[L.H_VERSION] += 1
            return slot

        return self._on_address(record, update, free=True)

    def unregister(self, addr: str) -> int:
        """Free the slot of `addr` at once; calls still in flight on it will leave no trace."""

        def update(slot: int, free: int) -> int:
            if slot < 0:
                raise UnknownBackend(addr)
            self._free(slot)
            return slot

        return self._on_address(L.address_record(addr), update)

    def set_weight(self, addr: str, weight: int) -> None:
        """Change the weight of a registered backend; every process sees it on its next pick."""

        def update(slot: int, free: int) -> None:
            if slot < 0:
                raise UnknownBackend(addr)
            self._words[self._weight + slot] = weight
            self._words[H_VERSION] += 1

        self._on_address(L.address_record(addr), update)

    def drain(self, addr: str) -> int:
        """Take `addr` out of rotation now and free its slot when its last call ends."""

        def update(slot: int, free: int) -> int:
            if slot < 0:
                raise UnknownBackend(addr)
            if self._words[self._inflight + slot] == 0:
                self._free(slot)
            else:
                self._words[self._state + slot] = L.DRAINING
                self._words[H_VERSION] += 1
            return slot

        return self._on_address(L.address_record(addr), update)

    def _on_address(
        self, record: bytes, update: Callable[[int, int], T], *, free: bool = False
    ) -> T:
        """``update(slot of record or -1, a free slot or -1)`` under the lock.

        The slots are looked up before the lock is taken, from the membership version seen
        then: every registration and release bumps it, so if it is unchanged under the lock
        the lookup still holds, and the hold does no search (at 4096 backends a search takes
        about a millisecond). A changed version means a new lookup, then a search under the
        lock if the version keeps moving.
        """
        words = self._words
        for _ in range(LOOKUP_TRIES):
            version = int(words[H_VERSION])
            found, spare = self._locate(record), self._free_slot() if free else -1

            def checked(found: int = found, spare: int = spare, version: int = version) -> T:
                if words[H_VERSION] != version:
                    return _MOVED  # type: ignore[return-value]
                return update(found, spare)

            result = self._locked(checked)
            if result is not _MOVED:
                return result
        return self._locked(lambda: update(self._find(record), self._free_slot() if free else -1))

    def _locate(self, record: bytes) -> int:
        """The registered (live or draining) slot whose address is `record`, or -1; no lock
        (what it finds holds while the membership version does)."""
        lay = self.layout
        region = bytes(self._buf[lay.addresses : lay.addresses + self._c * L.ADDRESS_BYTES])
        at = region.find(record)
        while at >= 0:
            slot, inside = divmod(at, L.ADDRESS_BYTES)
            if not inside and self._words[self._state + slot] != L.FREE:
                return slot
            at = region.find(record, at + 1)
        return -1

    def _free_slot(self) -> int:
        """The first free slot, or -1; no lock, as `_locate`."""
        states = self._words[self._state : self._state + self._c].tolist()
        return states.index(L.FREE) if L.FREE in states else -1

    def _free(self, slot: int) -> None:
        """Lock held. Free `slot`: its generation moves on, so calls still out leave no trace."""
        words = self._words
        words[self._state + slot] = L.FREE
        words[self._gen + slot] += 1
        words[self._inflight + slot] = 0
        words[self._column(slot)] = self._zero_rows
        words[H_VERSION] += 1

    def _column(self, slot: int) -> slice:
        """Where `slot`'s in-flight count lives in every worker row: one strided slice."""
        lay = self.layout
        start = lay.workers + L.W_HEADER + slot
        return slice(start, start + lay.max_workers * lay.worker_stride, lay.worker_stride)

    def _find(self, record: bytes) -> int:
        """Lock held. The registered (live or draining) slot whose address is `record`, or -1."""
        buf, words = self._buf, self._words
        base, size = self.layout.addresses, len(record)
        for slot in range(self._c):
            if words[self._state + slot] == L.FREE:
                continue
            offset = base + slot * L.ADDRESS_BYTES
            if buf[offset : offset + size] == record:
                return slot
        return -1

    # Weights from the backends' own reports ---------------------------------------------

    def weigh_reports(self, weighing: Weighing, now: int, blocking: bool = True) -> bool:
        """If a period went by, compute the weights from the backends' load reports for every
        process of the host (one of them does it: the first to claim the period), with the
        rates this host saw for backends that report none. Whether this process did."""
        words, c = self._words, self._c
        since = [0]

        def claim() -> bool:
            since[0] = int(words[L.H_WEIGHTS_NS])
            if now - since[0] < WEIGHT_PERIOD_NS:
                return False
            words[L.H_WEIGHTS_NS] = now
            return True

        if not self._locked(claim, blocking):
            return False
        _, f, _ = self._copy_slots(REPORT_FIELDS, blocking)
        floats = f.cast("b").cast("d")

        def column(field: int, data: Sequence[Any] = f) -> Sequence[Any]:
            return data[field * c : (field + 1) * c]

        requests, failures = column(L.REQUESTS), column(L.FAILURES)
        marks, failure_marks = column(L.REQUESTS_MARK), column(L.FAILURES_MARK)
        seconds = (now - since[0]) / 1e9 if since[0] else 0.0
        reports = [
            Reported(
                load=load,
                rps=rps,
                eps=eps,
                since_ns=report_since,
                last_ns=last,
                host_rps=(requests[slot] - marks[slot]) / seconds if seconds else 0.0,
                host_eps=(failures[slot] - failure_marks[slot]) / seconds if seconds else 0.0,
            )
            for slot, (load, rps, eps, report_since, last) in enumerate(
                zip(
                    column(L.REPORT_LOAD, floats),
                    column(L.REPORT_RPS, floats),
                    column(L.REPORT_EPS, floats),
                    column(L.REPORT_SINCE_NS),
                    column(L.REPORT_NS),
                    strict=True,
                )
            )
        ]
        weights = weighing.weights(reports, now)
        new = array("d", weights)
        new_marks, new_failure_marks = array("q", requests), array("q", failures)
        lay = self.layout

        def update() -> None:
            old = self._floats[lay.field(L.REPORTED_WEIGHT) : lay.field(L.REPORTED_WEIGHT) + c]
            changed = any(
                abs(a - b) > WEIGHT_CHANGE * max(a, b) for a, b in zip(old, new, strict=True)
            )
            old[:] = new
            old.release()
            words[lay.field(L.REQUESTS_MARK) : lay.field(L.REQUESTS_MARK) + c] = new_marks
            words[lay.field(L.FAILURES_MARK) : lay.field(L.FAILURES_MARK) + c] = new_failure_marks
            if changed:
                words[H_VERSION] += 1

        self._locked(update, blocking)
        return True

    # Retry budget and health -----------------------------------------------------------

    def take_retry(self, limit: int, blocking: bool = True) -> bool:
        """Count one more retry under way, unless `limit` of them already are."""

        def update() -> bool:
            words = self._words
            if words[L.H_RETRIES] >= limit:
                return False
            words[L.H_RETRIES] += 1
            words[self.own_row - L.W_HEADER + L.W_RETRIES] += 1
            return True

        return self._locked(update, blocking)

    def return_retry(self, blocking: bool = True) -> None:
        """Count one retry fewer under way: it ended."""

        def update() -> None:
            self._words[L.H_RETRIES] -= 1
            self._words[self.own_row - L.W_HEADER + L.W_RETRIES] -= 1

        self._locked(update, blocking)

    def retries(self) -> int:
        return int(self._words[L.H_RETRIES])

    def set_health(self, addr: str, passing: bool | None, down: bool) -> bool:
        """Record an active health check's verdict on `addr`; True if rotation changed.

        `down` holds the backend out of rotation; a `passing` probe also ends a passive
        ejection early (as Envoy does), since the backend has shown it answers again.
        """
        record = L.address_record(addr)
        now = self.clock()

        def update(slot: int, free: int) -> bool:
            words = self._words
            if slot < 0:
                return False
            was_down = bool(words[self._down + slot])
            changed = was_down != down
            words[self._down + slot] = int(down)
            if was_down and not down:
                words[self._rotation + slot] = now
            if passing and words[self._ejected_until + slot] > now:
                words[self._ejected_until + slot] = 0
                words[self._consecutive + slot] = 0
                changed = True
            if changed:
                words[H_VERSION] += 1
            return changed

        return self._on_address(record, update)

    # Observation -------------------------------------------------------------------------

    def snapshot(self, now: int, timeout: float | None = None) -> list[BackendStats]:
        """Every registered backend's numbers: the fields copied under the lock in one pass,
        the histograms (counters that only grow) read without it. The recent numbers are the
        difference with an earlier snapshot of this process (`RecentWindow`)."""
        lay, c = self.layout, self._c
        _, words, addresses = self._copy_slots(timeout=timeout)
        floats = words.cast("b").cast("d")
        hist_at = lay.histogram * L.WORD
        histograms = memoryview(self._buf[hist_at : hist_at + c * L.BUCKETS * L.WORD].tobytes())
        hist = histograms.cast("q")

        def at(field: int, slot: int) -> int:
            return int(words[field * c + slot])

        counters = {
            slot: Counters(
                addresses.get(slot, "?"),
                at(L.REQUESTS, slot),
                at(L.FAILURES, slot),
                tuple(hist[slot * L.BUCKETS : (slot + 1) * L.BUCKETS]),
            )
            for slot in range(c)
            if at(L.STATE, slot) != L.FREE
        }
        recent = self.recent.observe(now, counters)
        stats = []
        for slot, counted in counters.items():
            until = at(L.EJECTED_UNTIL_NS, slot)
            warm_since = max(until, at(L.ROTATION_NS, slot))
            last_failure = at(L.LAST_FAILURE_NS, slot)
            ewma = floats[L.EWMA_NS * c + slot]
            window = recent[slot]
            p50, p90, p99 = percentiles_ns(window.histogram, (0.5, 0.9, 0.99))
            stats.append(
                BackendStats(
                    addr=counted.addr,
                    weight=at(L.WEIGHT, slot),
                    in_flight=at(L.IN_FLIGHT, slot),
                    requests=counted.requests,
                    failures=counted.failures,
                    consecutive_failures=at(L.CONSECUTIVE_FAILURES, slot),
                    ejected=until > now,
                    ejected_until=until / 1e9 if until > now else None,
                    times_ejected=at(L.TIMES_EJECTED, slot),
                    down=bool(at(L.DOWN, slot)),
                    draining=at(L.STATE, slot) == L.DRAINING,
                    effective_weight=at(L.WEIGHT, slot) * self.policy.warmth(now - warm_since),
                    last_failure=last_failure / 1e9 if last_failure else None,
                    latency_ewma=ewma / 1e9 if ewma > 0 else None,
                    histogram=counted.histogram,
                    slot=slot,
                    window=window.window,
                    recent_requests=window.requests,
                    recent_failures=window.failures,
                    recent_histogram=window.histogram,
                    p50=None if p50 is None else p50 / 1e9,
                    p90=None if p90 is None else p90 / 1e9,
                    p99=None if p99 is None else p99 / 1e9,
                )
            )
        return stats

    # Worker rows -------------------------------------------------------------------------

    def row_base(self, row: int) -> int:
        """Word index of slot 0 of worker row `row`'s in-flight run."""
        return self.layout.workers + row * self.layout.worker_stride + L.W_HEADER

    def _heads(self, word: int) -> slice:
        """Where header word `word` (W_PID, W_START...) of every worker row lives."""
        lay = self.layout
        start = lay.workers + word
        return slice(start, start + lay.max_workers * lay.worker_stride, lay.worker_stride)

    def claim_row(self, pid: int, start: int, blocking: bool = True) -> int:
        """Take a free worker row for process (`pid`, `start`); -1 if none is free."""

        def update() -> int:
            words = self._words
            pids = words[self._heads(L.W_PID)].tolist()
            if 0 not in pids:
                return -1
            row = pids.index(0)
            base = self.row_base(row)
            head = base - L.W_HEADER
            words[base : base + self._c] = self._zero_counts
            words[head + L.W_RETRIES] = 0
            words[head + L.W_START] = start
            words[head + L.W_PID] = pid
            return row

        return self._locked(update, blocking)

    def rows(self) -> list[tuple[int, int, int]]:
        """(row, pid, start) of every claimed worker row; an unlocked read."""
        words = self._words
        pids = words[self._heads(L.W_PID)].tolist()
        starts = words[self._heads(L.W_START)].tolist()
        return [(row, pid, starts[row]) for row, pid in enumerate(pids) if pid]

    def reap(
        self, row: int, pid: int, start: int, blocking: bool = True, timeout: float | None = None
    ) -> bool:
        """Subtract a dead process's in-flight calls and free its row, if it still owns it.

        Interrupted half-way, the row keeps its owner and what is left of its counts, and the
        next reap finishes the job: each slot's count moves in one step.
        """

        def update() -> bool:
            words = self._words
            base = self.row_base(row)
            head = base - L.W_HEADER
            if words[head + L.W_PID] != pid or words[head + L.W_START] != start:
                return False
            counts = words[base : base + self._c].tolist()
            for slot in compress(range(self._c), counts):
                words[self._inflight + slot] -= words[base + slot]
                words[base + slot] = 0
                if words[self._inflight + slot] == 0 and words[self._state + slot] == L.DRAINING:
                    self._free(slot)
            words[L.H_RETRIES] -= words[head + L.W_RETRIES]
            words[head + L.W_RETRIES] = 0
            words[head + L.W_PID] = 0
            return True

        return self._locked(update, blocking, timeout)

    def repair(self) -> None:
        """Recompute everything derived, as after a process died in the middle of an update."""
        self._locked(self._normalize)

    def _normalize(self) -> None:
        """Lock held. Global in-flight := sum of worker rows; free slots hold no counts.

        Every update writes its visible word last, so this is all a half-done update can
        break; bumping the version makes every process rebuild its view from the result. It
        only recomputes, so running it again after an interruption finishes the job.
        """
        words, c = self._words, self._c
        totals = [0] * c
        retries = 0
        for row, _, _ in self.rows():
            base = self.row_base(row)
            retries += words[base - L.W_HEADER + L.W_RETRIES]
            counts = words[base : base + c].tolist()
            for slot in compress(range(c), counts):
                totals[slot] += counts[slot]
        states = words[self._state : self._state + c].tolist()
        for slot, state in enumerate(states):
            if state == L.FREE:
                if totals[slot] or words[self._inflight + slot]:
                    words[self._column(slot)] = self._zero_rows
                    words[self._gen + slot] += 1
                totals[slot] = 0
        words[self._inflight : self._inflight + c] = array("q", totals)
        for slot, state in enumerate(states):
            if state == L.DRAINING and totals[slot] == 0:
                self._free(slot)
        words[L.H_RETRIES] = retries
        words[H_VERSION] += 1
