from __future__ import annotations

import http.server
import os
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest

from dispatcher import _monitor
from dispatcher import _segment as segment
from tests.helpers import LoopbackServer


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Every test must leave /dev/shm as it found it (other test runs may share the machine,
    so only segments this test process created count)."""
    before = set(segment.find_by_owner(os.getpid(), closed=True))
    yield
    leaked = set(segment.find_by_owner(os.getpid(), closed=True)) - before
    assert not leaked, f"segments left in /dev/shm: {leaked}"


@pytest.fixture(autouse=True)
def monitor_only_where_tested(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A balancer made by a test starts no monitor process unless the test is marked
    ``monitor``: each monitor is a fresh interpreter, most of what the suite would spend."""
    if request.node.get_closest_marker("monitor") is not None:
        return

    def refuse(name: str, health: object) -> NoReturn:
        raise AssertionError(
            "this test starts a monitor process: make its balancers with monitor=False, "
            "or mark it @pytest.mark.monitor if it tests the monitor"
        )

    monkeypatch.setattr(_monitor, "start", refuse)


@pytest.fixture
def serve() -> Iterator[Callable[..., Any]]:
    """``serve(Handler, **attributes)``: a `LoopbackServer`, stopped after the test.

    ``serve(Handler, cls=Subclass, ...)`` starts a subclass of `LoopbackServer` instead.
    """
    started: list[LoopbackServer] = []

    def start(
        handler: type[http.server.BaseHTTPRequestHandler],
        cls: type[LoopbackServer] = LoopbackServer,
        **attributes: Any,
    ) -> LoopbackServer:
        started.append(cls(handler, **attributes))
        return started[-1]

    yield start
    for server in started:
        server.stop()
