"""A fast loopback HTTP/1.1 keep-alive server for `bench_clients.py`, run as its own process.

Every request gets at once the same small answer a production JSON service would send: a
status line, seven headers (``Vary`` twice, so clients must keep repeated headers; no
``Set-Cookie``, which would bill the cookie jars of requests, httpx and aiohttp) and a
64-byte JSON body; a ``POST`` body is read and dropped. With ``--cert`` and
``--key`` it speaks TLS. It is a bare ``asyncio.Protocol`` (on uvloop when installed), so
the client, not the server, is what the benchmark waits on; its CPU is never counted.

    python scripts/_bench_clients_server.py --port 8080 [--cert c.pem --key k.pem]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl

BODY = b'{"id":12345,"name":"dispatcher","items":[1,2,3,4,5],"ok":true,"pad":"xx"}'[:64]
HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Server: bench\r\n"
    b"Content-Type: application/json\r\n"
    b"Cache-Control: no-store\r\n"
    b"Vary: Accept-Encoding\r\n"
    b"Vary: Origin\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n" % len(BODY)
)
ANSWER = HEAD + BODY


class Connection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and ``Content-Length`` bodies; answers in order, at once."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        answers = 0
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            length = 0
            at = buffer.lower().find(b"\r\ncontent-length:", 0, end)
            if at >= 0:
                line_end = buffer.find(b"\r\n", at + 2)
                length = int(buffer[at + 17 : line_end])
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length :]
            answers += 1
        self.buffer = buffer
        if answers and self.transport is not None:
            self.transport.write(ANSWER * answers)


async def serve(port: int, context: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        Connection, "127.0.0.1", port, backlog=1024, reuse_address=True, ssl=context
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--key", help="PEM private key of --cert")
    args = parser.parse_args()
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    run(serve(args.port, context))


if __name__ == "__main__":
    main()
