"""A Flask app whose every gunicorn worker calls the downstream through one shared balancer,
owned by the gunicorn master (see gunicorn.conf.py)."""

from __future__ import annotations

import json
import os
from typing import Any

from flask import Flask

from dispatcher import HttpRequest
from dispatcher.gunicorn import balancer

app = Flask(__name__)


@app.get("/")
def index() -> dict[str, Any]:
    # A GET is idempotent, so a failed attempt may go once more, to another instance.
    answer = balancer().invoke(HttpRequest("GET", "/"), timeout=5, retries=1)
    return {"worker": os.getpid(), "downstream": json.loads(answer.body)}


@app.get("/stats")
def stats() -> dict[str, Any]:
    """What every worker sees: calls and calls in flight per downstream instance."""
    return {
        "worker": os.getpid(),
        "balancer": balancer().name,
        "instances": [
            {"addr": s.addr, "requests": s.requests, "in_flight": s.in_flight}
            for s in balancer().snapshot()
        ],
    }
