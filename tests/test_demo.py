from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from dispatcher import BUCKET_BOUNDS, Balancer
from dispatcher import _segment as segment
from dispatcher._cli.dashboard import (
    Frame,
    Sampler,
    WorkerInfo,
    WorkerRow,
    backend_state,
    middle_cut,
    plain_line,
    render,
    seconds_text,
    sparkline,
    summary,
    worker_rows,
)
from dispatcher._cli.demo import Step, Timeline
from dispatcher._cli.main import build_parser
from dispatcher._cli.top import open_target, snapshot_document
from dispatcher._layout import BUCKETS, bucket_of
from dispatcher._state import BackendStats
from dispatcher.errors import SegmentError
from tests import helpers
from tests.helpers import Echo, wait_for

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
        "window": 10.0,
        "recent_requests": 310,
        "recent_failures": 2,
        "recent_histogram": tuple(histogram),
        "p50": 0.0051,
        "p90": 0.0083,
        "p99": 0.168,
    }
    fields.update(changes)
    return BackendStats(**fields)  # type: ignore[arg-type]


BACKENDS = (
    stats("10.0.0.1:80", 0),
    stats("10.0.0.2:80", 1, ejected=True, ejected_until=107.0, times_ejected=2, failures=9),
    stats("[2001:db8:aaaa:bbbb:cccc:dddd:eeee:1]:8080", 2, effective_weight=0.5, in_flight=7),
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
        trends={"10.0.0.1:80": (0.0, 10.0, 20.0, 40.0)},
        workers=(
            WorkerInfo(4242, 12.0, 30 * 2**20, {0: 1, 2: 3}),
            WorkerInfo(4243, 9.0, 31 * 2**20, {2: 4}),
        ),
        labels={"10.0.0.1:80": "b1"},
        event="step 4/5: b2 is killed · next: b2 restarts on the same port in 8 s",
        log=(" 40.0s  b2 ejected",),
        totals="sent 500  ok 491",
    )


def row(text: str, addr: str) -> list[str]:
    """The cells of the table row naming `addr` (bordered tables: cells between "│")."""
    (line,) = [line for line in text.splitlines() if addr in line]
    return [cell.strip() for cell in line.split("│")[1:-1]]


def words_of(text: str, needle: str) -> list[str]:
    """The words of the one dashboard line that contains `needle`."""
    (line,) = [line for line in text.splitlines() if needle in line]
    return line.split()


def test_states() -> None:
    assert [backend_state(b) for b in BACKENDS] == STATES


def test_render_fits_80_columns_and_shows_each_backend_state() -> None:
    console = Console(file=io.StringIO(), record=True, width=80)
    console.print(render(frame()))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    # The long address lost its middle, never its state or its port.
    assert words_of(text, "warming 25%")[:3] == ["#2", "[2001:d…:1]:8080", "warming"]
    b1 = words_of(text, "10.0.0.1:80")
    assert b1[:3] == ["b1", "10.0.0.1:80", "healthy"]
    # in flight (bar, count), req/s over the window, the trend, errors, p50 p90 p99
    assert b1[-6:] == ["31", "▂▄█", "0.6%", "5.1ms", "8.3ms", "168ms"]
    assert words_of(text, "10.0.0.2:80")[2:4] == ["ejected", "7s"]
    assert words_of(text, "warming 25%")[2:5] == ["warming", "25%", "█████"]
    assert words_of(text, "10.0.0.4:80")[2] == "down"
    assert words_of(text, "10.0.0.5:80")[2] == "draining"
    assert "rates and latency over the last 10 s" in text
    for state in STATES[1:]:
        assert state in words_of(text, "N s left") + words_of(text, "of its weight")
    # Per worker: its calls in flight on each backend, and in all.
    assert words_of(text, "4242") == ["4242", "12%", "30M", "1", "·", "3", "·", "·", "4"]
    assert words_of(text, "4243")[-1] == "4"
    for shown in ("least_loaded", "step 4/5", "next: b2 restarts", "b2 ejected", "sent 500"):
        assert shown in text
    assert "<svg" in console.export_svg()


