"""Failures that only shared state meets: processes dying in the lock or in the middle of calls."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest import mock

import pytest

from dispatcher import Balancer, HealthCheck, SegmentError, _lock
from dispatcher import _segment as segment
from tests import helpers
from tests.helpers import Echo, in_flight, totals, wait_for

ADDRS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("write_holder", [True, False], ids=["recorded", "anonymous"])
def test_a_process_that_dies_holding_the_lock_does_not_freeze_the_others(
    write_holder: bool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A holder that never wrote its pid is taken over after 0.2 s instead of 2 s: the same
    # path, sooner.
    monkeypatch.setattr(_lock, "ANONYMOUS_HOLDER_NS", 200_000_000)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with Balancer(ADDRS, backend_factory=Echo, strategy="round_robin", monitor=False) as b:
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
        # Round-robin goes on where it was: the dead holder had picked nothing.
        assert [b.invoke(None) for _ in range(3)] == [ADDRS[2], ADDRS[0], ADDRS[1]]
        assert totals(b) == (5, 0, 0)


def test_a_slow_holder_that_is_alive_is_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as b:
        child = ctx.Process(target=helpers.hold_the_lock, args=(b, ready, True, 0.8))
        child.start()
        assert ready.wait(10)
        with caplog.at_level(logging.WARNING, logger="dispatcher"):
            assert b.invoke(None) in ADDRS
        child.join(10)
        assert child.exitcode == 0
        assert "died" not in caplog.text
        assert sum(s.requests for s in b.snapshot()) == 1


@pytest.mark.monitor
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_killed_workers_counts_return_to_zero_without_traffic(method: str) -> None:
    """A forked and a spawned child each hold a call, are SIGKILLed; the parent sends nothing."""
    ctx = multiprocessing.get_context(method)
    gate = ctx.Event()
    with Balancer(ADDRS, backend_factory=Echo, strategy="least_loaded") as b:
        children = [
            ctx.Process(target=helpers.hold_one_call, args=(b, gate)),
            ctx.Process(target=helpers.hold_one_call_attached, args=(b.name, gate)),
        ]
        for child in children:
            child.start()
        wait_for(lambda: in_flight(b) == 2, what="both calls")
        for child in children:
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        for child in children:
            child.join(10)
        # Reaped by the monitor process within its interval (0.5 s), well under 2 s.
        wait_for(lambda: in_flight(b) == 0, timeout=2.0, what="the monitor to reap")
        assert totals(b) == (0, 0, 0)


def start_owner() -> tuple[subprocess.Popen[str], str]:
    """An owner in another process, and the name of the balancer it created."""
    code = f"from tests.helpers import owner_until_stdin_closes as o; o({ADDRS!r})"
    owner = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert owner.stdout is not None and owner.stdin is not None
    return owner, owner.stdout.readline().strip()


def test_owner_killed_first_attached_keep_working() -> None:
    owner, name = start_owner()
    assert owner.stdout is not None and owner.stdin is not None
    attached = Balancer.attach(name, backend_factory=Echo, strategy="round_robin")
    try:
        assert attached.invoke(None) in ADDRS
        owner.kill()
        owner.wait(10)
        owner.stdin.close()
        owner.stdout.close()
        # The mapping stays valid: the worker keeps balancing on the orphaned state, the
        # round-robin cursor going on from the one call made before.
        assert [attached.invoke(None) for _ in range(3)] == [ADDRS[1], ADDRS[2], ADDRS[0]]
        assert totals(attached) == (4, 0, 0)
    finally:
        attached.close()
    wait_for(lambda: not os.path.exists(f"/dev/shm/{name}"), what="the segment to go")


def test_owner_closing_first_gives_attached_a_clear_error() -> None:
    owner, name = start_owner()
    assert owner.stdout is not None and owner.stdin is not None
    attached = Balancer.attach(name, backend_factory=Echo)
    try:
        assert attached.invoke(None) in ADDRS
        owner.stdin.close()
        assert owner.wait(10) == 0
        owner.stdout.close()
        with pytest.raises(SegmentError, match="closed by its owner"):
            attached.invoke(None)
    finally:
        attached.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_a_pickled_handle_to_a_closed_segment_is_a_clear_error() -> None:
    b = Balancer(ADDRS, backend_factory=Echo, monitor=False)
    data = pickle.dumps(b)
    b.close()
    with pytest.raises(SegmentError, match="does not exist"):
        pickle.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_cannot_attach() -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as b:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                segment._open.clear()  # as a process that never had the segment open
                os.setgid(65534)
                os.setuid(65534)
                Balancer.attach(b.name)
            except SegmentError as exc:
                code = 0 if "Permission denied" in str(exc) else 2
            except BaseException:
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_fork_after_creating_a_balancer_copies_no_threads() -> None:
    """gunicorn's preload forks after the app built the balancer: nothing threaded to copy.

    Run in a fresh interpreter with warnings as errors, so no other test's threads count.
    """
    script = textwrap.dedent(
        f"""
        import os, threading
        from dispatcher import Balancer, HealthCheck
        from tests.helpers import Echo
        with Balancer({ADDRS!r}, backend_factory=Echo,
                      health_check=HealthCheck(interval=0.05)) as b:
            b.invoke(None)
            assert threading.active_count() == 1, threading.enumerate()
            pid = os.fork()
            if pid == 0:
                os._exit(0 if b.invoke(None) in {ADDRS!r} else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        print("ok")
        """
    )
    done = helpers.run_python(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_backend_factory_that_raises_counts_nothing() -> None:
    def broken(addr: str) -> Echo:
        raise OSError(f"cannot build a client for {addr}")

    with Balancer(ADDRS, backend_factory=broken, strategy="least_loaded", monitor=False) as b:
        b.drain(ADDRS[0])
        for _ in range(3):
            with pytest.raises(OSError, match="cannot build"):
                b.invoke(None)
        assert in_flight(b) == 0
        assert [s.addr for s in b.snapshot()] == ADDRS[1:]  # the drained one was freed


def test_closing_an_attached_handle_gives_its_worker_row_back() -> None:
    with Balancer(ADDRS, backend_factory=Echo, max_workers=2, monitor=False) as owner:
        for _ in range(5):
            with Balancer.attach(owner.name, backend_factory=Echo) as attached:
                attached.invoke(None)
        assert sum(s.requests for s in owner.snapshot()) == 5


def test_a_wall_clock_step_does_not_make_live_workers_look_dead() -> None:
    import psutil

    from dispatcher import _workers as workers

    start = workers.start_time(os.getpid())
    stepped = psutil.boot_time() + 3600.0  # what psutil reads after the clock jumped an hour
    with mock.patch("psutil._pslinux.boot_time", return_value=stepped):
        assert workers.is_alive(os.getpid(), start)
    assert not workers.is_alive(os.getpid(), (start or 0) + 100)


@pytest.mark.monitor
def test_a_health_check_that_cannot_reach_the_monitor_leaves_nothing_behind() -> None:
    with pytest.raises(TypeError, match="picklable"):
        HealthCheck(check=lambda a: True)
    check = HealthCheck(check=helpers.always_false)
    object.__setattr__(check, "check", lambda a: True)  # slipped past validation
    with pytest.raises((AttributeError, pickle.PicklingError)):
        Balancer(ADDRS, backend_factory=Echo, health_check=check)
    # Only this process's segments: other runs on the machine may make and drop theirs.
    assert segment.find_by_owner(os.getpid(), closed=True) == []


@pytest.mark.monitor
def test_slow_health_probes_do_not_delay_reaping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probing, release = tmp_path / "probing", tmp_path / "release"
    monkeypatch.setenv("DISPATCHER_TEST_PROBING", str(probing))
    monkeypatch.setenv("DISPATCHER_TEST_RELEASE", str(release))
    ctx = multiprocessing.get_context("fork")
    gate = ctx.Event()
    check = HealthCheck(interval=0.05, timeout=10, check=helpers.check_until_released)
    with Balancer(ADDRS, backend_factory=Echo, health_check=check) as b:
        child = ctx.Process(target=helpers.hold_one_call, args=(b, gate))
        try:
            child.start()
            wait_for(lambda: in_flight(b) == 1, what="the held call")
            # A probe round is under way in the monitor, and stays so until released.
            wait_for(probing.exists, what="a probe round to start")
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join(10)
            wait_for(lambda: in_flight(b) == 0, timeout=2.0, what="the monitor to reap")
            assert not release.exists()
        finally:
            release.touch()


def test_a_health_check_from_main_is_refused() -> None:
    def check(addr: str) -> bool:
        return True

    check.__module__ = "__main__"
    with pytest.raises(TypeError, match="__main__"):
        HealthCheck(check=check)


def test_reaping_from_a_signal_handler_never_waits_for_its_own_lock() -> None:
    from dispatcher import LockBusy

    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as b:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child: claims a row, then dies without closing
            b.invoke(None)
            os._exit(0)
        os.waitpid(pid, 0)

        def reap_from_a_handler() -> None:  # as if a handler interrupted this process in it
            with pytest.raises(LockBusy):
                b.reap(blocking=False)

        b._state.lock.run(reap_from_a_handler)
        assert b.reap(blocking=False) == 1
