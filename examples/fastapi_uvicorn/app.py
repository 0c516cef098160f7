"""cd examples/fastapi_uvicorn && uvicorn app:app --workers 4

A FastAPI app whose workers all call the downstream service through one balancer, with one
view of its load. The one line that does it is `Balancer.shared`, at import, in every worker:
the first worker to get there creates the balancer, the others join it, and its monitor
process removes it when the server stops. No launcher, no hooks, no environment variable.

Calls go through ``await balancer.ainvoke``: the event loop never waits on a backend, nor on
the shared lock. The same app runs under gunicorn with uvicorn workers (gunicorn.conf.py) and
from a script (serve.py).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from dispatcher import Balancer, HealthCheck, HttpRequest
from dispatcher.aio import AsyncHttpBackend, aclose

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import downstream

downstream.start(watch=os.getppid())  # the stand-in, unless $DOWNSTREAM names real instances

balancer = Balancer.shared(
    "downstream",
    downstream.addresses(),
    strategy="least_loaded",
    backend_factory=AsyncHttpBackend,
    # Probed by the monitor, once for all workers: an instance that was down is back in
    # rotation one passing probe after it returns, not when its 30 s ejection ends.
    health_check=HealthCheck(path="/health", interval=1.0, rise=1, fall=2, timeout=0.5),
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await aclose(balancer)  # this worker's HTTP clients, before its event loop ends


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def index() -> dict[str, Any]:
    # A GET is idempotent, so a failed attempt may go once more, to another instance.
    answer = await balancer.ainvoke(HttpRequest("GET", "/"), timeout=5, retries=1)
    return {"worker": os.getpid(), "downstream": json.loads(answer.body)}


@app.get("/stats")
async def stats() -> dict[str, Any]:
    """What every worker sees: calls and calls in flight per downstream instance."""
    return {
        "worker": os.getpid(),
        "balancer": balancer.name,
        "instances": [
            {"addr": s.addr, "requests": s.requests, "in_flight": s.in_flight}
            for s in balancer.snapshot()
        ],
    }
