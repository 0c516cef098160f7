"""Active health checks: what a probe is, and when its results move a backend out or back.

Probes run once for the whole pool, in the owner's monitor process (`_monitor`),
never in the workers and never under the shared lock. A backend is marked down after `fall`
failed probes in a row and back up after `rise` passing ones (HAProxy's ``inter 2s rise 2
fall 3`` are the defaults); a passing probe also ends a passive ejection early, as in Envoy.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass

import urllib3

from ._checks import check_int, check_seconds


@dataclass(frozen=True)
class HealthCheck:
    """How to probe each backend: an HTTP ``GET path``, or `check(addr) -> bool`.

    A `check` callable must be picklable (a module-level function): it runs in the monitor
    process. An HTTP probe passes on a 2xx or 3xx answer within `timeout` seconds in all; a
    `check` is not bounded by `timeout` (it runs on the monitor's probe threads, and a slow one
    only delays the next round of probes, never the reaping of dead workers).
    """

    path: str = "/"
    interval: float = 2.0
    rise: int = 2
    fall: int = 3
    timeout: float = 1.0
    check: Callable[[str], bool] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ValueError(f"health check path must start with '/', not {self.path!r}")
        check_seconds("interval", self.interval, high=86400.0)
        check_seconds("timeout", self.timeout, high=86400.0)
        check_int("rise", self.rise, 1, 1000)
        check_int("fall", self.fall, 1, 1000)
        if self.check is not None and not callable(self.check):
            raise TypeError("check must be callable as check(addr) -> bool")
        if self.check is not None and getattr(self.check, "__module__", None) == "__main__":
            raise TypeError(
                "check must be importable by the monitor process: define it in a module, "
                "not in __main__"
            )
        if self.check is not None:
            try:
                pickle.dumps(self.check)
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                raise TypeError(
                    f"check must be picklable (a module-level function): it runs in the "
                    f"monitor process ({exc})"
                ) from None

    def probe(self, addr: str) -> bool:
        """Whether `addr` passes one probe; any exception is a failure."""
        try:
            if self.check is not None:
                return bool(self.check(addr))
            return http_probe(addr, self.path, self.timeout)
        except Exception:
            return False


def http_probe(addr: str, path: str, timeout: float) -> bool:
    host, _, port = addr.rpartition(":")
    with urllib3.HTTPConnectionPool(host.strip("[]"), int(port), retries=False) as pool:
        answer = pool.request("GET", path, timeout=urllib3.Timeout(total=timeout), redirect=False)
    return 200 <= answer.status < 400


class HealthTracker:
    """Turns a stream of probe results per backend into up/down verdicts (pure)."""

    def __init__(self, rise: int, fall: int) -> None:
        self.rise, self.fall = rise, fall
        self._down: dict[str, bool] = {}
        self._streak: dict[str, int] = {}

    def observe(self, addr: str, passed: bool) -> bool:
        """Record one probe result; return whether `addr` is now down."""
        down = self._down.get(addr, False)
        streak = self._streak.get(addr, 0)
        # A streak counts results that argue against the current verdict.
        streak = streak + 1 if passed == down else 0
        if streak >= (self.rise if down else self.fall):
            down, streak = not down, 0
        self._down[addr], self._streak[addr] = down, streak
        return down

    def forget(self, keep: set[str]) -> None:
        """Drop what is known of backends no longer registered."""
        for addr in set(self._down) - keep:
            del self._down[addr], self._streak[addr]
