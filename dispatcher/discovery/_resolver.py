"""The `Resolver` protocol, the polling base of resolvers, and the static list.

A resolver turns a source into a stream of *full* answers, never deltas (see the package's
docstring), and holds only its configuration, so it pickles.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

from .._address import parse_address
from .._checks import MAX_WEIGHT


class Stop:
    """Tells a running `Resolver.watch` to return, and interrupts the read it is blocked in."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            hooks = list(self._hooks)
        for hook in hooks:
            hook()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as the stop is asked."""
        return self._event.wait(seconds)

    @contextmanager
    def hook(self, interrupt: Callable[[], None]) -> Iterator[None]:
        """Run `interrupt` if the stop is asked while the block runs (at once if it was)."""
        with self._lock:
            stopped = self._event.is_set()
            if not stopped:
                self._hooks.append(interrupt)
        if stopped:
            interrupt()
        try:
            yield
        finally:
            with self._lock:
                if interrupt in self._hooks:
                    self._hooks.remove(interrupt)


Answer = dict[str, int]
"""One full answer from a source: canonical ``host:port`` -> weight (1 to 1,000,000)."""


@runtime_checkable
class Resolver(Protocol):
    """A source of backend lists.

    ``watch(stop)`` yields a full `Answer` each time the list may have changed (the first one
    as soon as it can), or the exception that kept the source from answering, and keeps going
    until `stop` is set. It must not raise for a source failure: yield it and retry.
    """

    def watch(self, stop: Stop) -> Iterator[Answer | Exception]: ...


class PollingResolver(abc.ABC):
    """A resolver that asks its source again every `interval` seconds.

    Subclasses implement ``resolve()``; ``_poll()`` may also return a shorter delay (a TTL).
    """

    interval: float = 30.0

    @abc.abstractmethod
    def resolve(self) -> Answer:
        """Ask the source once; raise if it cannot answer."""

    def _poll(self) -> tuple[Answer, float]:
        return self.resolve(), self.interval

    def watch(self, stop: Stop) -> Iterator[Answer | Exception]:
        while not stop.is_set():
            delay = self.interval
            try:
                answer, delay = self._poll()
            except Exception as exc:
                yield exc
            else:
                yield answer
            if stop.wait(delay):
                return


class StaticResolver(PollingResolver):
    """A fixed list: ``["host:port", ...]`` (weight 1 each) or ``{"host:port": weight}``."""

    def __init__(self, addrs: Iterable[str] | Mapping[str, int]) -> None:
        if isinstance(addrs, str):
            raise TypeError("addrs must be an iterable of 'host:port' strings, not one string")
        pairs = addrs.items() if isinstance(addrs, Mapping) else ((a, 1) for a in addrs)
        self.answer: Answer = {}
        for addr, weight in pairs:
            self.answer[parse_address(addr)] = check_weight(weight, addr)

    def resolve(self) -> Answer:
        return dict(self.answer)

    def watch(self, stop: Stop) -> Iterator[Answer | Exception]:
        yield self.resolve()
        while not stop.wait(3600):
            pass

    def __repr__(self) -> str:
        return f"StaticResolver({sorted(self.answer)!r})"


def check_weight(weight: object, addr: object) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight of {addr!r} must be an integer 1-{MAX_WEIGHT}, not {weight!r}")
    return weight
