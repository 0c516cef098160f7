"""Failures that only shared state meets: processes dying in the lock or in the middle of calls."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time

import pytest

from dispatcher import Balancer
from tests import helpers
from tests.helpers import Echo

ADDRS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]


@pytest.mark.parametrize("write_holder", [True, False], ids=["recorded", "anonymous"])
def test_a_process_that_dies_holding_the_lock_does_not_freeze_the_others(
    write_holder: bool, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with Balancer(ADDRS, backend_factory=Echo) as b:
        b.invoke(None)
        child = ctx.Process(target=helpers.hold_the_lock, args=(b, ready, write_holder, 60))
        child.start()
        assert ready.wait(10)
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(10)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="dispatcher"):
            assert b.invoke(None) in ADDRS
        assert time.monotonic() - started < 10
        assert "died holding the shared lock" in caplog.text
        assert [b.invoke(None) for _ in range(3)]
        stats = b.snapshot()
        assert sum(s.requests for s in stats) == 5
        assert sum(s.in_flight for s in stats) == 0


def test_a_slow_holder_that_is_alive_is_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with Balancer(ADDRS, backend_factory=Echo) as b:
        child = ctx.Process(target=helpers.hold_the_lock, args=(b, ready, True, 0.8))
        child.start()
        assert ready.wait(10)
        with caplog.at_level(logging.WARNING, logger="dispatcher"):
            assert b.invoke(None) in ADDRS
        child.join(10)
        assert child.exitcode == 0
        assert "died" not in caplog.text
        assert sum(s.requests for s in b.snapshot()) == 1
