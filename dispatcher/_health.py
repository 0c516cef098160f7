"""Active health checks: what a probe is, and when its results move a backend out or back.

Probes run once for the whole pool, in the owner's monitor process (`_monitor`),
never in the workers and never under the shared lock. A backend is marked down after `fall`
failed probes in a row and back up after `rise` passing ones (HAProxy's ``inter 2s rise 2
fall 3`` are the defaults); a passing probe also ends a passive ejection early, as in Envoy.
"""

from __future__ import annotations

import pickle
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from ._checks import check_int, check_seconds
from ._http_client import HttpClient


@dataclass(frozen=True)
class HealthCheck:
    """How to probe each backend: an HTTP ``GET path``, or `check(addr) -> bool`.

    A `check` callable must be picklable (a module-level function): it runs in the monitor
    process. An HTTP probe passes on a 2xx or 3xx answer within `timeout` seconds in all; a
    `check` is not bounded by `timeout` (it runs on the monitor's probe threads, and a slow one
    only delays the next round of probes, never the reaping of dead workers).

    HTTPS: an ``ssl.SSLContext`` cannot be pickled into the monitor process, so give
    `ssl_context_factory`, a picklable callable that builds one there (a module-level
    function, or ``functools.partial(ssl.create_default_context, cafile="ca.pem")``). The
    monitor calls it once and probes with that context as `HttpBackend` calls with its own:
    the certificate verified against `server_hostname` (default: the backend's host), which
    is also the SNI and the ``Host`` header.
    """

    path: str = "/"
    interval: float = 2.0
    rise: int = 2
    fall: int = 3
    timeout: float = 1.0
    check: Callable[[str], bool] | None = None
    ssl_context_factory: Callable[[], ssl.SSLContext] | None = None
    server_hostname: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ValueError(f"health check path must start with '/', not {self.path!r}")
        check_seconds("interval", self.interval, high=86400.0)
        check_seconds("timeout", self.timeout, high=86400.0)
        check_int("rise", self.rise, 1, 1000)
        check_int("fall", self.fall, 1, 1000)
        _check_for_monitor("check", self.check, "check(addr) -> bool")
        _check_for_monitor(
            "ssl_context_factory", self.ssl_context_factory, "ssl_context_factory() -> SSLContext"
        )
        if self.server_hostname is not None and not isinstance(self.server_hostname, str):
            raise TypeError(f"server_hostname must be a str, not {self.server_hostname!r}")

    def probe(self, addr: str) -> bool:
        """Whether `addr` passes one probe; any exception is a failure."""
        try:
            if self.check is not None:
                return bool(self.check(addr))
            return http_probe(
                addr, self.path, self.timeout, self.ssl_context(), self.server_hostname
            )
        except Exception:
            return False

    def ssl_context(self) -> ssl.SSLContext | None:
        """The context HTTPS probes use, built once per process (None: plain HTTP)."""
        if self.ssl_context_factory is None:
            return None
        built = _contexts.get(self.ssl_context_factory)
        if built is None:
            built = self.ssl_context_factory()
            if not isinstance(built, ssl.SSLContext):
                raise TypeError(f"ssl_context_factory() gave {built!r}, not an ssl.SSLContext")
            _contexts[self.ssl_context_factory] = built
        return built


_contexts: dict[Callable[[], ssl.SSLContext], ssl.SSLContext] = {}
"""Contexts built by this process's health checks, by factory (a context is made once)."""


def _check_for_monitor(name: str, value: object, usage: str) -> None:
    """A callable that runs in the monitor process must be importable there and picklable."""
    if value is None:
        return
    if not callable(value):
        raise TypeError(f"{name} must be callable as {usage}")
    if getattr(value, "__module__", None) == "__main__":
        raise TypeError(
            f"{name} must be importable by the monitor process: define it in a module, "
            f"not in __main__"
        )
    try:
        pickle.dumps(value)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise TypeError(
            f"{name} must be picklable (a module-level function): it runs in the "
            f"monitor process ({exc})"
        ) from None


def http_probe(
    addr: str,
    path: str,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> bool:
    """One ``GET path`` on a new connection: True on a 2xx or 3xx answer within `timeout`."""
    host, _, port = addr.rpartition(":")
    started = time.monotonic()
    with HttpClient(
        host,
        int(port),
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        pool_size=0,
        timeout=timeout,
        addr=addr,
    ) as client:
        answer = client.request("GET", path)
    return 200 <= answer.status < 400 and time.monotonic() - started <= timeout


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
