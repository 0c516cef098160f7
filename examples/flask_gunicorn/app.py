"""A Flask app whose every gunicorn worker calls the downstream through one shared balancer."""

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
    answer = balancer().invoke(HttpRequest("GET", "/"), timeout=5)
    return {"worker": os.getpid(), "downstream": json.loads(answer.body)}


@app.get("/stats")
def stats() -> list[dict[str, Any]]:
    """What every worker sees: calls and in-flight per downstream instance."""
    return [
        {"addr": s.addr, "requests": s.requests, "in_flight": s.in_flight}
        for s in balancer().snapshot()
    ]
