"""Keeping a balancer's membership what a resolver says: `reconcile`, and `Discovery`'s loop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._address import parse_address
from ..errors import CapacityExceeded, DuplicateBackend, SegmentError, UnknownBackend
from ._resolver import Answer, Resolver, Stop, check_weight

if TYPE_CHECKING:
    from .._balancer import Balancer

log = logging.getLogger("dispatcher.discovery")


@dataclass(frozen=True)
class Changes:
    """What one `reconcile` did."""

    added: tuple[str, ...] = ()
    """Registered, or put back in rotation while still draining."""
    drained: tuple[str, ...] = ()
    reweighted: tuple[str, ...] = ()
    """Live backends whose weight changed."""
    failed: tuple[str, ...] = ()
    """Addresses that could not be registered (no free slot)."""

    def __bool__(self) -> bool:
        return bool(self.added or self.drained or self.reweighted or self.failed)


def reconcile(balancer: Balancer, desired: Mapping[str, int]) -> Changes:
    """Make `balancer`'s membership what `desired` says; return what changed.

    Every registered backend is discovery's to manage: one missing from `desired` is drained.
    A draining one that reappears is registered again (back in rotation, with the new weight).
    """
    wanted = {parse_address(addr): check_weight(w, addr) for addr, w in desired.items()}
    current = {stats.addr: stats for stats in balancer.snapshot()}
    added: list[str] = []
    drained: list[str] = []
    reweighted: list[str] = []
    failed: list[str] = []
    for addr, weight in wanted.items():
        stats = current.get(addr)
        if stats is not None and not stats.draining:
            if stats.weight != weight:
                balancer.set_weight(addr, weight)
                reweighted.append(addr)
            continue
        try:
            balancer.register(addr, weight)
        except DuplicateBackend:
            continue
        except CapacityExceeded:
            failed.append(addr)
            continue
        added.append(addr)
    for addr, stats in current.items():
        if addr in wanted or stats.draining:
            continue
        try:
            balancer.drain(addr)
        except UnknownBackend:
            continue
        drained.append(addr)
    return Changes(tuple(added), tuple(drained), tuple(reweighted), tuple(failed))


# The loop -----------------------------------------------------------------------------------


class Discovery:
    """Follows a resolver in a background thread and reconciles the balancer on each change.

    ``start()``/``stop()`` or ``with Discovery(balancer, resolver):``. It runs in whichever
    process calls ``start()``: one per machine is enough, since membership is shared.
    """

    def __init__(
        self, balancer: Balancer, resolver: Resolver, *, retry_seconds: float = 1.0
    ) -> None:
        if not isinstance(resolver, Resolver):
            raise TypeError(f"resolver must have a watch(stop) method, not {resolver!r}")
        self.balancer = balancer
        self.resolver = resolver
        self.retry_seconds = retry_seconds
        self._stop = Stop()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._desired: Answer | None = None
        self._applied: Answer | None = None
        self._failing = False
        self._updates = 0

    @property
    def desired(self) -> Answer | None:
        """The last good answer, or None before the first one."""
        with self._lock:
            return None if self._desired is None else dict(self._desired)

    @property
    def failing(self) -> bool:
        """True while the source cannot answer (the last good answer is in force)."""
        return self._failing

    @property
    def updates(self) -> int:
        """How many answers (good or failed) the loop has handled."""
        return self._updates

    def start(self) -> Discovery:
        if self._thread is not None:
            raise RuntimeError("this Discovery was already started")
        self._thread = threading.Thread(
            target=self._run, name=f"dispatcher-discovery {self.resolver!r}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following the source; the balancer keeps its membership."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("%r did not stop within %s s", self.resolver, timeout)

    def __enter__(self) -> Discovery:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for update in self.resolver.watch(self._stop):
                    if self._stop.is_set():
                        return
                    self._handle(update)
            except SegmentError as exc:
                log.warning("stopping discovery: %s", exc)
                return
            except Exception as exc:
                log.warning("%r raised; restarting it", self.resolver, exc_info=True)
                self._failed(exc)
            self._stop.wait(self.retry_seconds)

    def _handle(self, update: Answer | Exception) -> None:
        self._updates += 1
        if isinstance(update, Exception):
            self._failed(update)
            return
        if self._failing:
            log.info("%r answers again", self.resolver)
            self._failing = False
        with self._lock:
            self._desired = dict(update)
        if update == self._applied:
            return
        if not update and self._applied:
            log.warning("%r lists no instances: draining every backend", self.resolver)
        changes = reconcile(self.balancer, update)
        self._applied = None if changes.failed else dict(update)
        if changes.added or changes.drained or changes.reweighted:
            log.info(
                "added %s, drained %s, reweighted %s",
                list(changes.added),
                list(changes.drained),
                list(changes.reweighted),
            )
        if changes.failed:
            log.warning("no free slot for %s: will retry on the next answer", changes.failed)

    def _failed(self, exc: BaseException) -> None:
        if self._failing:
            return
        self._failing = True
        desired = self.desired
        kept = "nothing yet" if desired is None else f"{len(desired)} instances"
        log.warning(
            "%r failed (%s: %s); keeping the last good list (%s)",
            self.resolver,
            type(exc).__name__,
            exc,
            kept,
        )
