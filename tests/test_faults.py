"""Faults that once hung, locked every process out or crashed one, with real processes and signals.

Each test starts the processes a user would have (an owner, workers attached by name through
a fresh interpreter, forked children) and the fault itself (SIGKILL, SIGSTOP, interrupts from
a timer, a full /dev/shm, a planted file), then checks that nothing hangs past a bound and
that every count comes back exact. The child bodies are functions of this module, run as
``python -c "from tests.test_faults import NAME; NAME(...)"``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dispatcher import (
    Balancer,
    InvalidAddress,
    NoBackendAvailable,
    SegmentError,
    _lock,
)
from dispatcher import _layout as L
from dispatcher import _segment as segment
from tests.helpers import Echo, as_another_process

ADDRS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(body: str, *args: Any, **popen: Any) -> subprocess.Popen[str]:
    """Run ``tests.test_faults.<body>(*args)`` in a fresh interpreter (its own resource
    tracker, as an unrelated worker has)."""
    call = f"from tests.test_faults import {body}; {body}(*{args!r})"
    return subprocess.Popen(
        [sys.executable, "-c", call],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def read_line(process: subprocess.Popen[str], timeout: float = 30) -> str:
    """The next line `process` prints, or fail after `timeout` seconds."""
    assert process.stdout is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(process.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    assert box and box[0], f"no line within {timeout} s; stderr: {stderr_of(process)}"
    return box[0].strip()


def stderr_of(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.kill()
    _, err = process.communicate(timeout=10)
    return err


def stop(process: subprocess.Popen[str]) -> None:
    """Kill `process` if it still runs, and close its pipes."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        process.kill()
    process.communicate(timeout=10)


