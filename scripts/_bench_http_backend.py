"""One HTTP/1.1 keep-alive backend for `bench_http.py` and `failure_modes.py`, as its own process.

It sleeps for its service time instead of burning CPU, so eight of them and the load fit on a
two-core machine without the backends being what saturates. ``--slots`` requests are served
at once and the rest wait in FIFO order, so a backend that gets more than its share builds a
queue, as a real worker pool does. Service times are exponential with mean ``--mean-ms``;
after ``GET /_turn?at=NS`` (a CLOCK_MONOTONIC time in ns; 0 cancels) they are 10x longer.
The body of every answer is the backend's ``--id``, so clients can count where requests went.
The protocol is a bare ``asyncio.Protocol`` (on uvloop when installed): no framework per
request, about 30-60 us of CPU per request here. With ``--mean-ms 0`` (and no failure mode
set) a request is answered in the callback that read it, with no task: the backend
of a CPU-bound run costs as little as it can.

Failure modes, for `failure_modes.py`: ``GET /_behave?mode=M&ms=T&status=S&from=NS&until=NS
&count=N`` makes requests that arrive in ``[from, until)`` (CLOCK_MONOTONIC ns; 0 = no bound)
behave as mode M, for at most N of them (0 = all), without taking a service slot:

* ``fail``: answer ``S`` (503 by default) at once;
* ``hold``: hold the request T ms, then answer 200 (a client with a shorter timeout gives up);
* ``slow``: answer 200 after T ms;
* ``normal``: the usual service time (cancels any mode).

``--seed`` fixes the service-time draws. ``--orca`` adds ORCA's ``endpoint-load-metrics``
header to every answer: ``application_utilization`` as the requests in service or waiting per
slot (averaged over about half a second), ``rps_fractional`` as the answers of the last
second.

    python scripts/_bench_http_backend.py --port 8001 --id 0 --mean-ms 4
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from collections import deque
from urllib.parse import parse_qs

TURN_FACTOR = 10
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
REASONS = {200: b"OK", 500: b"Internal Server Error", 503: b"Service Unavailable"}


class Behaviour:
    """A failure mode and the window of arrivals it applies to (see the module docstring)."""

    def __init__(self, query: bytes = b"") -> None:
        args = {k: v[-1] for k, v in parse_qs(query.decode()).items()}
        self.mode = args.get("mode", "normal")
        if self.mode not in ("normal", "fail", "hold", "slow"):
            raise ValueError(f"unknown mode {self.mode!r}")
        self.seconds = float(args.get("ms", 0)) / 1e3
        self.status = int(args.get("status", 503))
        self.start = int(args.get("from", 0))
        self.until = int(args.get("until", 0))
        self.left = int(args.get("count", 0)) or -1

    def applies(self, now: int) -> bool:
        if self.mode == "normal" or self.left == 0 or now < self.start:
            return False
        if self.until and now >= self.until:
            return False
        if self.left > 0:
            self.left -= 1
        return True


class Backend:
    def __init__(self, ident: int, mean_ms: float, slots: int, orca: bool = False) -> None:
        self.ident = str(ident).encode()
        self.mean_s = mean_ms / 1e3
        self.slots = asyncio.Semaphore(slots)
        self.slot_count = slots
        self.turn_at = 0
        self.behaviour = Behaviour()
        self.orca = orca
        self.active = 0
        self.average_active = 0.0
        self.tracked_at = time.monotonic()
        self.answered: deque[float] = deque()

    def track(self, change: int) -> None:
        """Move the time-weighted average of requests in service or waiting, then `change`."""
        now = time.monotonic()
        weight = 1.0 - math.exp(-(now - self.tracked_at) / 0.5)
        self.average_active += (self.active - self.average_active) * weight
        self.tracked_at = now
        self.active += change

    def report(self) -> bytes:
        """The ORCA header line for an answer now, or nothing without ``--orca``."""
        if not self.orca:
            return b""
        now = time.monotonic()
        while self.answered and self.answered[0] < now - 1.0:
            self.answered.popleft()
        self.track(0)
        line = b"endpoint-load-metrics: TEXT application_utilization=%.3f, rps_fractional=%d\r\n"
        return line % (self.average_active / self.slot_count, len(self.answered))

    def answers_at_once(self) -> bool:
        return self.mean_s == 0 and self.behaviour.mode == "normal"

    async def handle(self, path: bytes) -> tuple[int, bytes]:
        if path.startswith(b"/_turn"):
            self.turn_at = int(path.partition(b"at=")[2] or 0)
            return 200, b"ok"
        if path.startswith(b"/_behave"):
            try:
                self.behaviour = Behaviour(path.partition(b"?")[2])
            except ValueError as exc:
                return 500, str(exc).encode()
            return 200, b"ok"
        behaviour = self.behaviour
        if behaviour.applies(time.monotonic_ns()):
            if behaviour.mode == "fail":
                return behaviour.status, self.ident
            await asyncio.sleep(behaviour.seconds)
            return 200, self.ident
        self.track(+1)
        try:
            async with self.slots:
                mean = self.mean_s
                if self.turn_at and time.monotonic_ns() >= self.turn_at:
                    mean *= TURN_FACTOR
                await asyncio.sleep(random.expovariate(1.0 / mean) if mean else 0)
        finally:
            self.track(-1)
        self.answered.append(time.monotonic())
        return 200, self.ident


class Connection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; requests on one connection are answered in order."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.buffer = b""
        self.pending: deque[bytes] = deque()
        self.busy = False
        self.task: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end]
            length = 0
            at = head.lower().find(b"\r\ncontent-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : None if line_end < 0 else line_end])
            if len(self.buffer) < end + 4 + length:
                break
            self.buffer = self.buffer[end + 4 + length :]
            self.pending.append(head.split(b" ", 2)[1])
        if self.pending and not self.busy:
            if self.backend.answers_at_once():
                self.answer_now()
            else:
                self.busy = True
                self.task = asyncio.ensure_future(self.serve())

    def answer_now(self) -> None:
        """With no service time and no failure mode: answer in this callback, no task."""
        transport = self.transport
        assert transport is not None
        ident = self.backend.ident
        while self.pending:
            path = self.pending.popleft()
            if path.startswith((b"/_turn", b"/_behave")):
                self.pending.appendleft(path)
                self.busy = True
                self.task = asyncio.ensure_future(self.serve())
                return
            transport.write(_OK % (len(ident), ident))

    async def serve(self) -> None:
        transport = self.transport
        assert transport is not None
        while self.pending:
            status, body = await self.backend.handle(self.pending.popleft())
            if transport.is_closing():
                return
            transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\n%sContent-Length: %d\r\n\r\n%s"
                % (status, REASONS.get(status, b"Status"), self.backend.report(), len(body), body)
            )
        self.busy = False


async def serve(port: int, backend: Backend) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(backend), "127.0.0.1", port, backlog=1024, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--mean-ms", type=float, required=True)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--seed", type=int, help="seed of the service-time draws")
    parser.add_argument("--orca", action="store_true", help="report load in every answer")
    args = parser.parse_args()
    random.seed(args.seed)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    run(serve(args.port, Backend(args.id, args.mean_ms, args.slots, args.orca)))


if __name__ == "__main__":
    main()
