"""The shared-state peers of `bench_overhead.py`: least-loaded pick + release as users write it.

Each peer holds N in-flight counts somewhere every worker process can reach, and offers the
same two steps as a dispatcher call: pick (choose the lowest count, ties to the first, and add
one) and release (subtract one). They are written the way their users write them, not tuned for
this benchmark; the one concession is the best case among them, a manager object whose method
does the whole pick in the server.

* ``manager_list``: a ``multiprocessing.Manager`` list proxy and a Manager lock;
* ``manager_object``: a ``BaseManager``-registered object with ``pick()`` and ``release(i)``;
* ``redis_tcp``, ``redis_unix``: a hash in Redis, a Lua script that picks and increments,
  ``HINCRBY -1`` on release, over loopback TCP and over a unix socket (redis-py, hiredis when
  installed). The script starts its own ``redis-server`` in a temp dir and stops it after.

A peer is made in the parent (`setup`), inherited by forked workers, and each worker calls
`client` once to get its own ``(pick, release)`` pair.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.managers import BaseManager
from typing import Any

Pick = Callable[[], int]
Release = Callable[[int], Any]

PICK_LUA = """
local n = tonumber(ARGV[1])
local fields = {}
for i = 1, n do fields[i] = i - 1 end
local counts = redis.call('HMGET', KEYS[1], unpack(fields))
local best, low = 0, tonumber(counts[1])
for i = 2, n do
  local c = tonumber(counts[i])
  if c < low then best, low = i - 1, c end
end
redis.call('HINCRBY', KEYS[1], best, 1)
return best
"""


class LeastLoadedCounts:
    """The whole pick server-side: one manager round trip per pick and one per release."""

    def __init__(self, n: int) -> None:
        self._counts = [0] * n
        self._lock = threading.Lock()

    def pick(self) -> int:
        with self._lock:
            counts = self._counts
            best = counts.index(min(counts))
            counts[best] += 1
            return best

    def release(self, i: int) -> None:
        with self._lock:
            self._counts[i] -= 1

    def total(self) -> int:
        return sum(self._counts)


class CountsManager(BaseManager):
    pass


CountsManager.register("LeastLoadedCounts", LeastLoadedCounts)


class Peer:
    """A peer made in the parent for one run; `client()` is called in each worker."""

    def client(self) -> tuple[Pick, Release]:
        raise NotImplementedError

    def in_flight(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ManagerList(Peer):
    def __init__(self, ctx: Any, n: int) -> None:
        self._manager = ctx.Manager()
        self._counts = self._manager.list([0] * n)
        self._lock = self._manager.Lock()

    def client(self) -> tuple[Pick, Release]:
        counts, lock = self._counts, self._lock

        def pick() -> int:
            with lock:
                snapshot = counts[:]
                best = snapshot.index(min(snapshot))
                counts[best] = snapshot[best] + 1
            return best

        def release(i: int) -> None:
            with lock:
                counts[i] -= 1

        return pick, release

    def in_flight(self) -> int:
        return sum(self._counts[:])

    def close(self) -> None:
        self._manager.shutdown()


class ManagerObject(Peer):
    def __init__(self, ctx: Any, n: int) -> None:
        self._manager = CountsManager(ctx=ctx)
        self._manager.start()
        self._counts = self._manager.LeastLoadedCounts(n)  # type: ignore[attr-defined]

    def client(self) -> tuple[Pick, Release]:
        return self._counts.pick, self._counts.release

    def in_flight(self) -> int:
        return int(self._counts.total())

    def close(self) -> None:
        self._manager.shutdown()


class RedisServer:
    """A throwaway ``redis-server`` on loopback TCP and a unix socket, in its own temp dir."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError(
                "redis-server is not installed (Debian: apt-get install redis-server)"
            )
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.port = free_port()
        self.unix_socket = os.path.join(self.dir, "redis.sock")
        self._process = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--unixsocket", self.unix_socket,
                "--unixsocketperm", "700",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.dir,
                "--daemonize", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(unix_socket_path=self.unix_socket).ping()
                redis.Redis(host="127.0.0.1", port=self.port).ping()
                return
            except (redis.ConnectionError, FileNotFoundError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def connect(self, transport: str) -> Any:
        import redis

        if transport == "unix":
            return redis.Redis(unix_socket_path=self.unix_socket)
        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisLua(Peer):
    KEY = "bench:in_flight"

    def __init__(self, server: RedisServer, transport: str, n: int) -> None:
        self._server, self._transport, self._n = server, transport, n
        admin = server.connect(transport)
        admin.delete(self.KEY)
        admin.hset(self.KEY, mapping=dict.fromkeys(range(n), 0))
        self._admin = admin

    def client(self) -> tuple[Pick, Release]:
        connection = self._server.connect(self._transport)
        script = connection.register_script(PICK_LUA)
        key, n = self.KEY, self._n
        hincrby = connection.hincrby

        def pick() -> int:
            return int(script(keys=[key], args=[n]))

        def release(i: int) -> None:
            hincrby(key, i, -1)

        return pick, release

    def in_flight(self) -> int:
        return sum(int(v) for v in self._admin.hvals(self.KEY))

    def close(self) -> None:
        self._admin.close()


PEERS = ("manager_list", "manager_object", "redis_tcp", "redis_unix")


@contextlib.contextmanager
def peer_factory(wanted: list[str]) -> Iterator[tuple[list[str], Callable[[str, Any, int], Peer]]]:
    """Yield the peers that can run here and a ``make(name, ctx, backends)``; stop Redis after."""
    server: RedisServer | None = None
    available = list(wanted)
    if any(name.startswith("redis") for name in wanted):
        try:
            import redis  # noqa: F401

            server = RedisServer()
        except (ImportError, FileNotFoundError) as exc:
            print(f"skipping the Redis peers: {exc}")
            available = [name for name in wanted if not name.startswith("redis")]

    def make(name: str, ctx: Any, n: int) -> Peer:
        if name == "manager_list":
            return ManagerList(ctx, n)
        if name == "manager_object":
            return ManagerObject(ctx, n)
        assert server is not None
        return RedisLua(server, name.removeprefix("redis_"), n)

    try:
        yield available, make
    finally:
        if server is not None:
            server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
