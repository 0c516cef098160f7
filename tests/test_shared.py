"""`Balancer.shared`: one balancer per server, found by name, with no owner.

What the real servers of tests/test_servers.py cannot show one by one: workers that ask at the
same instant, options that differ, bad names, the scope's identity, the guardian's removal
(idle, asked to stop, orphaned and restarted), and the warning for a `Balancer(...)` made in
a worker of a pre-fork server. Processes are real (forked, spawned, fresh interpreters); each
test that makes a shared balancer starts its guardian, so all are marked ``monitor``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Balancer, HealthCheck, OptionMismatch, SegmentError, _monitor
from dispatcher import _layout as L
from dispatcher import _segment as segment
from dispatcher._segment import SCOPE_PREFIX, Scope, Segment
from tests.helpers import Echo, wait_for

pytestmark = pytest.mark.monitor

ADDRS = ["10.0.0.1:80", "10.0.0.2:80"]
ROOT = Path(__file__).resolve().parent.parent


def files_of(name: str) -> list[str]:
    """What segment `name` has in /dev/shm: itself, its lock, its creation lock."""
    with Segment.open(name) as held:
        lock = L.read_name(held.state.buffer, L.H_LOCK_NAME)
        key = held.scope_key.hex()
    return [
        f"/dev/shm/{name}",
        f"/dev/shm/sem.{lock.lstrip('/')}",
        f"/dev/shm/{SCOPE_PREFIX}{key}",
    ]


def left(files: list[str]) -> list[str]:
    return [path for path in files if os.path.exists(path)]


def remove(name: str) -> None:
    """End a test's shared segment now, as its guardian would once nobody holds it."""
    with Segment.open(name) as held:
        held.remove_unheld(force=True)


def scope_segments(scope: Scope) -> list[str]:
    """The live segments in /dev/shm made for `scope` (read from their headers)."""
    found = []
    for name in os.listdir("/dev/shm"):
        if not name.startswith(segment.NAME_PREFIX):
            continue
        with contextlib.suppress(SegmentError), Segment.open(name) as held:
            if held.scope_key == scope.key and not held.closed_by_owner:
                found.append(name)
    return found


@pytest.fixture
def scope() -> Iterator[str]:
    """A scope of this test's own; whatever it made is removed afterwards."""
    named = f"test-{uuid.uuid4().hex}"
    yield named
    for name in scope_segments(Scope.of("shared", named)):
        remove(name)


# Finding or creating ------------------------------------------------------------------------


def _ask_at_once(barrier: Any, named: str, out: Any) -> None:
    barrier.wait()
    balancer = Balancer.shared("shared", ADDRS, scope=named, backend_factory=Echo)
    out.put((os.getpid(), balancer.name, len(balancer._state.rows())))
    barrier.wait()  # keep the row until every process has looked


@pytest.mark.slow
def test_workers_that_ask_at_the_same_instant_get_one_balancer(scope: str) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(8), ctx.Queue()
    workers = [ctx.Process(target=_ask_at_once, args=(barrier, scope, out)) for _ in range(8)]
    for worker in workers:
        worker.start()
    answers = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert len({name for _, name, _ in answers}) == 1, answers
    assert scope_segments(Scope.of("shared", scope)) == [answers[0][1]]
    # Each process held its own row when it looked; the last to look saw all eight.
    assert max(rows for _, _, rows in answers) == 8


def test_the_same_call_in_a_process_returns_the_same_balancer(scope: str) -> None:
    first = Balancer.shared("shared", ADDRS, scope=scope, backend_factory=Echo)
    again = Balancer.shared("shared", list(reversed(ADDRS)), scope=scope, backend_factory=Echo)
    assert again is first
    assert not first.is_owner
    assert first.invoke(None) in ADDRS
    assert [stats.in_flight for stats in first.snapshot()] == [0, 0]
    name = first.name
    files = files_of(name)
    assert all(os.stat(path).st_mode & 0o777 == 0o600 for path in files)
    first.close()  # only detaches: the segment is its guardian's to remove
    assert left(files) == files


