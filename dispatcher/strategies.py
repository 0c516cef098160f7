"""How a balancer chooses a backend: the `Strategy` protocol and the built-in strategies.

A strategy is pure: it reads a `View` (the eligible slots and their live loads, shared by every
process) and returns one of `view.slots`. It takes no lock and does no I/O; the balancer
commits its choice under the shared lock and asks again if the view went stale meanwhile.

To add one, write a class with `uses_cursor` and `pick`, and pass an instance as
``Balancer(strategy=...)``; to make it available by name, add it to `STRATEGIES`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import ClassVar, Protocol, runtime_checkable

from .state import View


@runtime_checkable
class Strategy(Protocol):
    """Chooses a slot from a `View`.

    `uses_cursor`: the choice depends on `cursor`, the balancer's shared pick counter. Such a
    choice is committed only if no other pick, in any process, advanced the cursor meanwhile,
    which is what makes a shared round-robin exact. Strategies that ignore the cursor get -1.
    `key` is a stable 64-bit hash of the caller's ``key=``, identical in every process, or None.
    """

    uses_cursor: bool

    def pick(self, view: View, cursor: int, key: int | None) -> int: ...


class RoundRobin:
    """Each eligible backend in turn, from one cursor shared by every process."""

    name: ClassVar[str] = "round_robin"
    uses_cursor = True

    def pick(self, view: View, cursor: int, key: int | None) -> int:
        slots = view.slots
        return slots[cursor % len(slots)]


class LeastLoaded:
    """The backend with the fewest calls in flight across all processes, per unit of weight.

    Ties go to the first candidate after a start that rotates with every pick, so equal
    backends share the load instead of slot 0 taking every tie.
    """

    name: ClassVar[str] = "least_loaded"
    uses_cursor = False

    def __init__(self) -> None:
        self._turn = itertools.count()

    def pick(self, view: View, cursor: int, key: int | None) -> int:
        slots, in_flight, weights = view.slots, view.in_flight, view.weights
        n = len(slots)
        start = next(self._turn) % n
        best = slots[start]
        best_load, best_weight = in_flight[best], weights[best]
        for i in range(start + 1, start + n):
            slot = slots[i % n]
            load = in_flight[slot]
            # load / weight < best_load / best_weight, without division
            if load * best_weight < best_load * weights[slot]:
                best, best_load, best_weight = slot, load, weights[slot]
        return best

    def __getstate__(self) -> dict[str, object]:
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()  # type: ignore[misc]


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    RoundRobin.name: RoundRobin,
    LeastLoaded.name: LeastLoaded,
}


def make_strategy(spec: str | Strategy) -> Strategy:
    """A strategy from its name in `STRATEGIES`, or the given object if it is one."""
    if isinstance(spec, str):
        try:
            return STRATEGIES[spec]()
        except KeyError:
            known = ", ".join(sorted(STRATEGIES))
            raise ValueError(f"unknown strategy {spec!r}; choose one of {known}") from None
    if not isinstance(spec, Strategy):
        raise TypeError(
            f"strategy must be a name or an object with uses_cursor and pick(), "
            f"not {type(spec).__name__}"
        )
    return spec
