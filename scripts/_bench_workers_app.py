"""The server apps of `bench_workers.py`: ``/call`` calls one backend through a Balancer and
answers with its body, ``/noop`` answers at once (the server's own cost, to subtract).

``BENCH_BACKENDS`` (comma-separated addresses) and ``BENCH_CLIENT`` choose the call:
``aio`` (``await ainvoke`` with `AsyncHttpBackend`), ``sync`` (``invoke`` with `HttpBackend`)
or ``urllib3`` (``invoke`` with the urllib3 backend HttpBackend was before). The balancer is
made once per worker process, on its first request.

    uvicorn --app-dir scripts _bench_workers_app:asgi        # BENCH_CLIENT=aio
    gunicorn --chdir scripts -k sync _bench_workers_app:wsgi  # BENCH_CLIENT=sync | urllib3
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dispatcher import Balancer, HttpBackend, HttpRequest
from dispatcher.aio import AsyncHttpBackend, aclose

ADDRS = os.environ.get("BENCH_BACKENDS", "127.0.0.1:8080").split(",")
CLIENT = os.environ.get("BENCH_CLIENT", "sync")
REQUEST = HttpRequest("GET", "/")
NOOP = b"ok"
_balancer: list[Balancer] = []


def balancer() -> Balancer:
    if not _balancer:
        factory: Any = {"aio": AsyncHttpBackend, "sync": HttpBackend}.get(CLIENT)
        if factory is None:
            from bench_clients import Urllib3Backend

            factory = Urllib3Backend
        _balancer.append(
            Balancer(ADDRS, backend_factory=factory, strategy="least_loaded", monitor=False)
        )
    return _balancer[0]


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _balancer:
                    await aclose(_balancer[0])
                    _balancer[0].close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = (await balancer().ainvoke(REQUEST)).body if scope["path"] == "/call" else NOOP
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = balancer().invoke(REQUEST).body if environ["PATH_INFO"] == "/call" else NOOP
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
