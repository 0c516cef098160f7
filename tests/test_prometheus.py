"""`dispatcher.prometheus.BalancerCollector` with the real prometheus_client: the numbers
of every process, from whichever process scrapes, in multiprocess mode or not."""

from __future__ import annotations

import http.server
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import urllib3

from dispatcher import BUCKET_BOUNDS, Balancer
from tests import helpers
from tests.helpers import Echo, FakeClock, LoopbackServer

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from dispatcher.prometheus import BalancerCollector  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ADDRS = ["127.0.0.1:7401", "127.0.0.1:7402"]
NAMES = {
    "dispatcher_backend_requests",
    "dispatcher_backend_failures",
    "dispatcher_backend_in_flight",
    "dispatcher_backend_ejected",
    "dispatcher_backend_ejections",
    "dispatcher_backend_latency_seconds",
    "dispatcher_retries_in_flight",
    "dispatcher_workers",
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(text: str, name: str) -> float:
    return sum(v for (n, _), v in samples(text).items() if n == name)


def per_backend(text: str, name: str, label: str = "test") -> dict[str, float]:
    found = {}
    for (n, labels), value in samples(text).items():
        named = dict(labels)
        if n == name and "le" not in named:
            assert named["balancer"] == label
            found[named["backend"]] = value
    return found


def test_the_metrics_of_one_process_are_its_shared_numbers() -> None:
    clock = FakeClock()
    with clock.use(
        Balancer(ADDRS, backend_factory=Echo, monitor=False, failure_threshold=2, latency=True)
    ) as balancer:
        for _ in range(4):
            balancer.invoke(None)
        for _ in range(4):  # two in a row on each backend: the first fails twice, ejected
            with pytest.raises(ConnectionError):
                balancer.invoke("fail")
        text = helpers.scrape(balancer.name)
        stats = {s.addr: s for s in balancer.snapshot()}
    assert {f.name for f in text_string_to_metric_families(text)} == NAMES
    assert per_backend(text, "dispatcher_backend_requests_total") == dict.fromkeys(ADDRS, 4.0)
    assert per_backend(text, "dispatcher_backend_failures_total") == dict.fromkeys(ADDRS, 2.0)
    assert per_backend(text, "dispatcher_backend_in_flight") == dict.fromkeys(ADDRS, 0.0)
    ejected = per_backend(text, "dispatcher_backend_ejected")
    assert sorted(ejected.values()) == [0.0, 1.0]  # 50% at most: the second stays in
    assert per_backend(text, "dispatcher_backend_ejections_total") == ejected
    assert total(text, "dispatcher_workers") == 1.0
    assert total(text, "dispatcher_retries_in_flight") == 0.0
    # The histogram is the shared one, cumulative, on its own bounds: every le is exact.
    for addr in ADDRS:
        buckets = {
            dict(labels)["le"]: value
            for (n, labels), value in samples(text).items()
            if n == "dispatcher_backend_latency_seconds_bucket" and dict(labels)["backend"] == addr
        }
        assert buckets["+Inf"] == 4.0
        histogram = stats[addr].histogram
        for le, value in buckets.items():
            if le != "+Inf":
                bound = float(le)
                assert bound in BUCKET_BOUNDS
                assert value == sum(histogram[: BUCKET_BOUNDS.index(bound) + 1])
        assert list(buckets.values()) == sorted(buckets.values())


def test_a_collector_claims_no_row_and_reports_nothing_once_closed() -> None:
    with Balancer(ADDRS, backend_factory=Echo, monitor=False, latency=True) as balancer:
        registry = prometheus_client.CollectorRegistry()
        collector = BalancerCollector(balancer)
        registry.register(collector)
        text = prometheus_client.generate_latest(registry).decode()
        assert per_backend(
            text, "dispatcher_backend_requests_total", balancer.name
        ) == dict.fromkeys(ADDRS, 0.0)
        assert balancer.workers() == []  # scraping is not picking
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            registry.register(BalancerCollector(balancer.name))
    assert prometheus_client.generate_latest(registry) == b""
    collector.close()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError):
        BalancerCollector(42)  # type: ignore[arg-type]
    with (
        Balancer(ADDRS, backend_factory=Echo, monitor=False, shared=False) as unshared,
        pytest.raises(TypeError, match="shared=False"),
    ):
        BalancerCollector(unshared)
    with pytest.raises(Exception, match="not the name of a dispatcher segment"):
        BalancerCollector("nope")


