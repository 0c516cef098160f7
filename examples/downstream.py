"""A stand-in downstream service: a few loopback HTTP servers, one of them slow.

Run alone (``python examples/downstream.py 9101 9102 9103``; Ctrl-C stops it quietly) or let
an example start it. It speaks HTTP/1.1 with keep-alive, as real services do, so the
balancer's connection pools are reused. ``GET /health`` answers at once; any other path
answers JSON naming the port that served it, after 200 ms on the first port, so a
``least_loaded`` balancer visibly sends it less.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

PORTS = (9101, 9102, 9103)
SLOW_S = 0.2


def addresses() -> list[str]:
    """$DOWNSTREAM (comma-separated host:port) if set, else the ports the stand-in serves."""
    given = os.environ.get("DOWNSTREAM")
    if given:
        return [addr.strip() for addr in given.split(",") if addr.strip()]
    return [f"127.0.0.1:{port}" for port in PORTS]


def start(watch: int | None = None) -> subprocess.Popen[bytes] | None:
    """Serve `PORTS` in a process of its own, unless $DOWNSTREAM names real instances or the
    stand-in already runs (several workers may ask at once: the first one to bind serves,
    the others leave quietly). It stops on Ctrl-C, or when process `watch` is gone (the
    server that asked for it)."""
    if os.environ.get("DOWNSTREAM") or _serving(PORTS[0]):
        return None
    command = [sys.executable, __file__, *map(str, PORTS)]
    if watch is not None:
        command += ["--until-gone", str(watch)]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 5
    while process.poll() is None and not _serving(PORTS[0]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return process


def _serving(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        if self.path != "/health" and port == PORTS[0]:
            time.sleep(SLOW_S)
        body = json.dumps({"port": port}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def main(argv: list[str]) -> None:
    watch = None
    if "--until-gone" in argv:
        at = argv.index("--until-gone")
        watch = int(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    ports = [int(p) for p in argv] or list(PORTS)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as quietly as Ctrl-C
    try:
        servers = [Server(("127.0.0.1", port), Handler) for port in ports]
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return  # another copy serves these ports already
        raise
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):
        while watch is None or _alive(watch):
            time.sleep(0.5)
    for server in servers:
        server.shutdown()
        server.server_close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    main(sys.argv[1:])
