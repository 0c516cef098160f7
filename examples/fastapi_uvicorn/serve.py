"""python examples/fastapi_uvicorn/serve.py

uvicorn --workers spawns its workers and imports the app by string, so this parent owns the
balancer and passes its name in $DISPATCHER_BALANCER; each worker attaches by that name.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.append(os.path.dirname(os.path.dirname(HERE)))

import downstream  # noqa: E402
import uvicorn  # noqa: E402

from dispatcher.servers import shared_balancer  # noqa: E402

if __name__ == "__main__":
    stub = downstream.start()
    try:
        with shared_balancer(downstream.addresses(), strategy="least_loaded"):
            uvicorn.run("app:app", app_dir=HERE, host="127.0.0.1", port=8001, workers=2)
    finally:
        if stub is not None:
            stub.terminate()
            stub.wait(10)
