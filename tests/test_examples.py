"""The examples run as examples/README.md says, one command each, against loopback backends
named in $DOWNSTREAM (so no fixed port is needed), and their workers share one view of load."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for
from tests.test_servers import ROOT, Backend, Server, Shared, _Handler, check_removed

pytestmark = [pytest.mark.slow, pytest.mark.monitor]

EXAMPLES = ROOT / "examples"


@pytest.fixture
def backends(serve: Callable[..., Backend]) -> Callable[[], Backend]:
    return lambda: serve(_Handler, cls=Backend)


def stats(server: Server) -> dict[str, object]:
    return dict(json.loads(server.get("/stats", close=True)))


def check_one_view(server: Server, addrs: list[str], workers: int) -> str:
    """Calls spread over the workers; every worker reports the same numbers, which count
    every call. Returns the balancer's segment name."""
    answered: list[int] = []

    def several_answered() -> bool:
        for _ in range(8):
            answered.append(json.loads(server.get("/", close=True))["worker"])
        return len(set(answered)) >= min(workers, 2)

    wait_for(several_answered, 30, what="the workers to answer")
    views = {}

    def several_reported() -> bool:
        # Which worker accepts a connection is the kernel's choice: ask until two have.
        for _ in range(workers):
            view = stats(server)
            views[view["worker"]] = (view["balancer"], json.dumps(view["instances"]))
        return len(views) >= 2

    wait_for(several_reported, 30, what="several workers to report")
    assert len(set(views.values())) == 1, views  # and all saw the same
    name, instances = next(iter(views.values()))
    counted = json.loads(instances)
    assert {i["addr"] for i in counted} == set(addrs)
    assert sum(i["requests"] for i in counted) == len(answered)
    assert all(i["in_flight"] == 0 for i in counted)
    return str(name)


@pytest.mark.parametrize(
    "command",
    [["-m", "uvicorn", "app:app", "--workers", "4"], ["serve.py", "--workers", "2"]],
    ids=["uvicorn app:app --workers 4", "serve.py --workers 2"],
)
def test_the_fastapi_example_shares_one_balancer_with_one_command(
    tmp_path: Path, backends: Callable[..., Backend], command: list[str]
) -> None:
    pytest.importorskip("fastapi")
    addrs = [backends().addr, backends().addr]
    port = free_port()
    workers = int(command[command.index("--workers") + 1])
    argv = [sys.executable, *command, "--port", str(port)]
    env = {"DOWNSTREAM": ",".join(addrs)}
    server = Server(argv, port, tmp_path / "app.log", cwd=EXAMPLES / "fastapi_uvicorn", env=env)
    shared: Shared | None = None
    try:
        wait_for(lambda: _answers(server), 60, what="the example to serve")
        name = check_one_view(server, addrs, workers)
        shared = Shared(name)
    finally:
        code = server.stop(signal.SIGINT, group=True)  # Ctrl-C in its terminal
    assert code == 0, server.output()
    assert shared is not None
    try:
        check_removed(shared, server.log.read_text, reclaimed=0)
    finally:
        shared.close()


def test_the_flask_example_shares_the_masters_balancer(
    tmp_path: Path, backends: Callable[..., Backend]
) -> None:
    pytest.importorskip("flask")
    addrs = [backends().addr, backends().addr]
    port = free_port()
    conf = EXAMPLES / "flask_gunicorn" / "gunicorn.conf.py"
    argv = [sys.executable, "-m", "gunicorn", "-c", str(conf), "-b", f"127.0.0.1:{port}"]
    env = {"DOWNSTREAM": ",".join(addrs)}
    server = Server(argv, port, tmp_path / "flask.log", env=env)
    try:
        wait_for(lambda: _answers(server), 60, what="the example to serve")
        name = check_one_view(server, addrs, 4)
        assert name.startswith("dispatcher_")
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0, server.output()


def _answers(server: Server) -> bool:
    assert server.process.poll() is None, server.output()
    try:
        server.get("/stats", close=True)
    except Exception:
        return False
    return True


def test_the_stand_in_downstream_keeps_connections_alive_and_stops_quietly() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "downstream.py"), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        def up() -> bool:
            try:
                connection.connect()
            except OSError:
                return False
            return True

        wait_for(up, 30, what="the stand-in to listen")
        sock = connection.sock
        for path in ("/", "/health", "/"):
            connection.request("GET", path)
            answer = connection.getresponse()
            assert (answer.status, answer.version) == (200, 11)
            assert json.loads(answer.read()) == {"port": port}
        assert connection.sock is sock  # one connection for all three
        connection.close()
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert (process.returncode, out, err) == (0, "", "")