def test_the_pieces_of_the_picture() -> None:
    assert middle_cut("abcdefghij", 7) == "ab…ghij"
    assert middle_cut("short", 7) == "short"
    assert [seconds_text(s) for s in (None, 0.00084, 0.0052, 0.168, 1.24, 12.0)] == [
        "-",
        "840µs",
        "5.2ms",
        "168ms",
        "1.2s",
        "12s",
    ]
    assert sparkline([0.0, 1.0, 2.0, 4.0], 4.0) == " ▂▄█"
    assert sparkline([1.0], 0.0) == " "


def test_summary_and_plain_line() -> None:
    console = Console(file=io.StringIO(), record=True, width=130)
    console.print(summary(frame()))
    text = console.export_text()
    assert [row(text, b.addr)[1] for b in BACKENDS] == STATES
    line = plain_line(frame())
    assert "\n" not in line
    assert "b1 10.0.0.1:80 healthy 31/s" in line
    assert "10.0.0.2:80 ejected" in line


def test_sampler_trends_workers_and_event_log() -> None:
    snapshots = iter(
        [
            [stats("10.0.0.1:80", 0, requests=10)],
            [stats("10.0.0.1:80", 0, requests=50, ejected=True, ejected_until=1.0)],
            [stats("10.0.0.1:80", 0, requests=60), stats("10.0.0.5:80", 1)],
        ]
    )
    rows = [WorkerRow(os.getpid(), {0: 2}, 0)]
    sampler = Sampler(lambda: next(snapshots), lambda: rows, title="t", source="s", strategy="x")
    first = sampler.sample()
    assert first.trends == {"10.0.0.1:80": ()}
    assert [(w.pid, dict(w.in_flight)) for w in first.workers] == [(os.getpid(), {0: 2})]
    second = sampler.sample(event="now")
    assert second.event == "now"
    assert second.log[-1].endswith("10.0.0.1:80 ejected")
    sampler.note("hello")
    third = sampler.sample()
    assert third.log[-3].endswith("hello")
    assert third.log[-2].endswith("10.0.0.1:80 healthy")
    assert third.log[-1].endswith("10.0.0.5:80 registered, healthy")


def test_the_trend_is_requests_per_second_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 100.0, 102.0, 104.0])  # the sampler starts, then samples 3 times
    monkeypatch.setattr("dispatcher._cli.dashboard.time.monotonic", lambda: next(clock, 104.0))
    snapshots = iter([[stats("10.0.0.1:80", 0, requests=r)] for r in (10, 30, 90)])
    sampler = Sampler(lambda: next(snapshots), list, title="t", source="s", strategy="x")
    sampler.sample()
    sampler.sample()
    assert sampler.sample().trends == {"10.0.0.1:80": (10.0, 30.0)}


def test_find_by_owner_and_worker_rows() -> None:
    gate = threading.Event()
    with Balancer(["127.0.0.1:7201"], backend_factory=Echo, monitor=False) as balancer:
        balancer.invoke(None)
        assert balancer.name in segment.find_by_owner(os.getpid())
        with open_target(balancer.name) as watcher:
            assert watcher.owner_pid == os.getpid()
            assert watcher.workers() == [os.getpid()]
            assert not watcher.closed_by_owner
            held = threading.Thread(target=balancer.invoke, args=(gate,))
            held.start()
            wait_for(lambda: worker_rows(watcher)[0].in_flight == {0: 1})
            gate.set()
            held.join()
            assert worker_rows(watcher) == [WorkerRow(os.getpid(), {}, 0)]
        name = balancer.name
    assert name not in segment.find_by_owner(os.getpid())
    with pytest.raises(SegmentError, match="owns no"):
        open_target(str(os.getpid()))
    with pytest.raises(SegmentError):
        open_target(name)


