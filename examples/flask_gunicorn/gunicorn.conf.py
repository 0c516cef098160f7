"""gunicorn -c examples/flask_gunicorn/gunicorn.conf.py

The gunicorn hooks: the master owns the balancer, its four workers share it, and the master
reclaims a dead worker's calls as soon as gunicorn reaps it. The stand-in downstream is
started here too, so the command works with nothing else running (set $DOWNSTREAM to use
real instances).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import downstream

from dispatcher import HealthCheck
from dispatcher import gunicorn as dg
from dispatcher.gunicorn import child_exit, post_fork  # noqa: F401

dg.configure(
    downstream.addresses(),
    strategy="least_loaded",
    # An instance that was down is back one passing probe after it returns, not when its
    # 30 s ejection ends.
    health_check=HealthCheck(path="/health", interval=1.0, rise=1, fall=2, timeout=0.5),
)

chdir = os.path.dirname(os.path.abspath(__file__))
wsgi_app = "app:app"
bind = "127.0.0.1:8000"
workers = 4


def on_starting(server):
    server.downstream = downstream.start()
    dg.on_starting(server)


def on_exit(server):
    dg.on_exit(server)
    if server.downstream is not None:
        server.downstream.terminate()
        server.downstream.wait(10)