def test_the_failure_rule_is_each_handles_own(scope: str) -> None:
    lenient = Balancer.shared(
        "shared", ADDRS, scope=scope, backend_factory=Echo, counts_as_failure=()
    )
    strict = Balancer.shared("shared", ADDRS, scope=scope, backend_factory=Echo)
    assert strict is not lenient and strict.name == lenient.name
    with pytest.raises(ConnectionError):
        lenient.invoke("fail")  # not a failure under its rule: an answer
    assert sum(stats.failures for stats in strict.snapshot()) == 0
    with pytest.raises(ConnectionError):
        strict.invoke("fail")
    assert sum(stats.failures for stats in lenient.snapshot()) == 1
    assert sum(stats.requests for stats in lenient.snapshot()) == 2


def _name_in_child(balancer: Balancer, named: str, out: Any) -> None:
    again = Balancer.shared("shared", ADDRS, scope=named, backend_factory=Echo)
    out.put((again is balancer, again.name, again.invoke(None) in ADDRS))


def test_a_forked_child_gets_its_parents_balancer(scope: str) -> None:
    balancer = Balancer.shared("shared", ADDRS, scope=scope, backend_factory=Echo)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_name_in_child, args=(balancer, scope, out))
    child.start()
    assert out.get(timeout=30) == (True, balancer.name, True)
    child.join(30)
    assert sum(stats.requests for stats in balancer.snapshot()) == 1
    balancer.close()


class Custom:
    uses_cursor = False

    def pick(self, view: Any, cursor: int, key: int | None) -> int:
        return int(view.slots[0])


DIFFERENT = [
    ("capacity", 16),
    ("max_workers", 8),
    ("strategy", "round_robin"),
    ("strategy", Custom()),
    ("failure_threshold", 3),
    ("ejection_seconds", 5.0),
    ("max_ejection_seconds", 60.0),
    ("max_ejected_percent", 30),
    ("slow_start_seconds", 10.0),
    ("panic_percent", 0),
    ("health_check", HealthCheck(path="/health")),
    ("addrs", ["10.0.0.9:80"]),
]


def test_a_later_caller_with_other_options_gets_an_error_naming_the_option(scope: str) -> None:
    balancer = Balancer.shared("shared", ADDRS, scope=scope, backend_factory=Echo)
    before = (balancer._state.rows(), balancer.snapshot())
    for option, value in DIFFERENT:
        addrs = value if option == "addrs" else ADDRS
        options = {} if option == "addrs" else {option: value}
        with pytest.raises(OptionMismatch) as raised:
            Balancer.shared("shared", addrs, scope=scope, backend_factory=Echo, **options)
        assert raised.value.option == option
        assert f"{option}=" in str(raised.value)
        assert isinstance(raised.value, ValueError)
        assert pickle.loads(pickle.dumps(raised.value)).option == option
        assert (balancer._state.rows(), balancer.snapshot()) == before
    balancer.close()


