"""What the real servers of tests/test_servers.py run with `Balancer.shared`: no hooks, no
launcher, no environment variable naming a segment. Every worker asks for the balancer by name.

Importable by spawned workers and Celery's, so nothing here imports pytest. The backends are in
$DISPATCHER_TEST_BACKENDS (comma-separated). Each answer is ``<worker pid> <text>``: the
backend's answer for a call, the segment's name for ``/name``.
"""

from __future__ import annotations

import os
from typing import Any

from dispatcher import Balancer, HttpBackend, HttpRequest

BACKENDS_VAR = "DISPATCHER_TEST_BACKENDS"
NAME = "downstream"


def balancer(factory: Any = HttpBackend) -> Balancer:
    """The server's one balancer (the same object on every call in a process)."""
    addrs = os.environ[BACKENDS_VAR].split(",")
    return Balancer.shared(NAME, addrs, strategy="least_loaded", backend_factory=factory)


def request(path: str) -> HttpRequest:
    return HttpRequest("GET", path, headers={"X-Worker": str(os.getpid())})


def call(path: str) -> str:
    """``/name``: the segment's name; anything else: that path, called on a backend."""
    if path == "/name":
        return f"{os.getpid()} {balancer().name}"
    answer = balancer().invoke(request(path), timeout=30)
    return f"{os.getpid()} {answer.body.decode()}"


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = call(environ["PATH_INFO"]).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """`wsgi_app` for asyncio, through ``await balancer.ainvoke``."""
    from dispatcher.aio import AsyncHttpBackend, aclose

    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                balancer(AsyncHttpBackend)  # join the server's balancer before serving
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await aclose(balancer(AsyncHttpBackend))
                await send({"type": "lifespan.shutdown.complete"})
                return
    shared = balancer(AsyncHttpBackend)
    path = scope["path"]
    if path == "/name":
        text = shared.name
    else:
        answer = await shared.ainvoke(request(path), timeout=30)
        text = answer.body.decode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": f"{os.getpid()} {text}".encode()})
