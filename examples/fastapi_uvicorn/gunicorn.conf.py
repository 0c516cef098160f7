"""gunicorn -c examples/fastapi_uvicorn/gunicorn.conf.py

The same FastAPI app under gunicorn with uvicorn workers: the master owns the balancer, made
with async backends, and every forked worker uses it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import downstream

from dispatcher import gunicorn as dg
from dispatcher.aio import AsyncHttpBackend
from dispatcher.gunicorn import child_exit, post_fork  # noqa: F401

dg.configure(downstream.addresses(), strategy="least_loaded", backend_factory=AsyncHttpBackend)

chdir = os.path.dirname(os.path.abspath(__file__))
wsgi_app = "app:app"
worker_class = "uvicorn_worker.UvicornWorker"
bind = "127.0.0.1:8001"
workers = 4


def on_starting(server):
    server.downstream = downstream.start()
    dg.on_starting(server)


def on_exit(server):
    dg.on_exit(server)
    if server.downstream is not None:
        server.downstream.terminate()
        server.downstream.wait(10)