def finished(process: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate(timeout=10)
        pytest.fail(f"still running after {timeout} s (a hang); stderr: {err}")
    return process.returncode, out, err


def totals(balancer: Balancer) -> tuple[int, int]:
    """(global in-flight, the sum of every worker row) of `balancer`'s segment."""
    state = balancer._state
    c = state.layout.capacity
    rows = sum(
        sum(state.words[state.row_base(r) : state.row_base(r) + c]) for r, _, _ in state.rows()
    )
    return sum(state.in_flight), rows


def lock_is_free(balancer: Balancer) -> bool:
    semaphore = balancer._state.lock.semaphore
    if not semaphore.acquire(False):
        return False
    semaphore.release()
    return balancer._state.words[L.H_LOCK_PID] == 0


# Child bodies ---------------------------------------------------------------------------------


def owner_holding_the_lock(monitor: bool) -> None:
    """An owner that prints its segment's name, then holds the lock until it is killed."""
    balancer = Balancer(ADDRS, backend_factory=Echo, monitor=monitor)
    print(balancer.name, flush=True)
    taken = threading.Event()

    def hold() -> None:
        taken.set()
        time.sleep(600)

    threading.Thread(target=balancer._state.lock.run, args=(hold,), daemon=True).start()
    taken.wait(10)
    print("held", flush=True)
    time.sleep(600)


def owner_closing_mid_call(threads: int) -> None:
    """An owner whose threads are mid-call when it closes; prints its name, then "closed"."""
    balancer = Balancer(ADDRS, backend_factory=Echo, monitor=False)
    print(balancer.name, flush=True)
    sys.stdin.readline()
    stop = threading.Event()
    errors: list[str] = []

    def call() -> None:
        while not stop.is_set():
            try:
                balancer.invoke(0.001)
            except SegmentError:
                return
            except BaseException as exc:  # reported to the test
                errors.append(repr(exc))
                return

    workers = [threading.Thread(target=call) for _ in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(0.05)
    balancer.close()
    stop.set()
    for worker in workers:
        worker.join(10)
    print("closed", json.dumps(errors), flush=True)


def attached_caller(name: str, calls: int) -> None:
    """Attach by name and call `calls` times; print how it ended."""
    balancer = Balancer.attach(name, backend_factory=Echo)
    print("attached", flush=True)
    done = 0
    try:
        for _ in range(calls):
            balancer.invoke(None)
            done += 1
    except SegmentError as exc:
        print("segment-error", done, exc, flush=True)
        return
    print("done", done, flush=True)
    balancer.close()


def interrupted_caller(name: str, period: float, seconds: float) -> None:
    """Call through `name` in the main thread while a timer raises KeyboardInterrupt every
    `period` seconds inside the calls; then print what the segment looks like."""
    balancer = Balancer.attach(name, backend_factory=Echo)
    armed = [False]
    interrupts = [0]

    def handler(signum: int, frame: object) -> None:
        if armed[0]:
            interrupts[0] += 1
            raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, period, period)
    calls = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            armed[0] = True
            balancer.invoke(None, retries=1)
            armed[0] = False
            calls += 1
        except KeyboardInterrupt:
            armed[0] = False
    armed[0] = False
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    balancer._state.settle()
    print(json.dumps({"calls": calls, "interrupts": interrupts[0]}), flush=True)
    balancer.close()


def steady_caller(name: str, seconds: float) -> None:
    """Call through `name` for `seconds`; print the longest gap between two calls."""
    balancer = Balancer.attach(name, backend_factory=Echo)
    gap = 0.0
    last = time.monotonic()
    deadline = last + seconds
    while last < deadline:
        balancer.invoke(None)
        now = time.monotonic()
        gap, last = max(gap, now - last), now
    print(json.dumps({"gap": gap}), flush=True)
    balancer.close()


def holder_that_stops(name: str, recorded: bool) -> None:
    """Take the lock (recording the holder or not), stop itself, then release once continued."""
    balancer = Balancer.attach(name, backend_factory=Echo)
    lock = balancer._state.lock

    def stop() -> None:
        print("stopping", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)

    if recorded:
        lock.run(stop)
    else:
        lock.semaphore.acquire()
        stop()
        lock.semaphore.release()
    print("released", flush=True)
    balancer.close()


def oversized_balancer() -> None:
    """Under a 1 MiB /dev/shm: a 41 MiB segment must be refused with a SegmentError."""
    try:
        Balancer([], capacity=4096, max_workers=1024)
    except SegmentError as exc:
        print(exc, flush=True)
        sys.exit(0)
    sys.exit(1)


# High ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("monitor", [False, True], ids=["no-monitor", "monitor"])
def test_a_worker_survives_its_owner_killed_holding_the_lock(monitor: bool) -> None:
    """The owner dies holding the lock and its tracker unlinks the segment: an unrelated
    worker still recovers the lock (its recovery lock is on a descriptor, not on the path)."""
    owner = child("owner_holding_the_lock", monitor)
    try:
        name = read_line(owner)
        assert read_line(owner) == "held"
        worker = child("attached_caller", name, 200)
        assert read_line(worker) == "attached"
        time.sleep(0.3)
        assert worker.poll() is None  # waiting for the owner's lock
        owner.kill()
        owner.communicate(timeout=10)
        code, out, err = finished(worker, 20)
        assert code == 0, err
        assert out.split()[:2] == ["done", "200"], out
        assert not os.path.exists(f"/dev/shm/{name}")  # the owner's tracker unlinked it
    finally:
        stop(owner)


@pytest.mark.slow
def test_an_owner_closing_mid_call_gives_attached_workers_a_segment_error() -> None:
    for _ in range(3):
        owner = child("owner_closing_mid_call", 8, stdin=subprocess.PIPE)
        try:
            name = read_line(owner)
            worker = child("attached_caller", name, 10**9)
            assert read_line(worker) == "attached"
            time.sleep(0.1)
            assert owner.stdin is not None
            owner.stdin.write("go\n")
            owner.stdin.flush()
            line = read_line(owner)
            assert line.startswith("closed"), line
            assert json.loads(line.split(" ", 1)[1]) == []  # no ValueError in any thread
            code, out, err = finished(worker, 20)
            assert code == 0, err
            assert out.startswith("segment-error"), out
        finally:
            stop(owner)


def test_one_worker_row_per_process_however_many_handles() -> None:
    with Balancer(ADDRS, backend_factory=Echo, max_workers=2, monitor=False) as owner:
        for _ in range(20):  # attach + invoke + drop: the same row every time
            attached = Balancer.attach(owner.name, backend_factory=Echo)
            attached.invoke(None)
            del attached
            gc.collect()
        assert [pid for _, pid, _ in owner._state.rows()] == [os.getpid()]
        owner.invoke(None)
        assert totals(owner) == (0, 0)


def _call_with(balancer: Balancer) -> int:
    balancer.invoke(None)
    return os.getpid()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_pool_passing_the_balancer_as_an_argument_keeps_one_row_per_worker(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    with Balancer(ADDRS, backend_factory=Echo, max_workers=3, monitor=False) as owner:
        with ctx.Pool(2) as pool:
            pids = set(pool.starmap(_call_with, [(owner,)] * 40))
        assert len(pids) <= 2
        owner.invoke(None)  # a row is still free for the owner
        assert totals(owner) == (0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("period", [0.002, 0.00013], ids=["2ms", "130us"])
def test_interrupts_leave_no_call_counted_and_no_lock_held(period: float) -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as owner:
        steady = child("steady_caller", owner.name, 4.0)
        interrupted = child("interrupted_caller", owner.name, period, 3.0)
        code, out, err = finished(interrupted, 60)
        assert code == 0, err
        report = json.loads(out)
        assert report["interrupts"] > 100, report
        code, out, err = finished(steady, 60)
        assert code == 0, err
        # A lock left held with no holder would stall the other process for 2 s or more.
        assert json.loads(out)["gap"] < 1.0, out
        assert totals(owner) == (0, 0)
        assert lock_is_free(owner)
        assert owner._state.retries() == 0


class InterruptAt:
    """Raise KeyboardInterrupt once, where a signal handler could: on entering `name` of
    `owner` (a function's entry is where CPython runs pending handlers)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def interrupted(*args: Any, **kwargs: Any) -> Any:
            monkeypatch.setattr(owner, name, real)
            raise KeyboardInterrupt

        monkeypatch.setattr(owner, name, interrupted)


def test_an_interrupt_while_a_row_is_taken_leaves_no_call_outside_the_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as owner:
        with as_another_process(owner):
            worker = Balancer.attach(owner.name, backend_factory=Echo)
        InterruptAt(monkeypatch, type(worker._state), "_slice")  # inside `use_row`
        with pytest.raises(KeyboardInterrupt):
            worker.invoke(None)
        seen: list[tuple[int, int]] = []
        worker._factory = lambda addr: Probe(lambda: seen.append(totals(owner)))
        worker._proxies.clear()
        worker.invoke(None)
        assert seen == [(1, 1)]  # the call in flight is in this process's row too
        worker.close()
        assert totals(owner) == (0, 0)


def test_an_interrupt_on_the_way_to_record_an_end_leaves_the_end_queued(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as owner:
        state = owner._state
        real_finish = state.finish

        def interrupt_next_entry(frame: Any, event: str, arg: Any) -> None:
            if event == "call":  # the first function entered after the interrupt
                sys.setprofile(None)
                raise KeyboardInterrupt

        def finish(*args: Any) -> None:  # the call is counted, then interrupted
            monkeypatch.setattr(state, "finish", real_finish)
            sys.setprofile(interrupt_next_entry)
            raise KeyboardInterrupt

        monkeypatch.setattr(state, "finish", finish)
        with pytest.raises(KeyboardInterrupt):
            owner.invoke(None)
        assert totals(owner) == (1, 1) and len(state.unfinished) == 1
        owner.invoke(None)  # the next call settles what was queued
        assert totals(owner) == (0, 0) and state.unfinished == []


class Probe(Echo):
    """`Echo` that runs `look` while its call is in flight."""

    def __init__(self, look: Any) -> None:
        super().__init__("probe")
        self.look = look

    def invoke(self, request: Any, *, timeout: float | None = None) -> Any:
        self.look()
        return request


def recovering_under_interrupts(name: str, rounds: int) -> None:
    """Again and again: a forked child dies holding the lock; this process recovers it while a
    130 us timer raises KeyboardInterrupt in its calls. Prints how many rounds ended."""
    balancer = Balancer.attach(name, backend_factory=Echo)
    armed = [False]

    def handler(signum: int, frame: object) -> None:
        if armed[0]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, handler)
    done = 0
    for _ in range(rounds):
        pid = os.fork()
        if pid == 0:  # the child: dies holding the lock, holder recorded
            balancer._state.lock.run(lambda: os._exit(0))
        os.waitpid(pid, 0)
        signal.setitimer(signal.ITIMER_REAL, 0.00013, 0.00013)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                armed[0] = True
                balancer.invoke(None)
                armed[0] = False
                break
            except KeyboardInterrupt:
                armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        done += 1
    balancer._state.settle()
    print(done, flush=True)
    balancer.close()


@pytest.mark.slow
def test_interrupts_during_a_recovery_never_lock_everyone_out() -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as owner:
        worker = child("recovering_under_interrupts", owner.name, 8)
        code, out, err = finished(worker, 120)
        assert code == 0, err
        assert out.strip() == "8"
        assert owner.invoke(None) in ADDRS  # no process is locked out afterwards
        assert totals(owner) == (0, 0)
        assert lock_is_free(owner)


# Medium --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "anonymous"])
def test_a_stopped_holder_is_waited_for_never_taken_over(
    recorded: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as owner:
        holder = child("holder_that_stops", owner.name, recorded)
        try:
            assert read_line(holder) == "stopping"
            deadline = time.monotonic() + 10
            while psutil_status(holder.pid) != "stopped" and time.monotonic() < deadline:
                time.sleep(0.01)
            results: list[Any] = []
            with caplog.at_level(logging.WARNING, logger="dispatcher"):
                caller = threading.Thread(target=lambda: results.append(owner.invoke(None)))
                caller.start()
                caller.join(_lock.ANONYMOUS_HOLDER_NS / 1e9 + 1.0)
                assert caller.is_alive(), "the lock of a stopped holder was taken over"
                os.kill(holder.pid, signal.SIGCONT)
                caller.join(20)
            assert results and results[0] in ADDRS
            assert "died holding" not in caplog.text
            code, out, err = finished(holder, 20)
            assert code == 0, err  # its own release found the lock still its own
            assert out.strip() == "released"
            assert totals(owner) == (0, 0)
            assert lock_is_free(owner)
        finally:
            stop(holder)


def psutil_status(pid: int) -> str:
    import psutil

    try:
        return str(psutil.Process(pid).status())
    except psutil.Error:
        return "gone"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a mount namespace")
def test_a_small_dev_shm_is_a_segment_error_not_a_sigbus() -> None:
    call = "from tests.test_faults import oversized_balancer; oversized_balancer()"
    script = f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} -c '{call}'"
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "Operation not permitted" in done.stderr:
        pytest.skip("mount namespaces are not allowed here")
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert "no room" in done.stdout and "MiB" in done.stdout, done.stdout


def test_closing_while_this_processs_threads_call_never_leaves_the_lock_held() -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as owner:
        for _ in range(5):
            attached = Balancer.attach(owner.name, backend_factory=Echo)
            handle = Balancer.attach(owner.name, backend_factory=Echo)  # a second handle
            del handle
            gc.collect()
            errors: list[BaseException] = []
            stop = threading.Event()

            def call(
                balancer: Balancer = attached,
                stop: threading.Event = stop,
                errors: list[BaseException] = errors,
            ) -> None:
                while not stop.is_set():
                    try:
                        balancer.invoke(0.0005)
                    except SegmentError:
                        return
                    except BaseException as exc:  # reported below
                        errors.append(exc)
                        return

            threads = [threading.Thread(target=call) for _ in range(8)]
            for thread in threads:
                thread.start()
            time.sleep(0.05)
            attached.close()
            stop.set()
            for thread in threads:
                thread.join(10)
            assert errors == []
        # The owner's process shares the segment: its own calls go on, and nothing stays
        # counted once every thread ended.
        assert owner.invoke(None) in ADDRS
        assert totals(owner) == (0, 0)
        assert lock_is_free(owner)


@pytest.fixture
def planted() -> Iterator[list[str]]:
    """Files another user or a mistake left in /dev/shm under this package's prefix."""
    made: list[str] = []
    yield made
    for path in made:
        if os.path.lexists(path):
            os.unlink(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant another user's file")
def test_top_ignores_files_it_does_not_own_and_fifos(planted: list[str]) -> None:
    header = memoryview(bytearray(L.HEADER_WORDS * L.WORD)).cast("q")
    header[L.H_MAGIC], header[L.H_OWNER_PID] = L.MAGIC, os.getpid()
    foreign = f"/dev/shm/{segment.NAME_PREFIX}planted{os.getpid()}"
    with open(foreign, "wb") as file:
        file.write(header.tobytes())
    os.chown(foreign, 65534, 65534)
    planted.append(foreign)
    fifo = f"/dev/shm/{segment.NAME_PREFIX}fifo{os.getpid()}"
    os.mkfifo(fifo)
    planted.append(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    found: list[list[str]] = []
    scan = threading.Thread(target=lambda: found.append(segment.find_by_owner(os.getpid())))
    scan.start()
    scan.join(10)
    assert found == [[]], "find_by_owner hung or trusted a file it does not own"
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher", "top", str(os.getpid()), "--once"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1 and "owns no open dispatcher balancer" in done.stdout
    with pytest.raises(SegmentError, match=r"not a regular file|belongs to uid"):
        segment.Segment.open(os.path.basename(fifo))
    with pytest.raises(SegmentError, match="belongs to uid"):
        segment.Segment.open(os.path.basename(foreign))


@pytest.mark.slow
def test_top_stuck_on_a_held_lock_still_stops_on_sigterm() -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as owner:
        release = threading.Event()
        taken = threading.Event()

        def hold() -> None:
            taken.set()
            release.wait(60)

        holder = threading.Thread(target=owner._state.lock.run, args=(hold,))
        holder.start()
        try:
            assert taken.wait(10)
            top = subprocess.Popen(
                [sys.executable, "-m", "dispatcher", "top", owner.name],
                cwd=ROOT,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            time.sleep(1.5)
            top.send_signal(signal.SIGTERM)
            code, out, err = finished(top, 5)
            assert code == 0, (out, err)
        finally:
            release.set()
            holder.join(10)


def _die_mid_call(balancer: Balancer, gate: Any) -> None:
    balancer.invoke(gate)


@pytest.mark.slow
@pytest.mark.monitor
def test_a_dead_monitor_is_replaced_and_its_work_taken_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = multiprocessing.get_context("fork")
    with Balancer(ADDRS, backend_factory=Echo) as owner:
        words = owner._state.words
        deadline = time.monotonic() + 20
        while not words[L.H_MONITOR_PID] and time.monotonic() < deadline:
            time.sleep(0.05)
        first = int(words[L.H_MONITOR_PID])
        assert first
        os.kill(first, signal.SIGKILL)
        gate = ctx.Event()
        worker = ctx.Process(target=_die_mid_call, args=(owner, gate))
        worker.start()
        while totals(owner) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert totals(owner) == (1, 1)
        os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
        worker.join(10)
        with caplog.at_level(logging.WARNING, logger="dispatcher.monitor"):
            deadline = time.monotonic() + 20
            while totals(owner) != (0, 0) and time.monotonic() < deadline:
                owner.invoke(None)  # a process that picks notices the monitor is gone
                time.sleep(0.05)
        assert totals(owner) == (0, 0)
        assert "the monitor process" in caplog.text and "is gone" in caplog.text
        deadline = time.monotonic() + 20
        while int(words[L.H_MONITOR_PID]) in (0, first) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = int(words[L.H_MONITOR_PID])
        assert second not in (0, first)
        assert psutil_status(second) not in ("gone", "zombie")


# Low -----------------------------------------------------------------------------------------


def _crafted(owner: Balancer, word: int, value: int) -> None:
    owner._state.words[word] = value


def test_attaching_refuses_a_crafted_header() -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False) as owner:
        words = owner._state.words
        for word, value in ((L.H_CAPACITY, 2_000_000), (L.H_MAX_WORKERS, 20_000_000)):
            saved = int(words[word])
            words[word] = value
            try:
                segment._open.clear()  # as an unrelated process that never opened it
                with pytest.raises(SegmentError, match="corrupt header"):
                    Balancer.attach(owner.name, backend_factory=Echo)
            finally:
                words[word] = saved
                segment._open[owner.name] = owner._segment
        buf = owner._state.buffer
        start = L.H_LOCK_NAME * L.WORD
        saved_name = bytes(buf[start : start + L.NAME_BYTES])
        buf[start + 3] = 0  # a NUL inside the lock's name
        try:
            segment._open.clear()
            with pytest.raises(SegmentError, match=r"printable|not the name"):
                Balancer.attach(owner.name, backend_factory=Echo)
        finally:
            buf[start : start + L.NAME_BYTES] = saved_name
            segment._open[owner.name] = owner._segment
        at = owner._state.layout.addresses
        saved_address = bytes(buf[at : at + 8])
        buf[at + 1] = 0xFF  # not ASCII, not UTF-8
        try:
            with pytest.raises(SegmentError, match="not ASCII"):
                owner.snapshot()
        finally:
            buf[at : at + 8] = saved_address


def test_arguments_that_once_slipped_through_are_refused_up_front() -> None:
    for addr in ("[fe80::1%e\0th]:80", "[fe80::1%é]:80", "[fe80::1%a b]:80"):
        with pytest.raises(InvalidAddress, match="zone id"):
            Balancer([addr], shared=False)
    with Balancer(ADDRS, backend_factory=Echo, shared=False) as b:
        before = b.snapshot()
        with pytest.raises(ValueError, match="timeout"):
            b.invoke(None, timeout=10**400)
        assert b.snapshot() == before
    with pytest.raises(ValueError, match="failure_threshold"):
        Balancer(ADDRS, failure_threshold=2**100, shared=False)
    with pytest.raises(ValueError, match="max_workers"):
        Balancer(ADDRS, max_workers=L.MAX_WORKERS + 1, shared=False)


def test_close_unlinks_the_owners_lock_at_once() -> None:
    balancers = [Balancer(ADDRS, backend_factory=Echo, monitor=False) for _ in range(50)]
    names = [L.read_name(b._state.buffer, L.H_LOCK_NAME) for b in balancers]
    assert all(os.path.exists(f"/dev/shm/sem.{n.lstrip('/')}") for n in names)
    for balancer in balancers:
        balancer.close()
    # The closed balancers are still referenced: nothing waits for garbage collection.
    assert not [n for n in names if os.path.exists(f"/dev/shm/sem.{n.lstrip('/')}")]
    del balancers


def test_a_pick_still_fails_cleanly_on_an_empty_pool() -> None:
    with Balancer([], backend_factory=Echo, monitor=False) as b, pytest.raises(NoBackendAvailable):
        b.invoke(None)