def test_the_json_document_of_a_snapshot() -> None:
    gate = threading.Event()
    # Round robin: the four calls split exactly, two per backend.
    addrs = ["127.0.0.1:7211", "127.0.0.1:7212"]
    with Balancer(addrs, backend_factory=Echo, strategy="round_robin", monitor=False) as b:
        for _ in range(4):
            b.invoke(None)
        held = threading.Thread(target=b.invoke, args=(gate,))
        held.start()
        try:
            with open_target(b.name) as watcher:
                wait_for(lambda: helpers.in_flight(b) == 1)
                snapshot_document(watcher)
                document = json.loads(json.dumps(snapshot_document(watcher), allow_nan=False))
        finally:
            gate.set()
            held.join()
    assert document["balancer"] == b.name
    assert document["strategy"] == "round_robin"
    assert document["bucket_bounds"][-1] is None
    assert document["bucket_bounds"][:-1] == list(BUCKET_BOUNDS[:-1])
    (busy,) = [x for x in document["backends"] if x["in_flight"]]
    assert document["workers"] == [
        {"pid": os.getpid(), "retries": 0, "in_flight": {busy["addr"]: 1}}
    ]
    for backend in document["backends"]:
        assert backend["requests"] == 2
        assert backend["state"] == "healthy"
        assert backend["window"] > 0
        assert len(backend["histogram"]) == len(BUCKET_BOUNDS)
        assert {"p50", "p90", "p99", "rate", "error_ratio", "recent_requests"} <= set(backend)


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
        document = json.loads(
            subprocess.run(
                [sys.executable, "-m", "dispatcher", "top", name, "--json"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
                env=ENV,
            ).stdout
        )
        assert document["balancer"] == name
        assert document["owner_pid"] == owner.pid
        assert {b["addr"]: b["requests"] for b in document["backends"]} == dict.fromkeys(addrs, 5)
        assert [w["pid"] for w in document["workers"]] == [owner.pid]
        stream = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dispatcher",
                "top",
                str(owner.pid),
                "--json",
                "--interval",
                "0.1",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        assert stream.stdout is not None
        lines = [json.loads(stream.stdout.readline()) for _ in range(2)]
        stream.send_signal(signal.SIGINT)
        stream.communicate(timeout=30)
        assert stream.returncode == 0
        assert lines[1]["monotonic"] > lines[0]["monotonic"]
        assert all(line["backends"][0]["window"] > 0 for line in lines)
        for target in (name, str(owner.pid)):
            shown = subprocess.run(
                [sys.executable, "-m", "dispatcher", "top", target, "--once"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
                env={**ENV, "COLUMNS": "80"},
            ).stdout
            assert max(len(line) for line in shown.splitlines()) <= 80
            assert name in shown
            for addr in addrs:
                assert words_of(shown, addr)[2] == "healthy"
            assert words_of(shown, f"{owner.pid} ")[0] == str(owner.pid)
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


def test_the_timeline_says_where_it_is_and_what_comes_next() -> None:
    done: list[str] = []
    steps = [
        Step(0, "steady load"),
        Step(8, "b2 turns slow", lambda: done.append("slow") or None),
        Step(18, "b2 is fast again"),
    ]
    script = Timeline(steps, 30.0)
    assert script.progress(0.0) == "next: steady load in 0 s"
    assert list(script.advance(0.0)) == ["steady load"]
    assert script.progress(0.0) == "step 1/3: steady load · next: b2 turns slow in 8 s"
    assert script.progress(7.2) == "step 1/3: steady load · next: b2 turns slow in 1 s"
    assert list(script.advance(8.0)) == ["b2 turns slow"] and done == ["slow"]
    assert list(script.advance(29.0)) == ["b2 is fast again"]
    assert script.progress(29.0) == "step 3/3: b2 is fast again · next: steady load in 1 s"
    assert list(script.advance(30.0)) == ["steady load"]  # the next cycle


def test_many_backends_and_long_names_still_fit_80_columns() -> None:
    many = tuple(
        stats(f"backend-{i}.a-rather-long-service-name.internal:8080", 4000 + i, in_flight=i)
        for i in range(12)
    )
    labels = {b.addr: f"shard{i}" for i, b in enumerate(many)}
    wide = Frame(
        title="dispatcher top",
        source="dispatcher_5f36d7b59478e076 (pid 123456)",
        strategy="weighted_round_robin",
        now=100.0,
        elapsed=12345.0,
        backends=many,
        workers=(WorkerInfo(4194304, 100.0, 2**40, {b.slot: 99 for b in many}),),
        labels=labels,
        log=("x" * 200,),
    )
    console = Console(file=io.StringIO(), record=True, width=80)
    console.print(render(wide))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert words_of(text, "shard11 ")[:3] == ["shard11", "back…l:8080", "healthy"]
    assert words_of(text, "4194304")[-2:] == [str(99 * 6), str(99 * 12)]  # "other", "all"
