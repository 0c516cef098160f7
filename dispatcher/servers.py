"""Reaching one balancer from every worker of a server, by name.

A server that forks its workers hands them the parent's `Balancer` object. One that spawns
them (``uvicorn --workers N``, which imports the app by string in each child) hands them
nothing but the environment, so the parent puts the segment's name there and each worker
attaches by that name::

    # serve.py, the parent: owns the balancer for as long as the server runs
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
            f"or with the dispatcher.gunicorn hooks"
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
    """Own a balancer for the life of a server whose workers attach with `attach_from_env`.

    Sets ``os.environ[env]`` (restored on exit) so children started inside inherit the
    name. A server that does not tell its parent when a worker dies (uvicorn) needs nothing
    more: the balancer's monitor process reclaims a dead worker's calls on its own.
    `options` are `Balancer`'s keyword arguments.
    """
    balancer = Balancer(addrs, **options)
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
