"""A FastAPI app that calls the downstream with ``await balancer.ainvoke``: the event loop
never waits on a backend, nor on the shared lock. The same app runs under
``uvicorn --workers`` (serve.py) and under gunicorn with uvicorn workers (gunicorn.conf.py)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from dispatcher import Balancer, HttpRequest
from dispatcher.aio import AsyncHttpBackend, aclose
from dispatcher.servers import attach_from_env


def balancer() -> Balancer:
    """The shared balancer, found by the name the parent process put in the environment."""
    return attach_from_env(backend_factory=AsyncHttpBackend)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await aclose(balancer())


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def index() -> dict[str, Any]:
    answer = await balancer().ainvoke(HttpRequest("GET", "/"), timeout=5)
    return {"worker": os.getpid(), "downstream": json.loads(answer.body)}


@app.get("/stats")
async def stats() -> list[dict[str, Any]]:
    return [
        {"addr": s.addr, "requests": s.requests, "in_flight": s.in_flight}
        for s in balancer().snapshot()
    ]
