"""Reaching one balancer from every worker of a server, by a name in the environment.

`Balancer.shared` needs none of this: every worker asks for the balancer by its name, and the
first one creates it. This module is for a launcher that makes the balancer before the server
starts and hands its segment's name to the workers in the environment::

    # serve.py, the parent: makes the balancer before the server starts
    with shared_balancer(["10.0.0.5:8000", "10.0.0.6:8000"], strategy="least_loaded"):
        uvicorn.run("app:app", workers=4)

    # app.py, in every worker
    balancer = attach_from_env()

Attaching opens the lock by the name the segment records and never registers the segment
with the attaching process's resource tracker, so no worker's exit unlinks it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from ._backends import HttpBackend
from ._balancer import BackendFactory, Balancer, open_balancers
from ._workers import start_time
from .errors import DispatcherError

ENV_VAR = "DISPATCHER_BALANCER"
"""The environment variable that carries a shared balancer's segment name to workers."""

log = logging.getLogger("dispatcher")

_attached: dict[tuple[str, int, BackendFactory | None], Balancer] = {}
_attach_lock = threading.Lock()


def attach_from_env(
    *,
    backend_factory: BackendFactory | None = None,
    strategy: Any = None,
    env: str = ENV_VAR,
) -> Balancer:
    """The balancer named by ``os.environ[env]``, attached once per process.

    A balancer of that name already open in this process (one a forking server handed down,
    or an earlier call) is returned as it is, when it was made with the same
    `backend_factory` or none is asked for; otherwise this attaches with `backend_factory`
    (`HttpBackend` if None).
    """
    name = os.environ.get(env)
    if not name:
        raise DispatcherError(
            f"${env} is not set: start the server inside dispatcher.servers.shared_balancer() "
            f"or with the dispatcher.gunicorn hooks, or let every worker call "
            f"Balancer.shared(name, addrs, ...) instead"
        )
    for existing in open_balancers():
        if existing.name == name and backend_factory in (None, existing.backend_factory):
            return existing
    key = (name, os.getpid(), backend_factory)
    with _attach_lock:
        balancer = _attached.get(key)
        if balancer is None or balancer.closed:
            balancer = Balancer.attach(
                name, backend_factory=backend_factory or HttpBackend, strategy=strategy
            )
            _attached[key] = balancer
        return balancer


@contextlib.contextmanager
def shared_balancer(
    addrs: Iterable[str] = (), *, env: str = ENV_VAR, **options: Any
) -> Iterator[Balancer]:
    """Make a balancer for a server whose workers attach with `attach_from_env`.

    Sets ``os.environ[env]`` (restored on exit) so children started inside inherit the
    name. The balancer is a `Balancer.shared` one, under a scope of this process's own, held
    by this process until the block ends: its monitor reclaims a dead worker's calls, and
    removes it once this process and its workers are gone, however they end (a server that
    re-raises SIGTERM, as uvicorn does, kills this process before any cleanup could run).
    `options` are `Balancer.shared`'s keyword arguments.
    """
    scope = f"{__name__}.shared_balancer:{os.getpid()}:{start_time(os.getpid())}"
    balancer = Balancer.shared(env, addrs, scope=scope, **options)
    previous = os.environ.get(env)
    os.environ[env] = balancer.name
    try:
        yield balancer
    finally:
        if previous is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = previous
        balancer.close()
