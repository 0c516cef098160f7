"""gunicorn -c examples/fastapi_uvicorn/gunicorn.conf.py

The same FastAPI app under gunicorn with 4 uvicorn workers. It needs no hooks: each worker
joins the balancer with `Balancer.shared`, as under uvicorn. (The Flask example shows the
other way, the gunicorn hooks, where the master owns the balancer.)
"""

import os

chdir = os.path.dirname(os.path.abspath(__file__))
wsgi_app = "app:app"
worker_class = "uvicorn_worker.UvicornWorker"
bind = "127.0.0.1:8001"
workers = 4
