from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from dispatcher import Balancer
from dispatcher import _segment as segment
from dispatcher._cli.dashboard import (
    Frame,
    Sampler,
    WorkerInfo,
    backend_state,
    plain_line,
    render,
    summary,
)
from dispatcher._cli.main import build_parser
from dispatcher._cli.top import open_target
from dispatcher._layout import BUCKETS, bucket_of
from dispatcher._state import BackendStats
from dispatcher.errors import SegmentError
from tests.helpers import Echo

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "140"}
STATES = ["healthy", "ejected", "warming", "down", "draining"]


def stats(addr: str, slot: int, **changes: object) -> BackendStats:
    histogram = [0] * BUCKETS
    histogram[bucket_of(5_000_000)] = 98
    histogram[bucket_of(200_000_000)] = 2
    fields: dict[str, object] = {
        "addr": addr,
        "weight": 2,
        "in_flight": 1,
        "requests": 100,
        "failures": 0,
        "consecutive_failures": 0,
        "ejected": False,
        "ejected_until": None,
        "times_ejected": 0,
        "down": False,
        "draining": False,
        "effective_weight": 2.0,
        "last_failure": None,
        "latency_ewma": 0.005,
        "histogram": tuple(histogram),
        "slot": slot,
    }
    fields.update(changes)
    return BackendStats(**fields)  # type: ignore[arg-type]


BACKENDS = (
    stats("10.0.0.1:80", 0),
    stats("10.0.0.2:80", 1, ejected=True, ejected_until=107.0, times_ejected=2, failures=9),
    stats("10.0.0.3:80", 2, effective_weight=0.5, in_flight=0),
    stats("10.0.0.4:80", 3, down=True, in_flight=0),
    stats("10.0.0.5:80", 4, draining=True),
)


def frame() -> Frame:
    return Frame(
        title="dispatcher demo",
        source="dispatcher_test",
        strategy="least_loaded",
        now=100.0,
        elapsed=42.0,
        backends=BACKENDS,
        rates={"10.0.0.1:80": 31.0},
        workers=(WorkerInfo(4242, 12.0, 30 * 2**20),),
        labels={"10.0.0.1:80": "b1 fast"},
        event="b2 is killed",
        log=(" 40.0s  b2 ejected",),
        totals="sent 500  ok 491",
    )


def row(text: str, addr: str) -> list[str]:
    """The cells of the table row naming `addr`."""
    (line,) = [line for line in text.splitlines() if addr in line]
    return [cell.strip() for cell in line.split("│")[1:-1]]


def test_states() -> None:
    assert [backend_state(b) for b in BACKENDS] == STATES


def test_render_shows_each_backend_state() -> None:
    console = Console(file=io.StringIO(), record=True, width=130)
    console.print(render(frame()))
    text = console.export_text()
    assert row(text, "10.0.0.1:80")[:2] == ["b1 fast 10.0.0.1:80", "healthy"]
    assert row(text, "10.0.0.1:80")[3:5] == ["31", "100"]
    assert row(text, "10.0.0.2:80")[1] == "ejected 7s"
    assert row(text, "10.0.0.2:80")[5:7] == ["9", "2"]
    assert row(text, "10.0.0.3:80")[1] == "warming 25%"
    assert row(text, "10.0.0.4:80")[1] == "down"
    assert row(text, "10.0.0.5:80")[1] == "draining"
    assert row(text, "10.0.0.1:80")[7:] == ["5 ms", "168 ms"]
    for shown in ("least_loaded", "b2 is killed", "4242", "30 MiB", "b2 ejected", "sent 500"):
        assert shown in text
    assert "<svg" in console.export_svg()


def test_summary_and_plain_line() -> None:
    console = Console(file=io.StringIO(), record=True, width=130)
    console.print(summary(frame()))
    text = console.export_text()
    assert [row(text, b.addr)[1] for b in BACKENDS] == STATES
    line = plain_line(frame())
    assert "\n" not in line
    assert "b1 fast 10.0.0.1:80 healthy 31/s" in line
    assert "10.0.0.2:80 ejected" in line


def test_sampler_rates_and_event_log() -> None:
    snapshots = iter(
        [
            [stats("10.0.0.1:80", 0, requests=10)],
            [stats("10.0.0.1:80", 0, requests=50, ejected=True, ejected_until=1.0)],
            [stats("10.0.0.1:80", 0, requests=60), stats("10.0.0.5:80", 1)],
        ]
    )
    sampler = Sampler(
        lambda: next(snapshots), lambda: [os.getpid()], title="t", source="s", strategy="x"
    )
    first = sampler.sample()
    assert first.rates == {"10.0.0.1:80": 0.0}
    assert [w.pid for w in first.workers] == [os.getpid()]
    second = sampler.sample(event="now")
    assert second.rates["10.0.0.1:80"] > 0
    assert second.event == "now"
    assert second.log[-1].endswith("10.0.0.1:80 ejected")
    sampler.note("hello")
    third = sampler.sample()
    assert third.log[-3].endswith("hello")
    assert third.log[-2].endswith("10.0.0.1:80 healthy")
    assert third.log[-1].endswith("10.0.0.5:80 registered, healthy")


