"""When a failing backend is taken out of rotation, for how long, and how it comes back.

Modelled on Envoy's outlier detection: `failure_threshold` consecutive failures eject a backend
for ``base x times ejected``, capped, and at most `max_ejected_percent` of the live backends are
out at once (at least one may always go, the last eligible one never does). A backend that
enters rotation (registered, or back from ejection) may get its share gradually over
`slow_start_ns`, as Envoy's and HAProxy's slow start do; below `panic_percent` eligible,
every registered backend takes calls again. The policy lives in the segment header, so every
process applies the same one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._checks import check_int, check_seconds

NS = 1_000_000_000
MIN_WARMTH = 0.1
"""Envoy's default `min_weight_percent`: a warming backend is never starved entirely."""
WARMTH_STEPS = 20
"""How many times a view is rebuilt during one slow start, so the ramp is smooth."""


@dataclass(frozen=True)
class EjectionPolicy:
    failure_threshold: int = 5
    base_ns: int = 30 * NS
    max_ns: int = 300 * NS
    max_ejected_percent: int = 50
    slow_start_ns: int = 0
    panic_percent: int = 50

    @classmethod
    def from_seconds(
        cls,
        failure_threshold: int,
        ejection_seconds: float,
        max_ejection_seconds: float,
        max_ejected_percent: int,
        slow_start_seconds: float = 0.0,
        panic_percent: int = 50,
    ) -> EjectionPolicy:
        """Validate user-facing arguments and convert them to the stored integer form."""
        check_int("failure_threshold", failure_threshold, 1)
        check_int("max_ejected_percent", max_ejected_percent, 0, 100)
        check_int("panic_percent", panic_percent, 0, 100)
        check_seconds("ejection_seconds", ejection_seconds)
        check_seconds("max_ejection_seconds", max_ejection_seconds)
        if slow_start_seconds:
            check_seconds("slow_start_seconds", slow_start_seconds, high=86400.0)
        if max_ejection_seconds < ejection_seconds:
            raise ValueError(
                f"max_ejection_seconds ({max_ejection_seconds}) is below "
                f"ejection_seconds ({ejection_seconds})"
            )
        return cls(
            failure_threshold,
            round(ejection_seconds * NS),
            round(max_ejection_seconds * NS),
            max_ejected_percent,
            round(slow_start_seconds * NS),
            panic_percent,
        )

    def duration_ns(self, times_ejected: int) -> int:
        """How long the `times_ejected`-th ejection (counting from 1) lasts."""
        return min(self.base_ns * times_ejected, self.max_ns)

    def warmth(self, age_ns: int) -> float:
        """Share of its weight a backend gets `age_ns` after entering rotation: 10% to 100%."""
        if age_ns >= self.slow_start_ns:
            return 1.0
        if age_ns <= 0:
            return MIN_WARMTH
        return max(MIN_WARMTH, age_ns / self.slow_start_ns)

    def panics(self, live: int, eligible: int) -> bool:
        """Whether so few backends are eligible that all of them should take calls again.

        Envoy's panic threshold: below it, a pool of mostly failing backends is likelier to
        be failing checks than serving nothing, and refusing every call would be worse.
        """
        return eligible * 100 < self.panic_percent * live

    def may_eject(self, live: int, ejected: int) -> bool:
        """Whether one more of `live` backends may go when `ejected` of them already are out."""
        if live - ejected <= 1:
            return False
        return ejected == 0 or (ejected + 1) * 100 <= self.max_ejected_percent * live
