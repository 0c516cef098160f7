"""A stand-in downstream service: a few loopback HTTP servers, one of them slow.

Run alone (``python examples/downstream.py 9101 9102 9103``) or let an example start it with
`start`. Each answer is JSON naming the port that served it; the first port waits 200 ms per
call, so a ``least_loaded`` balancer visibly sends it less.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time

PORTS = (9101, 9102, 9103)
SLOW_S = 0.2


def addresses() -> list[str]:
    """$DOWNSTREAM (comma-separated host:port) if set, else the ports `start` serves."""
    given = os.environ.get("DOWNSTREAM")
    if given:
        return [addr.strip() for addr in given.split(",") if addr.strip()]
    return [f"127.0.0.1:{port}" for port in PORTS]


def start() -> subprocess.Popen[bytes] | None:
    """Serve `PORTS` in a child process, unless $DOWNSTREAM names real backends."""
    if os.environ.get("DOWNSTREAM"):
        return None
    process = subprocess.Popen([sys.executable, __file__, *map(str, PORTS)])
    time.sleep(0.3)
    return process


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        port = self.server.server_address[1]
        if port == PORTS[0]:
            time.sleep(SLOW_S)
        body = json.dumps({"port": port}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main(ports: list[int]) -> None:
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", p), Handler) for p in ports]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers[0].serve_forever()


if __name__ == "__main__":
    main([int(p) for p in sys.argv[1:]] or list(PORTS))
