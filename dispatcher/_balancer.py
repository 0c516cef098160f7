"""The `Balancer`: a `Backend` that spreads calls over backends with state shared by processes.

A call flows one way: the shared state gives a `View`, the strategy picks a slot from it, the
state commits the pick under the lock (or the balancer asks again if the view went stale),
the backend proxy of this process answers outside the lock, and the state records the outcome.
`_begin` is that flow up to the backend call; `_call.Call` is the rest.

The process that creates a balancer owns its segment and unlinks it on close. A forked child
keeps the mapping; a spawned child, or any process given the pickled balancer or its name,
attaches to it. Each process has its own worker row, proxies and view cache.

`Balancer.shared` makes a balancer that no process owns: the first process of a server to ask
for a name creates it, the others attach to it, and its monitor removes it when the server is
gone (see `_segment` and `_monitor`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, cast

from . import _events, _monitor
from . import _layout as L
from ._address import parse_address
from ._backends import Backend, HttpBackend
from ._call import Attempts, off_loop
from ._checks import MAX_WEIGHT, check_int, check_seconds
from ._events import Listener
from ._health import HealthCheck
from ._layout import H_CURSOR
from ._orca import WEIGHT_PERIOD_NS
from ._policy import EjectionPolicy
from ._segment import Scope, Segment
from ._state import (
    CANCELLED,
    FAILURE,
    GENERATION,
    PROXY,
    SLOT,
    START,
    SUCCESS,
    UNCOUNTED,
    SharedState,
)
from ._strategies import STRATEGIES, Strategy, make_strategy
from ._view import BackendStats, Membership, View
from ._workers import prefork_siblings
from .errors import (
    BackendError,
    CapacityExceeded,
    DispatcherError,
    DuplicateBackend,
    NoBackendAvailable,
    OptionMismatch,
    SegmentError,
)

BackendFactory = Callable[[str], Backend]
FailureRule = type[BaseException] | tuple[type[BaseException], ...] | Callable[[Exception], bool]

DEFAULT_FAILURES: tuple[type[BaseException], ...] = (BackendError, OSError)
"""What counts as a backend's failure unless a balancer is told otherwise: `BackendError`
(`HttpBackend`'s connection errors, timeouts and failure statuses) and ``OSError``
(``ConnectionError``, ``TimeoutError`` and the other I/O errors of any backend)."""

MAX_RETRIES = 100
RETRY_BUDGET_PERCENT = 20
RETRY_MIN_CONCURRENCY = 3

_UNBUILT = -2
_NO_VIEW = Membership(View(_UNBUILT, (), (), (), (), expires_ns=0), (), frozenset())
"""The view a balancer starts with, and keeps once closed: expired, so the next pick rebuilds
it (or, once closed, refuses)."""
_Route = tuple[Membership, dict[int, Backend]]
"""A membership, and this process's proxy for each of its slots picked so far."""

_balancers: weakref.WeakSet[Balancer] = weakref.WeakSet()


class _Shared:
    """This process's `Balancer.shared` balancers, kept open until it exits; a forked child
    inherits them, so it shares its parent's (with a fresh lock: another thread may have
    held this one at the fork)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.balancers: dict[tuple[str, str | None, BackendFactory, FailureRule], Balancer] = {}


_shared = _Shared()
_checked_siblings_in = [-1]
"""The process that last looked for sibling workers (`_warn_if_unshared_worker`)."""

log = logging.getLogger("dispatcher")


class Balancer:
    """Spreads calls over backends, with one view of load for every process that uses it.

    Itself a `Backend`: ``invoke(request, timeout=..., key=...)`` picks a backend, calls it
    outside the shared lock, and records the outcome. See the README for the arguments.

    `counts_as_failure` says which exceptions a backend raises are its failure (counted,
    toward ejection, retried): exception types, or a predicate ``(exception) -> bool``;
    `DEFAULT_FAILURES` unless given. Any other exception is the backend's answer about the
    request: counted as a request with its latency, ending the backend's failure streak, and
    raised to the caller without a retry.
    """

    def __init__(
        self,
        addrs: Iterable[str] = (),
        *,
        backend_factory: BackendFactory = HttpBackend,
        strategy: str | Strategy = "least_loaded",
        capacity: int = 64,
        max_workers: int = 128,
        failure_threshold: int = 5,
        ejection_seconds: float = 30.0,
        max_ejection_seconds: float = 300.0,
        max_ejected_percent: int = 50,
        slow_start_seconds: float = 0.0,
        panic_percent: int = 50,
        health_check: HealthCheck | None = None,
        latency: bool | None = None,
        monitor: bool = True,
        shared: bool = True,
        on_event: Listener | None = None,
        counts_as_failure: FailureRule = DEFAULT_FAILURES,
    ) -> None:
        if health_check is not None and not (shared and monitor):
            raise ValueError(
                "health checks run in the monitor: they need shared=True, monitor=True"
            )
        layout, policy, chosen, parsed = _validate(
            addrs,
            backend_factory,
            strategy,
            capacity,
            max_workers,
            failure_threshold,
            ejection_seconds,
            max_ejection_seconds,
            max_ejected_percent,
            slow_start_seconds,
            panic_percent,
            health_check,
        )
        is_failure = failure_rule(counts_as_failure)
        _events.check_listener(on_event, shared)
        name = strategy if isinstance(strategy, str) else ""
        segment = Segment.create(layout, policy, parsed, strategy_name=name, shared=shared)
        if latency is None:
            latency = bool(getattr(chosen, "uses_latency", False))
        segment.state.record_latency(bool(latency))
        if shared:
            log.info("balancer %s created, owned by process %d", segment.name, os.getpid())
            _warn_if_unshared_worker()
        try:
            watcher = None
            if shared and monitor:
                _monitor.configure(segment, health_check, on_event)
                watcher = _monitor.start(segment.name)
            elif on_event is not None:
                _events.store_spec(segment, None, on_event)
        except BaseException:
            segment.close(unlink=True)
            raise
        self._setup(
            segment,
            strategy,
            chosen,
            backend_factory,
            (counts_as_failure, is_failure),
            owner=True,
            monitor=watcher,
        )
        for addr in parsed:
            _events.membership(segment, _events.REGISTERED, addr, "at creation, weight 1")

    def _setup(
        self,
        segment: Segment,
        spec: str | Strategy,
        strategy: Strategy,
        backend_factory: BackendFactory,
        rule: tuple[FailureRule, Callable[[Exception], bool]],
        *,
        owner: bool = False,
        monitor: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self._segment = segment
        self._owner_pid = os.getpid() if owner else -1
        self._state = segment.state
        self._words = segment.state.words
        self._spec = spec
        self._strategy = strategy
        self._uses_cursor = bool(strategy.uses_cursor)
        self._uses_reports = bool(getattr(strategy, "uses_load_reports", False))
        self._factory = backend_factory
        self._failure_rule, self._is_failure = rule
        self._closed = False
        self._finalizer = weakref.finalize(self, _release, segment, owner, monitor)
        self._reset_process()
        _balancers.add(self)

    def _reset_process(self) -> None:
        """Forget everything that belongs to one process: proxies, view cache."""
        self._proxies: dict[str, Backend] = {}
        self._route: _Route = (_NO_VIEW, {})
        self._local_lock = threading.Lock()

    # One per server -----------------------------------------------------------------------

    @classmethod
    def shared(
        cls,
        name: str,
        addrs: Iterable[str] = (),
        *,
        scope: str | None = None,
        backend_factory: BackendFactory = HttpBackend,
        strategy: str | Strategy = "least_loaded",
        capacity: int = 64,
        max_workers: int = 128,
        failure_threshold: int = 5,
        ejection_seconds: float = 30.0,
        max_ejection_seconds: float = 300.0,
        max_ejected_percent: int = 50,
        slow_start_seconds: float = 0.0,
        panic_percent: int = 50,
        health_check: HealthCheck | None = None,
        latency: bool | None = None,
        on_event: Listener | None = None,
        counts_as_failure: FailureRule = DEFAULT_FAILURES,
    ) -> Balancer:
        """The one balancer called `name` in this server, whichever of its processes asks first.

        The server is, by default, the processes that share this one's parent process (by pid
        and start time: the workers of a gunicorn, uvicorn, hypercorn, uWSGI or Celery
        master, of a `multiprocessing` pool's parent); `scope` names another group. The first
        caller creates the balancer, the others attach to it (processes that call at the same
        instant included), and a forked child gets its parent's. Options are `Balancer`'s;
        a later caller whose options or `addrs` differ from the creator's gets
        `OptionMismatch`. `backend_factory` and `counts_as_failure` are each process's own.

        No process owns it: it outlives any one worker, and its monitor process, which also
        reaps dead workers and runs the health checks, removes it once no process of the
        server holds it (at once when the parent is gone, after a few seconds otherwise).
        The same call again in this process returns the same object.
        """
        Scope.check(name, scope)
        layout, policy, chosen, parsed = _validate(
            addrs,
            backend_factory,
            strategy,
            capacity,
            max_workers,
            failure_threshold,
            ejection_seconds,
            max_ejection_seconds,
            max_ejected_percent,
            slow_start_seconds,
            panic_percent,
            health_check,
        )
        is_failure = failure_rule(counts_as_failure)
        _events.check_listener(on_event, True)
        if latency is None:
            latency = bool(getattr(chosen, "uses_latency", False))
        wanted = _Wanted(name, layout, policy, strategy, parsed, health_check)
        key = (name, scope, backend_factory, counts_as_failure)
        with _shared.lock:
            found = _shared.balancers.get(key)
            if found is not None and not found.closed and not found._segment.closed_by_owner:
                wanted.compare(found._segment)
                found._segment.claim_row()
                return found
            where = Scope.of(name, scope)

            def create() -> Segment:
                segment = Segment.create(
                    layout,
                    policy,
                    parsed,
                    strategy_name=wanted.strategy_name,
                    scope=where,
                    digests=(wanted.strategy_digest, wanted.addrs_digest),
                )
                segment.state.record_latency(bool(latency))
                return segment

            started: list[subprocess.Popen[bytes]] = []

            def start(segment: Segment) -> None:
                _monitor.configure(segment, health_check, on_event)
                started.append(_monitor.start(segment.name, detach=True, announce=True, wait=False))

            try:
                segment, created = Segment.shared(where, create, start, wanted.compare)
            finally:
                for process in started:  # the monitor's first process: it forks and exits
                    process.wait()
            try:
                if not created:
                    _monitor.check(segment, segment.state.clock())
                balancer = cls.__new__(cls)
                rule = (counts_as_failure, is_failure)
                balancer._setup(segment, strategy, chosen, backend_factory, rule)
            except BaseException:
                segment.close()
                raise
            _shared.balancers[key] = balancer
        return balancer  # its monitor logs the segment's name once, at creation

    # Attaching ---------------------------------------------------------------------------

    @classmethod
    def attach(
        cls,
        name: str,
        *,
        backend_factory: BackendFactory = HttpBackend,
        strategy: str | Strategy | None = None,
        counts_as_failure: FailureRule = DEFAULT_FAILURES,
    ) -> Balancer:
        """Attach to the balancer whose segment is `name`, created by another process.

        `strategy` defaults to the owner's, when the owner chose one by name. The failure
        rule, like the backend factory, is this handle's own (it is code, not shared state).
        """
        is_failure = failure_rule(counts_as_failure)
        segment = Segment.open(name)
        try:
            if strategy is None:
                strategy = segment.strategy_name
                if strategy not in STRATEGIES:
                    raise ValueError(
                        f"the owner of {name!r} uses a custom strategy: pass strategy= to attach"
                    )
            chosen = make_strategy(strategy)
        except BaseException:
            segment.close()
            raise
        balancer = cls.__new__(cls)
        balancer._setup(segment, strategy, chosen, backend_factory, (counts_as_failure, is_failure))
        return balancer

    def __reduce__(self) -> tuple[Callable[..., Balancer], tuple[Any, ...]]:
        if not self.name:
            raise TypeError("a Balancer made with shared=False lives in one process only")
        return (_attach_pickled, (self.name, self._factory, self._spec, self._failure_rule))

    # Calls -------------------------------------------------------------------------------

    def invoke(
        self, request: Any, *, timeout: float | None = None, key: object = None, retries: int = 0
    ) -> Any:
        """Call one backend with `request`; its answer, or its exception, is the result.

        `key` makes the call sticky for strategies that hash it (any str, bytes or int).
        `retries` (for idempotent requests only) tries up to that many other backends after a
        failure, while the retry budget shared by all processes allows; `timeout` is then the
        deadline for all attempts together. Raises `NoBackendAvailable` if no backend is
        eligible.
        """
        if timeout is not None:
            check_seconds("timeout", timeout)
        key_hash = None if key is None else key_hash_of(key)
        if retries:
            check_int("retries", retries, 0, MAX_RETRIES)
            return self._invoke_with_retries(request, timeout, key_hash, retries)
        return self._attempt(request, timeout, key_hash)

    async def ainvoke(
        self, request: Any, *, timeout: float | None = None, key: object = None, retries: int = 0
    ) -> Any:
        """`invoke` for an event loop, which it never blocks on the shared lock.

        The backends must be async: ``backend_factory=AsyncHttpBackend`` (`dispatcher.aio`), or
        any whose backends have ``async def ainvoke(request, *, timeout=None)``. A cancelled
        call (``asyncio.CancelledError``) counts as cancelled, not as the backend's failure.
        """
        if timeout is not None:
            check_seconds("timeout", timeout)
        key_hash = None if key is None else key_hash_of(key)
        if retries:
            check_int("retries", retries, 0, MAX_RETRIES)
            return await self._ainvoke_with_retries(request, timeout, key_hash, retries)
        return await self._aattempt(request, timeout, key_hash)

    def _attempt(
        self,
        request: Any,
        timeout: float | None,
        key: int | None,
        exclude: frozenset[int] = frozenset(),
        tried: set[int] | None = None,
    ) -> Any:
        """One call: a backend chosen and counted, called with no lock held, its end recorded.

        From the moment `_begin` counts the call until its end is recorded, every exit (the
        backend's exception, an interrupt anywhere) goes through an ``except`` clause that
        sees ``call[GENERATION]``, so no call stays counted (see `_lock` and `settle`).
        """
        state = self._state
        call: list[Any] = [-1, UNCOUNTED, None, 0]
        try:
            self._begin(call, key, exclude)
            if tried is not None:
                tried.add(call[SLOT])
            response = call[PROXY].invoke(request, timeout=timeout)
            if self._uses_reports:
                state.finish(call, SUCCESS, True, getattr(response, "load_report", None))
            else:
                state.finish(call, SUCCESS)
            return response
        except Exception as exc:
            if call[GENERATION] >= 0:
                outcome = FAILURE
                try:
                    outcome = FAILURE if self._is_failure(exc) else SUCCESS
                finally:
                    # Queued before any function is entered: an interrupt at an entry would
                    # otherwise drop the call (see `_lock`); `settle` records it.
                    state.unfinished.append((call, outcome))
                state.settle()
            raise
        except BaseException:
            if call[GENERATION] >= 0:
                state.unfinished.append((call, CANCELLED))
                state.settle()
            raise

    async def _aattempt(
        self,
        request: Any,
        timeout: float | None,
        key: int | None,
        exclude: frozenset[int] = frozenset(),
        tried: set[int] | None = None,
    ) -> Any:
        """`_attempt` on an event loop: every step that takes the lock goes through `off_loop`."""
        state = self._state
        call: list[Any] = [-1, UNCOUNTED, None, 0]
        outcome = CANCELLED
        try:
            await off_loop(self._begin, call, key, exclude, undo=lambda _: self._abandon(call))
            if tried is not None:
                tried.add(call[SLOT])
            ainvoke = getattr(call[PROXY], "ainvoke", None)
            if ainvoke is None:
                raise TypeError(
                    f"{call[PROXY]!r} has no ainvoke: make the balancer with an async "
                    f"backend_factory (for HTTP, backend_factory=AsyncHttpBackend from "
                    f"dispatcher.aio)"
                )
            outcome = FAILURE
            response = await ainvoke(request, timeout=timeout)
            report = getattr(response, "load_report", None) if self._uses_reports else None
            await off_loop(_finish_with, state, call, report)
            return response
        except Exception as exc:
            if call[GENERATION] >= 0:
                try:
                    if outcome == FAILURE and not self._is_failure(exc):
                        outcome = SUCCESS
                finally:
                    state.unfinished.append((call, outcome))
                await off_loop(state.settle)
            raise
        except BaseException:
            if call[GENERATION] >= 0:
                state.unfinished.append((call, CANCELLED))
                await off_loop(state.settle)
            raise

    def _abandon(self, call: list[Any]) -> None:
        """End a call counted on a thread after its caller, on an event loop, was cancelled."""
        if call[GENERATION] >= 0:
            self._state.unfinished.append((call, CANCELLED))
            self._state.settle()

    def _invoke_with_retries(
        self, request: Any, timeout: float | None, key: int | None, retries: int
    ) -> Any:
        attempts = Attempts(timeout, retries)
        state = self._state
        while True:
            remaining = attempts.remaining()
            retry = attempts.failure is not None
            if retry and not state.take_retry(self._retry_limit()):
                raise attempts.failure  # type: ignore[misc]
            try:
                try:
                    return self._attempt(
                        request, remaining, key, frozenset(attempts.tried), attempts.tried
                    )
                except NoBackendAvailable:
                    if attempts.failure is not None:
                        raise attempts.failure from None
                    raise
            except Exception as exc:
                if not self._is_failure(exc) or not attempts.may_retry(exc):
                    raise
            finally:
                if retry:
                    state.return_retry()

    async def _ainvoke_with_retries(
        self, request: Any, timeout: float | None, key: int | None, retries: int
    ) -> Any:
        attempts = Attempts(timeout, retries)
        state = self._state
        while True:
            remaining = attempts.remaining()
            retry = attempts.failure is not None
            if retry and not await off_loop(
                state.take_retry, self._retry_limit(), undo=_give_back(state)
            ):
                raise attempts.failure  # type: ignore[misc]
            try:
                try:
                    return await self._aattempt(
                        request, remaining, key, frozenset(attempts.tried), attempts.tried
                    )
                except NoBackendAvailable:
                    if attempts.failure is not None:
                        raise attempts.failure from None
                    raise
            except Exception as exc:
                if not self._is_failure(exc) or not attempts.may_retry(exc):
                    raise
            finally:
                if retry:
                    await off_loop(state.return_retry)

    def _retry_limit(self) -> int:
        """Envoy's retry budget: retries under way may be 20% of calls in flight, at least 3."""
        view = self._route[0].view
        in_flight = sum(view.in_flight[slot] for slot in view.slots)
        return max(RETRY_MIN_CONCURRENCY, in_flight * RETRY_BUDGET_PERCENT // 100)

    def _begin(
        self,
        call: list[Any],
        key: int | None,
        exclude: frozenset[int] = frozenset(),
        blocking: bool = True,
    ) -> None:
        """Choose a backend and count `call` on it; `call` must then be ended exactly once.

        Fills `call` (slot, generation, proxy, start); the generation is written inside the
        lock hold that counts the call. `exclude`: slots this call already tried (retries);
        if the strategy chooses one, the least loaded of the others is taken instead, so the
        strategy's cached structures stay valid. Not `blocking`: raise `LockBusy`, having
        counted nothing, instead of waiting for a lock that stays taken.
        """
        state = self._state
        if state.unfinished:
            state.settle(blocking)
        strategy, commit, clock = self._strategy, state.commit, state.clock
        route = self._route
        try:
            while True:
                now = clock()
                membership, proxies = route
                view = membership.view
                if now >= view.expires_ns:  # a view with no slot has expired already
                    membership, proxies = route = self._refresh(now, blocking)
                    view = membership.view
                    if not view.slots:
                        reason = self._why_none() if blocking else "no eligible backend"
                        raise NoBackendAvailable(reason)
                cursor = self._words[H_CURSOR] if self._uses_cursor else -1
                slot = strategy.pick(view, cursor, key)
                if exclude and slot in exclude:
                    slot, cursor = _least_loaded_except(view, exclude), -1
                # The proxy exists before the call is counted: a factory that raises counts
                # nothing.
                try:
                    proxy = proxies[slot]
                except KeyError:
                    proxy = self._proxy_of(slot, membership, proxies)
                call[SLOT] = slot
                call[PROXY] = proxy
                call[START] = now if view.timed else 0
                if commit(view.version, slot, cursor, call, blocking):
                    return
                # The membership changed since the view was built: build it again.
                route = self._refresh(now, blocking)
        except ValueError:
            if self._closed or state.closed:  # closed by another thread meanwhile
                raise SegmentError("this balancer is closed") from None
            raise

    def _refresh(self, now: int, blocking: bool = True) -> _Route:
        """This process's route from a new view; claims a worker row on its first call."""
        if self._closed:
            raise SegmentError("this balancer is closed")
        state = self._state
        if state.own_row < 0:
            self._segment.claim_row(blocking)
        if self._uses_reports:
            state.weigh_reports(self._strategy.weighing, now, blocking)  # type: ignore[attr-defined]
        membership = state.membership(
            now, blocking, WEIGHT_PERIOD_NS if self._uses_reports else None
        )
        route = self._route = (membership, {})
        if blocking:
            _monitor.check(self._segment, now)
        if not self._proxies.keys() <= membership.live:
            with self._local_lock:
                gone = [self._proxies.pop(a) for a in self._proxies.keys() - membership.live]
            for proxy in gone:
                _close_proxy(proxy)
        return route

    def _proxy_of(self, slot: int, membership: Membership, proxies: dict[int, Backend]) -> Backend:
        """The proxy for the backend in `slot` of `membership`, made by the factory on first use
        in this process; remembered by slot in `proxies`, which lives as long as the view."""
        addrs = membership.addrs
        addr = addrs[slot] if type(slot) is int and 0 <= slot < len(addrs) else None
        if addr is None:
            raise DispatcherError(
                f"{self._strategy!r} chose {slot!r}, not one of {membership.view.slots}"
            )
        with self._local_lock:
            proxy = self._proxies.get(addr)
            if proxy is None:
                proxy = self._proxies[addr] = self._factory(addr)
        proxies[slot] = proxy
        return proxy

    def _why_none(self) -> str:
        stats = self.snapshot()
        if not stats:
            return "no backend is registered"
        return f"none of the {len(stats)} backends is eligible (ejected, down or draining)"

    # Membership --------------------------------------------------------------------------

    def register(self, addr: str, weight: int = 1) -> None:
        """Add a backend; every process sees it on its next pick."""
        canonical = parse_address(addr)
        check_int("weight", weight, 1, MAX_WEIGHT)
        self._live_state().register(canonical, weight)
        _events.membership(self._segment, _events.REGISTERED, canonical, f"weight {weight}")

    def unregister(self, addr: str) -> None:
        """Remove a backend at once; calls in flight on it finish and leave no count behind."""
        canonical = parse_address(addr)
        self._live_state().unregister(canonical)
        _events.membership(
            self._segment,
            _events.UNREGISTERED,
            canonical,
            "removed; calls in flight leave no trace",
        )
        with self._local_lock:
            proxy = self._proxies.pop(canonical, None)
        _close_proxy(proxy)

    def set_weight(self, addr: str, weight: int) -> None:
        """Change a registered backend's weight; every process sees it on its next pick."""
        canonical = parse_address(addr)
        check_int("weight", weight, 1, MAX_WEIGHT)
        self._live_state().set_weight(canonical, weight)

    def drain(self, addr: str) -> None:
        """Stop new calls to a backend; its slot is freed when its calls in flight end.

        Registering the address again before then puts it back in rotation as it was.
        """
        canonical = parse_address(addr)
        self._live_state().drain(canonical)
        _events.membership(
            self._segment, _events.DRAINING, canonical, "no new calls; removed once its calls end"
        )

    def snapshot(self) -> list[BackendStats]:
        """Every registered backend's numbers, as every attached process sees them."""
        self._live_state()
        return self._segment.snapshot()

    def reap(self, *, blocking: bool = True) -> int:
        """Reclaim the in-flight counts of worker processes that died; return how many died.

        Not `blocking` (from a signal handler, which may have interrupted this very process
        inside the lock): raise `LockBusy` rather than wait for the lock.
        """
        self._live_state()
        return _events.reap(self._segment, blocking=blocking)[0]

    def backends(self) -> list[Backend]:
        """This process's backend proxies, one per address it has called so far."""
        with self._local_lock:
            return list(self._proxies.values())

    def _live_state(self) -> SharedState:
        if self._closed:
            raise SegmentError("this balancer is closed")
        return self._state

    # Identity and lifetime ---------------------------------------------------------------

    @property
    def name(self) -> str:
        """The shared segment's name: what `Balancer.attach` and ``dispatcher top`` take."""
        return self._segment.name

    @property
    def is_owner(self) -> bool:
        """Whether this handle created the balancer, in this process: closing it unlinks."""
        return self._owner_pid == os.getpid()

    @property
    def owner_pid(self) -> int:
        """The pid of the process that created the balancer (and owns its segment)."""
        return self._segment.owner_pid

    @property
    def strategy_name(self) -> str:
        """The owner's strategy, by name ("" for a custom strategy object)."""
        self._live_state()
        return self._segment.strategy_name

    @property
    def closed(self) -> bool:
        """Whether this handle was closed (in this process)."""
        return self._closed

    @property
    def closed_by_owner(self) -> bool:
        """Whether the owner closed the balancer: its segment is gone, its numbers frozen."""
        return self._live_state().version() == L.CLOSED

    @property
    def backend_factory(self) -> BackendFactory:
        return self._factory

    def workers(self) -> list[int]:
        """Pids of the live processes that have picked through this balancer."""
        self._live_state()
        return self._segment.workers()

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @property
    def capacity(self) -> int:
        return self._state.layout.capacity

    def close(self) -> None:
        """Detach; in the owner, also unlink the segment so no process can attach again.

        Calls still in flight on other threads end normally (their ends are recorded while
        another handle on the segment stays open in this process, dropped otherwise).
        """
        if self._closed:
            return
        self._closed = True
        self._route = (_NO_VIEW, {})
        with self._local_lock:
            proxies, self._proxies = self._proxies, {}
        try:
            for proxy in proxies.values():
                _close_proxy(proxy)
        finally:
            self._finalizer()

    def __enter__(self) -> Balancer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "owner" if self.is_owner else "attached"
        state = "closed" if self._closed else role
        return f"<Balancer {self.name or 'unshared'} {state} strategy={self._spec!r}>"


def open_for_export(balancer: Balancer | str, label: str | None) -> tuple[Segment, str]:
    """The segment a metrics exporter reads, from a shared balancer or its name, and the
    label its numbers carry (the name unless given). The segment then times every call:
    latency is what metrics are read for."""
    if isinstance(balancer, Balancer):
        if not balancer.name:
            raise TypeError("a Balancer made with shared=False has no segment to export")
        name = balancer.name
    elif isinstance(balancer, str):
        name = balancer
    else:
        raise TypeError(f"balancer must be a Balancer or a segment name, not {balancer!r}")
    if label is not None and not isinstance(label, str):
        raise TypeError(f"label must be a str, not {type(label).__name__}")
    segment = Segment.open(name)
    segment.state.record_latency(True)
    return segment, name if label is None else label


def _validate(
    addrs: Iterable[str],
    backend_factory: BackendFactory,
    strategy: str | Strategy,
    capacity: int,
    max_workers: int,
    failure_threshold: int,
    ejection_seconds: float,
    max_ejection_seconds: float,
    max_ejected_percent: int,
    slow_start_seconds: float,
    panic_percent: int,
    health_check: HealthCheck | None,
) -> tuple[L.Layout, EjectionPolicy, Strategy, list[str]]:
    """`Balancer`'s arguments, checked: the layout, policy, strategy and canonical addresses."""
    check_int("capacity", capacity, 1, L.MAX_CAPACITY)
    check_int("max_workers", max_workers, 1, L.MAX_WORKERS)
    policy = EjectionPolicy.from_seconds(
        failure_threshold,
        ejection_seconds,
        max_ejection_seconds,
        max_ejected_percent,
        slow_start_seconds,
        panic_percent,
    )
    chosen = make_strategy(strategy)
    if not callable(backend_factory):
        raise TypeError("backend_factory must be callable as backend_factory(addr)")
    if health_check is not None and not isinstance(health_check, HealthCheck):
        raise TypeError("health_check must be a dispatcher.HealthCheck")
    if isinstance(addrs, str):
        raise TypeError("addrs must be an iterable of 'host:port' strings, not one string")
    parsed = [parse_address(addr) for addr in addrs]
    for i, addr in enumerate(parsed):
        if addr in parsed[:i]:
            raise DuplicateBackend(addr)
    if len(parsed) > capacity:
        raise CapacityExceeded(f"{len(parsed)} addresses do not fit capacity={capacity}")
    return L.Layout(capacity, max_workers), policy, chosen, parsed


_POLICY_OPTIONS = (
    ("failure_threshold", "failure_threshold", False),
    ("ejection_seconds", "base_ns", True),
    ("max_ejection_seconds", "max_ns", True),
    ("max_ejected_percent", "max_ejected_percent", False),
    ("slow_start_seconds", "slow_start_ns", True),
    ("panic_percent", "panic_percent", False),
)
"""Each option of the ejection policy: its name, its field, whether the field is in ns."""


class _Wanted:
    """What a `Balancer.shared` caller asks for, to record in a new segment or to compare
    with what an existing one records."""

    def __init__(
        self,
        name: str,
        layout: L.Layout,
        policy: EjectionPolicy,
        strategy: str | Strategy,
        addrs: list[str],
        health_check: HealthCheck | None,
    ) -> None:
        self.name = name
        self.layout = layout
        self.policy = policy
        self.strategy = strategy
        self.strategy_name = strategy if isinstance(strategy, str) else ""
        kind = type(strategy)
        self.strategy_digest = (
            0 if isinstance(strategy, str) else _digest(f"{kind.__module__}.{kind.__qualname__}")
        )
        self.addrs = sorted(addrs)
        self.addrs_digest = _digest("\n".join(self.addrs))
        self.health_check = health_check

    def compare(self, segment: Segment) -> None:
        """Raise `OptionMismatch` naming the first option `segment` was made with otherwise."""
        recorded = segment.recorded()

        def differ(option: str, given: object, existing: object) -> None:
            if given != existing:
                raise OptionMismatch(self.name, option, repr(given), repr(existing))

        differ("capacity", self.layout.capacity, recorded.capacity)
        differ("max_workers", self.layout.max_workers, recorded.max_workers)
        for option, field, ns in _POLICY_OPTIONS:
            given, existing = getattr(self.policy, field), getattr(recorded.policy, field)
            if ns:
                given, existing = given / 1e9, existing / 1e9
            differ(option, given, existing)
        if (self.strategy_name, self.strategy_digest) != (
            recorded.strategy_name,
            recorded.strategy_digest,
        ):
            shown = recorded.strategy_name or "a custom strategy of another class"
            raise OptionMismatch(self.name, "strategy", repr(self.strategy), shown)
        if self.addrs_digest != recorded.addrs_digest:
            raise OptionMismatch(self.name, "addrs", repr(self.addrs), "another list")
        differ("health_check", self.health_check, _events.unpack_spec(recorded.spec)[0])


def _digest(text: str) -> int:
    """A signed 64-bit digest of `text`, as a header word holds it."""
    data = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(data, "little", signed=True)


def _warn_if_unshared_worker() -> None:
    """Once per process: warn when a `Balancer(...)` is made in a worker of a pre-fork server
    (see `_workers.prefork_siblings`), where each worker would balance alone."""
    if _checked_siblings_in[0] == os.getpid():
        return
    _checked_siblings_in[0] = os.getpid()
    found = prefork_siblings()
    if found is None:
        return
    siblings, parent, program = found
    log.warning(
        "Balancer(...) in process %d makes a balancer of its own, unseen by its %d sibling "
        "worker process%s of pid %d (%s): each balances alone, blind to the others' load. "
        "Use Balancer.shared(name, addrs, ...) for one balancer shared by every worker.",
        os.getpid(),
        siblings,
        "es" * (siblings != 1),
        parent,
        program,
    )


def open_balancers() -> list[Balancer]:
    """The balancers of this process that are not closed."""
    return [balancer for balancer in list(_balancers) if not balancer.closed]


def _release(segment: Segment, owner: bool, monitor: subprocess.Popen[bytes] | None) -> None:
    try:
        segment.close(unlink=owner)
    finally:
        if monitor is not None:
            _monitor.stop(monitor)


def _least_loaded_except(view: View, exclude: frozenset[int]) -> int:
    """The least loaded eligible slot not in `exclude`, for a retry the strategy cannot place."""
    others = [slot for slot in view.slots if slot not in exclude]
    if not others:
        raise NoBackendAvailable(f"every eligible backend was tried ({len(exclude)})")
    return min(others, key=lambda slot: view.in_flight[slot] / (view.weights[slot] or 1.0))


def _close_proxy(proxy: object) -> None:
    close = getattr(proxy, "close", None)
    if close is not None:
        close()


def _attach_pickled(
    name: str, backend_factory: BackendFactory, spec: str | Strategy, rule: FailureRule
) -> Balancer:
    return Balancer.attach(
        name, backend_factory=backend_factory, strategy=spec, counts_as_failure=rule
    )


def failure_rule(rule: FailureRule) -> Callable[[Exception], bool]:
    """The predicate for ``counts_as_failure``: exception types (a tuple, or one), or a
    callable.

    A predicate that raises counts the exception as a failure (noted on it), so a broken
    rule can eject a backend but never leave a call counted in flight.
    """
    types = (rule,) if isinstance(rule, type) else rule
    if isinstance(types, tuple):
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
            raise TypeError(f"counts_as_failure must hold exception types, not {rule!r}")
        return lambda exc: isinstance(exc, types)
    if not callable(rule):
        raise TypeError(
            "counts_as_failure must be a tuple of exception types or a predicate "
            f"(exception) -> bool, not {rule!r}"
        )
    predicate = cast(Callable[[Exception], bool], rule)

    def counts(exc: Exception) -> bool:
        try:
            return bool(predicate(exc))
        except Exception as error:
            exc.add_note(f"counted as a failure: counts_as_failure raised {error!r}")
            return True

    return counts


def key_hash_of(key: object) -> int:
    """A 64-bit hash of `key` that is the same in every process (unlike the salted ``hash``)."""
    if isinstance(key, str):
        data = key.encode("utf-8", "surrogatepass")
    elif isinstance(key, bytes | bytearray | memoryview):
        data = bytes(key)
    elif isinstance(key, int) and not isinstance(key, bool):
        data = key.to_bytes((key.bit_length() + 8) // 8, "big", signed=True)
    else:
        raise TypeError(f"key must be str, bytes or int, not {type(key).__name__}")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _finish_with(state: SharedState, call: list[Any], report: Any, blocking: bool = True) -> None:
    state.finish(call, SUCCESS, blocking, report)


def _give_back(state: SharedState) -> Callable[[bool], None]:
    """What undoes a retry taken on a thread for a caller that was cancelled meanwhile."""

    def undo(taken: bool) -> None:
        if taken:
            state.return_retry()

    return undo


def _after_fork_in_child() -> None:
    _shared.lock = threading.Lock()
    for balancer in open_balancers():
        balancer._reset_process()


os.register_at_fork(after_in_child=_after_fork_in_child)
