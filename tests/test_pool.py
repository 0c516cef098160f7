from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
from collections.abc import Iterator
from concurrent.futures import BrokenExecutor, Future, wait
from concurrent.futures.process import BrokenProcessPool

import pytest

from dispatcher import Balancer, DispatcherError, WorkerDied, WorkerPool
from tests.helpers import Echo, in_flight, totals, wait_for

ADDRS = ["127.0.0.1:7001", "127.0.0.1:7002"]


@pytest.fixture
def balancer() -> Iterator[Balancer]:
    # Round robin: one cursor for every worker, so calls split exactly over the backends.
    with Balancer(ADDRS, backend_factory=Echo, strategy="round_robin", monitor=False) as balancer:
        yield balancer


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_submit_map_and_context_manager(balancer: Balancer, method: str) -> None:
    context = multiprocessing.get_context(method)
    with WorkerPool(balancer, 2, mp_context=context) as pool:
        assert pool.submit(None).result(timeout=30) in ADDRS
        answers = list(pool.map([None] * 6))
        assert sorted(answers) == sorted(ADDRS * 3)
        assert 1 <= len(pool.pids()) <= 2
        assert os.getpid() not in pool.pids()
    assert totals(balancer) == (7, 0, 0)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(None)


def test_backend_errors_reach_the_future(balancer: Balancer) -> None:
    with WorkerPool(balancer, 1, mp_context=multiprocessing.get_context("fork")) as pool:
        with pytest.raises(ConnectionError, match="failed on purpose"):
            pool.submit("fail").result(timeout=30)
        assert pool.submit(None, key="user-1").result(timeout=30) in ADDRS


def test_shutdown_waits_for_calls_or_cancels_them(balancer: Balancer) -> None:
    pool = WorkerPool(balancer, 1, mp_context=multiprocessing.get_context("fork"))
    first = pool.submit(0.3)
    wait_for(lambda: in_flight(balancer) == 1)
    queued = [pool.submit(0.3) for _ in range(5)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert first.result(timeout=0) in ADDRS
    assert any(future.cancelled() for future in queued)
    assert all(future.done() for future in queued)
    assert in_flight(balancer) == 0


def test_cancel_before_start(balancer: Balancer) -> None:
    with WorkerPool(balancer, 1, mp_context=multiprocessing.get_context("fork")) as pool:
        running = pool.submit(0.5)
        wait_for(lambda: in_flight(balancer) == 1)
        later = [pool.submit(None) for _ in range(4)]
        assert later[-1].cancel()
        assert later[-1].cancelled()
        assert running.result(timeout=30) in ADDRS
        assert all(f.result(timeout=30) in ADDRS for f in later[:-1])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_killed_worker_fails_its_call_and_the_pool_recovers(
    balancer: Balancer, method: str
) -> None:
    context = multiprocessing.get_context(method)
    with WorkerPool(balancer, 1, mp_context=context) as pool:
        held = pool.submit(30.0)
        wait_for(lambda: in_flight(balancer) == 1)
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDied, match="died") as caught:
            held.result(timeout=30)
        assert isinstance(caught.value, BrokenProcessPool)
        assert isinstance(caught.value, DispatcherError)
        assert isinstance(caught.value, BrokenExecutor)
        assert pool.submit(None).result(timeout=30) in ADDRS
        assert pid not in pool.pids()
        wait_for(lambda: in_flight(balancer) == 0)


def test_retries_on_worker_death(balancer: Balancer) -> None:
    context = multiprocessing.get_context("fork")
    with WorkerPool(balancer, 1, mp_context=context, retries_on_worker_death=1) as pool:
        held = pool.submit(0.2)
        wait_for(lambda: in_flight(balancer) == 1)
        os.kill(pool.pids()[0], signal.SIGKILL)
        assert held.result(timeout=30) in ADDRS

        twice: Future[object] = pool.submit(30.0)
        killed: list[int] = []
        for _ in range(2):
            wait_for(lambda: in_flight(balancer) >= 1 and set(pool.pids()) - set(killed))
            killed.append(pool.pids()[0])
            os.kill(killed[-1], signal.SIGKILL)
        done, _ = wait([twice], timeout=30)
        assert done == {twice}
        with pytest.raises(WorkerDied, match="sent 2 times"):
            twice.result()
        wait_for(lambda: in_flight(balancer) == 0)


def test_rejects_unshared_balancer() -> None:
    with (
        Balancer(ADDRS, backend_factory=Echo, shared=False) as local,
        pytest.raises(ValueError, match="shared=False"),
    ):
        WorkerPool(local, 1)
    with pytest.raises(TypeError):
        WorkerPool("not a balancer", 1)  # type: ignore[arg-type]
    with (
        Balancer(ADDRS, backend_factory=Echo, monitor=False) as balancer,
        pytest.raises(ValueError),
    ):
        WorkerPool(balancer, 0)


def test_worker_died_pickles() -> None:
    error = pickle.loads(pickle.dumps(WorkerDied("a worker died")))
    assert isinstance(error, WorkerDied)
    assert isinstance(error, BrokenProcessPool)
    assert str(error) == "a worker died"