@pytest.mark.slow
def test_another_process_with_other_options_gets_the_error_and_leaves_no_row(
    scope: str,
) -> None:
    balancer = Balancer.shared("shared", ADDRS, scope=scope, backend_factory=Echo)
    script = textwrap.dedent(
        f"""
        from dispatcher import Balancer, OptionMismatch
        try:
            Balancer.shared("shared", {ADDRS!r}, scope={scope!r}, capacity=8)
        except OptionMismatch as exc:
            print(exc.option, exc.given, exc.existing)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split() == ["capacity", "8", "64"], done.stderr
    assert [pid for _, pid, _ in balancer._state.rows()] == [os.getpid()]
    balancer.close()


@pytest.mark.slow
def test_a_balancer_nobody_holds_any_more_is_replaced_by_one_with_new_options(
    scope: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server restarted with new options (``uvicorn --reload``) within the guardian's idle
    time finds the old balancer unheld: it gets a new one, not an error."""
    script = textwrap.dedent(
        f"""
        from dispatcher import Balancer
        print(Balancer.shared("shared", {ADDRS!r}, scope={scope!r}, capacity=8).name)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # its guardian writes there, for seconds after it ends
        text=True,
        timeout=60,
    )
    old = done.stdout.strip()
    files = files_of(old)
    assert left(files) == files  # the old one waits for its idle time to end
    balancer = Balancer.shared("shared", ADDRS, scope=scope, capacity=16, backend_factory=Echo)
    assert balancer.name != old
    assert balancer.capacity == 16
    assert left(files) == files[2:]  # the creation lock stays: it names the new one
    assert f"{old}: removed the shared balancer 'shared': made with other options" in caplog.text
    balancer.close()


@pytest.mark.parametrize(
    ("name", "named", "error"),
    [
        (5, None, TypeError),
        ("", None, ValueError),
        ("x" * L.NAME_BYTES, None, ValueError),
        ("caf\u00e9", None, ValueError),
        ("tab\there", None, ValueError),
        ("shared", 3, TypeError),
        ("shared", "", ValueError),
    ],
)
def test_bad_names_and_scopes_are_refused_before_anything_is_made(
    name: Any, named: Any, error: type[Exception]
) -> None:
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(error):
        Balancer.shared(name, ADDRS, scope=named)
    assert set(os.listdir("/dev/shm")) - before == set()


def test_the_scope_is_the_parent_by_pid_and_start_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A restarted server (same pid, reused; another start time) never finds the old one's
    segment; the user is part of the key too."""
    parent = Scope.of("shared")
    named = Scope.of("shared", "a")
    assert (parent.owner_pid, parent.kind) == (os.getppid(), L.SCOPE_PARENT)
    assert parent.owner_start == segment.start_time(os.getppid())
    assert Scope.of("shared").key == parent.key
    assert Scope.of("other").key != parent.key
    assert Scope.of("shared", "b").key != named.key
    assert (named.owner_pid, named.kind) == (0, L.SCOPE_NAMED)
    monkeypatch.setattr(segment, "start_time", lambda pid: 1)
    assert Scope.of("shared").key != parent.key
    monkeypatch.setattr(os, "getuid", lambda: 12345)
    assert Scope.of("shared", "a").key != named.key


def test_a_creation_lock_of_another_user_or_readable_by_others_is_refused(
    scope: str,
) -> None:
    path = Scope.of("shared", scope).lock_path
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    os.chmod(path, 0o644)
    try:
        with pytest.raises(SegmentError, match="readable by others"):
            Balancer.shared("shared", ADDRS, scope=scope)
        os.symlink("/etc/passwd", path + ".link")
        os.replace(path + ".link", path)
        with pytest.raises(SegmentError, match="cannot open the creation lock"):
            Balancer.shared("shared", ADDRS, scope=scope)
    finally:
        os.unlink(path)


# Its end --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_segment_nobody_holds_is_removed_after_a_few_seconds(scope: str) -> None:
    balancer = Balancer.shared("shared", ADDRS, scope=scope, backend_factory=Echo)
    files = files_of(balancer.name)
    balancer.close()
    wait_for(lambda: not left(files), _monitor.IDLE_S + 10, what=f"{left(files)} removed")


def _guardian(name: str) -> int:
    with Segment.open(name) as held:
        words = held.state.words
        wait_for(lambda: words[L.H_MONITOR_PID] != 0, 30, what="the guardian to register")
        return int(words[L.H_MONITOR_PID])


@pytest.mark.slow
def test_a_guardian_asked_to_stop_waits_for_the_last_holder_then_removes(scope: str) -> None:
    balancer = Balancer.shared("shared", ADDRS, scope=scope, backend_factory=Echo)
    files = files_of(balancer.name)
    guardian = _guardian(balancer.name)
    os.kill(guardian, signal.SIGTERM)
    words = balancer._state.words
    beat = int(words[L.H_MONITOR_BEAT_NS])
    wait_for(lambda: words[L.H_MONITOR_BEAT_NS] > beat, 10, what="a round after SIGTERM")
    beat = int(words[L.H_MONITOR_BEAT_NS])
    wait_for(lambda: words[L.H_MONITOR_BEAT_NS] > beat, 10, what="another round")
    assert left(files) == files  # this process still holds a row
    balancer.close()
    wait_for(lambda: not left(files), 10, what=f"{left(files)} removed")
    wait_for(lambda: not _alive(guardian), 10, what="the guardian to exit")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


ORPHAN = """
import os, sys, time
from dispatcher import Balancer
from tests.helpers import Echo

if os.fork() == 0:  # the worker; its parent, the server, exits at once
    balancer = Balancer.shared("orphan", {addrs!r}, backend_factory=Echo)
    print(balancer.name, flush=True)
    while not os.path.exists({stop!r}):
        balancer.invoke(None)
        time.sleep(0.02)
    os._exit(0)
sys.stdin.readline()
"""


@pytest.mark.slow
def test_a_dead_guardian_of_an_orphaned_segment_is_replaced_and_removes_it(
    tmp_path: Path,
) -> None:
    """The server is gone but a worker lives on: the worker restarts the guardian (an owned
    segment's monitor would not be restarted once its owner is gone), which removes the
    segment once the worker ends."""
    stop = tmp_path / "stop"
    script = ORPHAN.format(addrs=ADDRS, stop=str(stop))
    server = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdin is not None
    try:
        name = server.stdout.readline().strip()
        assert name.startswith(segment.NAME_PREFIX), server.stderr
        files = files_of(name)
        first = _guardian(name)
        server.stdin.close()
        server.wait(30)  # the worker is an orphan now
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not _alive(first), 10, what="the guardian to die")
        with Segment.open(name) as held:
            words = held.state.words
            words[L.H_MONITOR_BEAT_NS] -= _monitor.STALE_NS  # as if it died 3 s ago
            wait_for(lambda: words[L.H_MONITOR_PID] not in (0, first), 30, what="a new guardian")
            second = int(words[L.H_MONITOR_PID])
        assert _alive(second)
        stop.touch()
        wait_for(lambda: not left(files), 10, what=f"{left(files)} removed")
    finally:
        stop.touch()
        with contextlib.suppress(ProcessLookupError):
            server.kill()
        server.wait(10)
        server.stdout.close()
        assert server.stderr is not None
        server.stderr.close()


def test_a_balancer_with_an_owner_logs_its_segment_name_once_at_creation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="dispatcher"):
        with Balancer(ADDRS, backend_factory=Echo, monitor=False) as balancer:
            balancer.invoke(None)
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("balancer ")]
    assert said == [f"balancer {balancer.name} created, owned by process {os.getpid()}"]


