"""gunicorn hooks: the master owns the balancer, every worker uses it, dead workers are reaped.

`Balancer.shared` in the app needs no hooks at all; these are for a master that should own the
balancer: made once before any worker, kept across ``HUP`` (which may change its addresses),
a dead worker's calls reclaimed the moment gunicorn reaps it (docs/servers.md compares them).

In ``gunicorn.conf.py``::

    from dispatcher import gunicorn as dg

    dg.configure(["10.0.0.5:8000", "10.0.0.6:8000"], strategy="least_loaded")
    from dispatcher.gunicorn import child_exit, on_exit, on_starting, post_fork

and in the app, in any worker::

    from dispatcher.gunicorn import balancer
    response = balancer().invoke(HttpRequest("GET", "/"))

Why each hook runs where it does:

* ``on_starting`` (master, once, before any fork) creates the balancer and puts its name in
  ``$DISPATCHER_BALANCER``. With ``preload_app`` the app is imported before it, in the master;
  `balancer()` called there creates the balancer early, and ``on_starting`` keeps it.
* ``post_fork`` (worker): a forked worker keeps the master's balancer, and the balancer's own
  fork hook has already given it a fresh worker row, proxies and view cache. A worker that
  did not inherit it attaches by the name in the environment.
* ``child_exit`` (master, for every worker that ends, SIGKILLed or timed out included, where
  ``worker_exit`` may never run) calls `Balancer.reap`, which subtracts the in-flight calls of
  every dead worker and frees its row.
* ``on_exit`` (master) closes the balancer, which unlinks the segment.

``HUP`` re-reads ``gunicorn.conf.py`` in the master and forks new workers; the master and its
balancer live on, so counts continue. `configure` called again by the re-read only adopts a
changed address list (new addresses are registered, dropped ones drained); every other
option is fixed when the balancer is made. The hooks never import gunicorn.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from ._address import parse_address
from ._balancer import Balancer
from .errors import DispatcherError, LockBusy, UnknownBackend
from .servers import ENV_VAR

log = logging.getLogger("dispatcher")


class _Master:
    """What `configure` was told, and the balancer, kept across re-reads of the config file
    (gunicorn executes it afresh on HUP; this module stays imported)."""

    def __init__(self) -> None:
        self.addrs: tuple[str, ...] | None = None
        self.options: dict[str, Any] = {}
        self.config_pid = -1
        self.balancer: Balancer | None = None


_master = _Master()


def configure(addrs: Iterable[str] = (), **options: Any) -> None:
    """Say what the master's balancer is made of: addresses and `Balancer` keyword arguments.

    Makes nothing until the master needs it. Called again on ``HUP``, with the balancer
    already made, it registers new addresses and drains the ones no longer listed.
    """
    if isinstance(addrs, str):
        raise TypeError("addrs must be an iterable of 'host:port' strings, not one string")
    wanted = tuple(parse_address(addr) for addr in addrs)
    _master.addrs, _master.options, _master.config_pid = wanted, dict(options), os.getpid()
    current = _master.balancer
    if current is not None and current.is_owner and not current.closed:
        _adopt(current, wanted)


def _adopt(balancer: Balancer, wanted: tuple[str, ...]) -> None:
    have = {stats.addr for stats in balancer.snapshot() if not stats.draining}
    for addr in wanted:
        if addr not in have:
            balancer.register(addr)
            log.info("dispatcher: registered %s on reload", addr)
    for addr in have.difference(wanted):
        try:
            balancer.drain(addr)
        except UnknownBackend:
            continue
        log.info("dispatcher: draining %s on reload", addr)


def balancer() -> Balancer:
    """The balancer shared by this gunicorn master and all its workers."""
    current = _master.balancer
    if current is not None and not current.closed:
        return current
    if _master.addrs is not None and _master.config_pid == os.getpid():
        made = _master.balancer = Balancer(_master.addrs, **_master.options)
        os.environ[ENV_VAR] = made.name
        return made
    name = os.environ.get(ENV_VAR)
    if name:
        options = _master.options
        made = _master.balancer = _attach(
            name, options.get("backend_factory"), options.get("strategy")
        )
        return made
    raise DispatcherError(
        "no balancer: call dispatcher.gunicorn.configure() in gunicorn.conf.py and export its "
        "on_starting, post_fork, child_exit and on_exit hooks there"
    )


def _attach(name: str, factory: Any, strategy: Any) -> Balancer:
    kwargs: dict[str, Any] = {}
    if factory is not None:
        kwargs["backend_factory"] = factory
    if strategy is not None and not isinstance(strategy, str):
        kwargs["strategy"] = strategy
    return Balancer.attach(name, **kwargs)


def on_starting(server: Any) -> None:
    """Master, before the first fork: make the balancer and publish its name."""
    made = balancer()
    os.environ[ENV_VAR] = made.name
    log.info("dispatcher: balancer %s shared by the workers", made.name)


def post_fork(server: Any, worker: Any) -> None:
    """Worker, right after the fork: have a usable balancer before the app runs."""
    balancer()


def child_exit(server: Any, worker: Any) -> None:
    """Master, after any worker ended: reclaim the in-flight calls of dead workers.

    Some gunicorn versions call this from their SIGCHLD handler, which may have interrupted
    the master inside the shared lock: reaping never waits for the lock here. A round that
    finds it taken is left to the next worker exit, or to the balancer's monitor process.
    """
    current = _master.balancer
    if current is None or current.closed:
        return
    try:
        current.reap(blocking=False)
    except LockBusy:
        log.info("dispatcher: the shared lock was busy; reaping is left to the monitor")
    except Exception:
        log.exception("dispatcher: reaping after worker %s exited failed", worker.pid)


def on_exit(server: Any) -> None:
    """Master, on shutdown: close the balancer, which unlinks its segment."""
    current, _master.balancer = _master.balancer, None
    if current is not None:
        current.close()
    os.environ.pop(ENV_VAR, None)