def test_find_by_owner_and_worker_rows() -> None:
    with Balancer(["127.0.0.1:7201"], backend_factory=Echo, monitor=False) as balancer:
        balancer.invoke(None)
        assert balancer.name in segment.find_by_owner(os.getpid())
        with open_target(balancer.name) as watcher:
            assert watcher.owner_pid == os.getpid()
            assert watcher.workers() == [os.getpid()]
            assert not watcher.closed_by_owner
        name = balancer.name
    assert name not in segment.find_by_owner(os.getpid())
    with pytest.raises(SegmentError, match="owns no"):
        open_target(str(os.getpid()))
    with pytest.raises(SegmentError):
        open_target(name)


@pytest.mark.slow
def test_top_reports_a_balancer_owned_by_another_process() -> None:
    addrs = ["127.0.0.1:7301", "127.0.0.1:7302"]
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from tests.helpers import own_balancer; own_balancer({addrs}, 10)",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        name = owner.stdout.readline().strip()
        assert name.startswith("dispatcher_")
        for target in (name, str(owner.pid)):
            shown = subprocess.run(
                [sys.executable, "-m", "dispatcher", "top", target, "--once"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
                env=ENV,
            ).stdout
            assert name in shown
            for addr in addrs:
                cells = row(shown, addr)
                assert cells[1] == "healthy"
                assert cells[4] == "5", cells
            assert str(owner.pid) in shown
    finally:
        owner.communicate(timeout=30)
    assert owner.returncode == 0


def test_top_fails_clearly_without_a_balancer() -> None:
    gone = subprocess.run(
        [sys.executable, "-m", "dispatcher", "top", "dispatcher_missing", "--once"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 1
    assert "does not exist" in gone.stdout


def test_cli_options() -> None:
    parser = build_parser()
    args = parser.parse_args(["--backends", "3", "--duration", "5", "--strategy", "round_robin"])
    assert (args.backends, args.duration, args.strategy) == (3, 5.0, "round_robin")
    assert args.command is None
    assert parser.parse_args([]).duration is None
    top = parser.parse_args(["top", "1234", "--once"])
    assert (top.command, top.target, top.once) == ("top", "1234", True)
    for wrong in (["--backends", "0"], ["--rate", "-1"], ["--strategy", "nope"]):
        with pytest.raises(SystemExit):
            parser.parse_args(wrong)


def demo(*options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dispatcher", "--backends", "3", "--workers", "2", *options],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def lines_until(process: subprocess.Popen[str], pattern: str) -> Iterator[str]:
    assert process.stdout is not None
    for line in process.stdout:
        yield line
        if re.search(pattern, line):
            return
    raise AssertionError(f"the demo ended before printing {pattern!r}")


@pytest.mark.slow
def test_demo_runs_headless_and_names_every_backend() -> None:
    process = demo("--duration", "6", "--rate", "40")
    out, err = process.communicate(timeout=90)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert re.search(r"^\[\s*\d+\.\ds\] least_loaded", out, re.MULTILINE)
    table = out[out.index("summary") :]
    ports = set()
    for name in ("b1", "b2", "b3"):
        cells = row(table, f"{name} ")
        ports.add(cells[0].rsplit(":", 1)[1])
        assert int(cells[2]) > 0
    assert len(ports) == 3
    assert re.search(r"sent \d+  ok [1-9]\d*", out)


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_leaves_no_segment() -> None:
    process = demo("--rate", "40")
    try:
        out = "".join(lines_until(process, r"^\[\s*[2-9]\.\ds\]"))
        name = re.search(r"segment (dispatcher_\w+)", out)
        assert name is not None
        assert os.path.exists(f"/dev/shm/{name[1]}")
        children = psutil.Process(process.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in children]
        # 3 backends and 2 pool workers (spawned), the monitor, the resource tracker.
        assert sum("multiprocessing.spawn" in c for c in commands) >= 5, commands
        assert sum("dispatcher._monitor" in c for c in commands) == 1, commands
        os.killpg(process.pid, signal.SIGINT)
        rest, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, err
    assert "Traceback" not in err, err
    assert "summary" in rest
    psutil.wait_procs(children, timeout=10)
    assert all(gone(child) for child in children)
    assert not os.path.exists(f"/dev/shm/{name[1]}")