# The warning --------------------------------------------------------------------------------

WARNING = "makes a balancer of its own"

WORKERS_MAKE_THEIR_OWN = """
import multiprocessing, os, sys

def make(_):
    from dispatcher import Balancer
    from tests.helpers import Echo
    for _ in range(2):  # warned once per process
        Balancer({addrs!r}, backend_factory=Echo, monitor=False).close()
    return os.getpid()

if __name__ == "__main__":
    method = sys.argv[1]
    if method == "fork-first":  # forked from a process that had loaded dispatcher
        import dispatcher
        method = "fork"
    elif method == "fork":  # gunicorn without preload: dispatcher loaded after the fork
        assert "dispatcher" not in sys.modules
    context = multiprocessing.get_context(method)
    with context.Pool(2) as pool:
        for result in [pool.apply_async(os.getpid) for _ in range(4)]:
            result.get(30)  # both workers are up
        print(sorted(pool.map(make, range(2), chunksize=1)), flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "warned"), [("spawn", True), ("fork", True), ("fork-first", False)]
)
def test_a_balancer_made_in_a_worker_of_a_pool_warns_once_pointing_at_shared(
    tmp_path: Path, method: str, warned: bool
) -> None:
    script = tmp_path / "pool.py"
    script.write_text(WORKERS_MAKE_THEIR_OWN.format(addrs=ADDRS))
    done = subprocess.run(
        [sys.executable, str(script), method],
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if WARNING in line]
    if not warned:
        assert warnings == [], done.stderr
        return
    assert warnings, done.stderr
    assert all("Balancer.shared(" in line for line in warnings)
    pids = [line.split()[3] for line in warnings]
    assert len(pids) == len(set(pids)), warnings  # at most once per process


@pytest.mark.slow
def test_no_warning_for_a_plain_script_beside_other_python_processes() -> None:
    """Its parent (here pytest) runs Python and has other Python children, but none runs
    this script."""
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        script = textwrap.dedent(
            f"""
            from dispatcher import Balancer
            from tests.helpers import Echo
            Balancer({ADDRS!r}, backend_factory=Echo, monitor=False).close()
            print("made")
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            check=False,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.stdout == "made\n", done.stderr
        assert WARNING not in done.stderr
    finally:
        sibling.kill()
        sibling.wait(10)