@pytest.fixture(params=[False, True], ids=["plain", "multiprocess"])
def multiprocess_mode(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[bool]:
    """prometheus_client's multiprocess mode switched off, or on (a directory in
    $PROMETHEUS_MULTIPROC_DIR, with one of the app's own counters written there)."""
    if request.param:
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    yield request.param


def test_three_processes_call_a_fourth_and_a_worker_scrape_the_same_totals(
    multiprocess_mode: bool,
) -> None:
    calls = 60
    ctx = multiprocessing.get_context("fork")
    with Balancer(ADDRS, backend_factory=Echo, monitor=False, latency=True) as balancer:
        done, out = ctx.Event(), ctx.Queue()
        scraper = ctx.Process(target=helpers.call_then_scrape, args=(balancer, calls, done, out))
        others = [
            ctx.Process(target=helpers.call_with_failures, args=(balancer, calls)) for _ in range(2)
        ]
        for process in [scraper, *others]:
            process.start()
        for process in others:
            process.join(60)
            assert process.exitcode == 0
        done.set()
        from_worker = out.get(timeout=60)
        scraper.join(60)
        assert scraper.exitcode == 0
        env = dict(os.environ)
        if multiprocess_mode:
            script = (
                "from prometheus_client import Counter; Counter('app_pages', 'app').inc(3); "
                f"from tests.helpers import scrape; print(scrape({balancer.name!r}))"
            )
        else:
            script = f"from tests.helpers import scrape; print(scrape({balancer.name!r}))"
        from_fourth = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        shared = helpers.totals(balancer)
    failing = len(range(0, calls, 3))
    for text in (from_worker, from_fourth):
        assert total(text, "dispatcher_backend_requests_total") == 3 * calls == shared.requests
        assert total(text, "dispatcher_backend_failures_total") == 3 * failing == shared.failures
        assert total(text, "dispatcher_backend_in_flight") == 0
        assert (
            sum(
                v
                for (n, labels), v in samples(text).items()
                if n == "dispatcher_backend_latency_seconds_bucket" and ("le", "+Inf") in labels
            )
            == 3 * calls
        )
    if multiprocess_mode:  # the app's own metrics, merged from per-pid files, are there too
        assert total(from_fourth, "app_pages_total") == 3.0
    else:
        assert "app_pages" not in from_fourth


def test_scrapes_do_not_disturb_calls() -> None:
    """Scraping while calls run leaves every count exact."""
    with Balancer(ADDRS, backend_factory=Echo, monitor=False, latency=True) as balancer:
        deadline = time.monotonic() + 0.3
        text = ""
        while time.monotonic() < deadline:
            balancer.invoke(None)
            text = helpers.scrape(balancer.name)
        assert total(text, "dispatcher_backend_requests_total") == helpers.totals(balancer).requests


# A real gunicorn ------------------------------------------------------------------------------


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = str(self.server.server_address[1]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_one_gunicorn_worker_serves_the_whole_servers_totals(
    serve: Callable[..., LoopbackServer], tmp_path: Path
) -> None:
    """The "Done when" check: gunicorn with 3 sync workers and prometheus_client in
    multiprocess mode; whichever worker answers ``GET /metrics`` reports the calls of all."""
    pytest.importorskip("gunicorn")
    backends = [serve(_Answer) for _ in range(2)]
    port = helpers.free_port()
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(
        "from dispatcher import gunicorn as dg\n"
        f"dg.configure({[b.addr for b in backends]!r}, strategy='least_loaded')\n"
        "from dispatcher.gunicorn import child_exit, on_exit, on_starting, post_fork\n"
        f"bind = '127.0.0.1:{port}'\nworkers = 3\nworker_class = 'sync'\n"
        "graceful_timeout = 5\ntimeout = 60\nloglevel = 'warning'\n"
    )
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONWARNINGS": "ignore",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    env.pop("DISPATCHER_BALANCER", None)
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                str(conf),
                "tests.helpers:wsgi_app_with_metrics",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    http = urllib3.PoolManager(retries=False, timeout=30)

    def get(path: str) -> urllib3.BaseHTTPResponse:
        answer = http.request(
            "GET", f"http://127.0.0.1:{port}{path}", headers={"Connection": "close"}
        )
        assert answer.status == 200, answer.data
        return answer

    def ready() -> bool:
        assert server.poll() is None, log.read_text()
        try:
            get("/name")
        except urllib3.exceptions.HTTPError:
            return False
        return True

    try:
        helpers.wait_for(ready, 60, "gunicorn to answer")
        calls = 90
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: get("/work").data.decode(), range(calls)))
        callers = {int(answer.split()[0]) for answer in answers}
        scrapes: dict[int, str] = {}
        deadline = time.monotonic() + 30
        while len(scrapes) < 2 and time.monotonic() < deadline:
            answer = get("/metrics")
            scrapes[int(answer.headers["X-Worker"])] = answer.data.decode()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        http.clear()
    assert len(callers) >= 2, callers  # the calls were spread over several workers
    assert len(scrapes) >= 2, scrapes  # and several workers answered /metrics
    for text in scrapes.values():
        assert total(text, "dispatcher_backend_requests_total") == calls
        assert set(per_backend(text, "dispatcher_backend_requests_total", "app")) == {
            b.addr for b in backends
        }
        assert total(text, "dispatcher_backend_in_flight") == 0
        assert total(text, "dispatcher_workers") == len(callers)
