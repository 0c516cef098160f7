"""python examples/fastapi_uvicorn/serve.py --workers 4 --port 8001

The same app, started from a script: `uvicorn.run` with spawned workers, each of which joins
the shared balancer the app asks for (`Balancer.shared` needs no help from this parent).
"""

from __future__ import annotations

import argparse
import os

import uvicorn

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--port", type=int, default=8001, help="port to serve (default 8001)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    args = parser.parse_args()
    uvicorn.run("app:app", app_dir=HERE, host=args.host, port=args.port, workers=args.workers)
