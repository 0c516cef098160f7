"""One balancer shared by threads and by real processes, forked and spawned."""

from __future__ import annotations

import multiprocessing
import os
import signal
import textwrap
import threading

import pytest

from dispatcher import Balancer
from tests import helpers
from tests.helpers import Echo, requests_by_addr, totals, wait_for

ADDRS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
CONTEXTS = ["fork", "spawn"]


def test_threads_lose_nothing() -> None:
    with Balancer(ADDRS, backend_factory=Echo, strategy="least_loaded", monitor=False) as b:
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for i in range(300):
                    b.invoke(0.0001 if i % 50 == 0 else None)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert totals(b) == (16 * 300, 0, 0)


@pytest.mark.parametrize("method", CONTEXTS)
def test_round_robin_cursor_is_shared_exactly(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    with Balancer(ADDRS, backend_factory=Echo, strategy="round_robin", monitor=False) as b:
        children = [ctx.Process(target=helpers.call_many, args=(b, 600)) for _ in range(3)]
        for child in children:
            child.start()
        for child in children:
            child.join(60)
            assert child.exitcode == 0
        assert requests_by_addr(b) == dict.fromkeys(ADDRS, 600)
        assert totals(b) == (1800, 0, 0)


@pytest.mark.parametrize("method", CONTEXTS)
def test_child_in_flight_is_visible_to_the_parent(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    gate = ctx.Event()
    with Balancer(ADDRS, backend_factory=Echo, strategy="least_loaded", monitor=False) as b:
        child = ctx.Process(target=helpers.hold_one_call, args=(b, gate))
        child.start()
        wait_for(lambda: totals(b) == (0, 0, 1), what="the child's call")
        busy = next(s.addr for s in b.snapshot() if s.in_flight)
        # The parent's least-loaded picks see the child's call and avoid that backend.
        assert busy not in {b.invoke(None) for _ in range(20)}
        gate.set()
        child.join(30)
        assert child.exitcode == 0
        assert totals(b) == (21, 0, 0)


@pytest.mark.parametrize("method", CONTEXTS)
def test_membership_changes_reach_children_and_back(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    with Balancer(ADDRS[:2], backend_factory=Echo, monitor=False) as b:
        child = ctx.Process(target=helpers.picks_after_change, args=(b, ready, go, out))
        child.start()
        assert out.get(timeout=30) == ADDRS[:2]
        ready.wait(30)
        b.unregister(ADDRS[0])
        b.register(ADDRS[2])
        go.set()
        assert out.get(timeout=30) == ADDRS[1:]
        child.join(30)
        assert child.exitcode == 0
        registrar = ctx.Process(target=helpers.register_from_child, args=(b, "10.0.0.9:80"))
        registrar.start()
        registrar.join(30)
        assert registrar.exitcode == 0
        assert "10.0.0.9:80" in {s.addr for s in b.snapshot()}


def test_forked_child_counts_reach_the_parent_after_a_bare_os_fork() -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as b:
        b.invoke(None)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                for _ in range(99):
                    b.invoke(None)
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert totals(b) == (100, 0, 0)


def test_killed_child_counts_are_reaped() -> None:
    ctx = multiprocessing.get_context("fork")
    gate = ctx.Event()
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as b:
        child = ctx.Process(target=helpers.hold_one_call, args=(b, gate))
        child.start()
        wait_for(lambda: totals(b) == (0, 0, 1), what="the child's call")
        assert b.reap() == 0
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(10)
        assert b.reap() == 1
        assert totals(b) == (0, 0, 0)
        assert b.invoke(None) in ADDRS


def test_an_unrelated_process_attaching_by_name_never_unlinks_the_segment() -> None:
    """A process with its own resource tracker attaches, calls, and exits cleanly."""
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as b:
        script = textwrap.dedent(
            f"""
            from dispatcher import Balancer
            from tests.helpers import Echo
            with Balancer.attach({b.name!r}, backend_factory=Echo) as b:
                print(b.invoke(None))
            """
        )
        for _ in range(2):
            done = helpers.run_python(script)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() in ADDRS
            assert "leaked" not in done.stderr and "Traceback" not in done.stderr
        assert os.path.exists(f"/dev/shm/{b.name}")
        assert totals(b) == (2, 0, 0)


def test_owner_exit_unlinks_without_tracker_warnings() -> None:
    """A program that creates a balancer, uses it with spawned children and forgets close()."""
    script = textwrap.dedent(
        """
        import multiprocessing
        from dispatcher import Balancer
        from tests import helpers
        from tests.helpers import Echo
        if __name__ == "__main__":
            b = Balancer(["a:1", "b:1"], backend_factory=Echo)
            p = multiprocessing.get_context("spawn").Process(
                target=helpers.call_many, args=(b, 10))
            p.start(); p.join()
            print(b.name, sum(s.requests for s in b.snapshot()))
        """
    )
    done = helpers.run_python(script)
    assert done.returncode == 0, done.stderr
    name, calls = done.stdout.split()
    assert calls == "10"
    assert not os.path.exists(f"/dev/shm/{name}")
    assert done.stderr == ""


def test_least_loaded_workers_do_not_start_in_lockstep() -> None:
    """Eight workers that each make their first pick on an idle pool do not all pick alike."""
    ctx = multiprocessing.get_context("fork")
    with Balancer(
        [*ADDRS, "10.0.0.4:80"], backend_factory=Echo, strategy="least_loaded", monitor=False
    ) as b:
        b.snapshot()
        for _ in range(8):
            child = ctx.Process(target=helpers.call_many, args=(b, 1))
            child.start()
            child.join(30)
            assert child.exitcode == 0
        used = [s.addr for s in b.snapshot() if s.requests]
        assert len(used) >= 2  # all eight alike has odds of 4 x (1/4)**8, about 1 in 16,000
