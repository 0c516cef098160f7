"""Service discovery against the real things: a real etcd on loopback, DNS, forked workers."""

from __future__ import annotations

import base64
import json
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from dispatcher import Balancer, NoBackendAvailable
from dispatcher.discovery import (
    Discovery,
    DnsRecord,
    DnsResolver,
    EtcdResolver,
    Resolver,
    StaticResolver,
    Stop,
    parse_etcd_value,
    reconcile,
)
from tests.helpers import (
    Echo,
    free_port,
    localhost_lookup,
    requests_by_addr,
    run_discovery,
    send_load,
    wait_for,
)

ETCD = shutil.which("etcd")
needs_etcd = pytest.mark.skipif(
    ETCD is None,
    reason="the etcd binary is missing: apt-get install -y --no-install-recommends etcd-server",
)
fork = multiprocessing.get_context("fork")
LOGGER = "dispatcher.discovery"


def members(balancer: Balancer) -> dict[str, int]:
    """Addresses in rotation (not draining) and their weights."""
    return {s.addr: s.weight for s in balancer.snapshot() if not s.draining}


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and text in r.getMessage()
    ]


class EtcdServer:
    """One etcd member on loopback with its own data folder; killable and restartable."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.http = urllib3.PoolManager(retries=False, timeout=5.0)

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        assert ETCD is not None
        with open(self.folder / "etcd.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    ETCD,
                    "--name=test",
                    f"--data-dir={self.folder / 'data'}",
                    f"--listen-client-urls={self.url}",
                    f"--advertise-client-urls={self.url}",
                    f"--listen-peer-urls={peer}",
                    f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=test={peer}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, what="etcd to answer")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.folder / "etcd.log").read_text()[-2000:]
            pytest.fail(f"etcd exited with {self.process.returncode}:\n{log}")
        try:
            return self.call("/v3/kv/range", {"key": _b64("/")}).get("header") is not None
        except (urllib3.exceptions.HTTPError, ValueError):
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.http.clear()

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.request("POST", self.url + path, body=json.dumps(body).encode())
        assert response.status == 200, response.data
        result: dict[str, Any] = json.loads(response.data)
        return result

    def put(self, key: str, value: str) -> int:
        answer = self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(answer["header"]["revision"])

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": _b64(key)})


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# reconcile ----------------------------------------------------------------------------------


def test_reconcile_registers_drains_revives_and_keeps_live_weights() -> None:
    with Balancer(["10.0.0.2:80"], backend_factory=Echo, shared=False) as balancer:
        gate = threading.Event()
        held = threading.Thread(target=balancer.invoke, args=(gate,))
        held.start()
        wait_for(lambda: balancer.snapshot()[0].in_flight == 1, what="the held call")

        changes = reconcile(balancer, {"10.0.0.1:80": 2})
        assert (changes.added, changes.drained) == (("10.0.0.1:80",), ("10.0.0.2:80",))
        assert members(balancer) == {"10.0.0.1:80": 2}
        assert {balancer.invoke(None) for _ in range(4)} == {"10.0.0.1:80"}

        changes = reconcile(balancer, {"10.0.0.1:80": 2, "10.0.0.2:80": 3})
        assert changes.added == ("10.0.0.2:80",)
        assert members(balancer) == {"10.0.0.1:80": 2, "10.0.0.2:80": 3}

        changes = reconcile(balancer, {"10.0.0.1:80": 5, "10.0.0.2:80": 3})
        assert changes.reweighted == ("10.0.0.1:80",)
        assert not (changes.added or changes.drained)
        assert members(balancer) == {"10.0.0.1:80": 5, "10.0.0.2:80": 3}
        changes = reconcile(balancer, {"10.0.0.1:80": 2, "10.0.0.2:80": 3})
        assert (changes.added, changes.drained, changes.reweighted) == ((), (), ("10.0.0.1:80",))

        assert reconcile(balancer, {"10.0.0.1:80": 2}).drained == ("10.0.0.2:80",)
        gate.set()
        held.join(30)
        assert [s.addr for s in balancer.snapshot()] == ["10.0.0.1:80"]

        assert reconcile(balancer, {}).drained == ("10.0.0.1:80",)
        assert balancer.snapshot() == []
        with pytest.raises(NoBackendAvailable):
            balancer.invoke(None)


def test_reconcile_reports_what_does_not_fit() -> None:
    with Balancer(backend_factory=Echo, shared=False, capacity=1, monitor=False) as balancer:
        changes = reconcile(balancer, {"10.0.0.1:80": 1, "10.0.0.2:80": 1})
        assert changes.added == ("10.0.0.1:80",)
        assert changes.failed == ("10.0.0.2:80",)


# static and DNS -----------------------------------------------------------------------------


def test_static_resolver_canonicalizes_and_validates() -> None:
    assert StaticResolver(["LocalHost:80", "[0:0::1]:81"]).resolve() == {
        "localhost:80": 1,
        "[::1]:81": 1,
    }
    assert StaticResolver({"10.0.0.1:80": 3}).resolve() == {"10.0.0.1:80": 3}
    with pytest.raises(ValueError, match="weight"):
        StaticResolver({"10.0.0.1:80": 0})
    with pytest.raises(TypeError):
        StaticResolver("10.0.0.1:80")


def test_dns_default_resolver_answers_localhost() -> None:
    answer = DnsResolver("localhost", 8080).resolve()
    assert answer
    assert set(answer) <= {"127.0.0.1:8080", "[::1]:8080"}
    assert set(answer.values()) == {1}


def test_dns_srv_uses_the_best_priority_its_weights_and_the_shortest_ttl() -> None:
    def lookup(name: str, rdtype: str) -> list[DnsRecord]:
        assert (name, rdtype) == ("_http._tcp.web.service.consul", "SRV")
        return [
            DnsRecord("A.example.", 8080, weight=5, priority=10, ttl=20),
            DnsRecord("b.example", 9090, weight=0, priority=10, ttl=7),
            DnsRecord("2001:db8::1", 80, weight=9, priority=10),
            DnsRecord("backup.example", 8080, weight=100, priority=20, ttl=1),
        ]

    resolver = DnsResolver("_http._tcp.web.service.consul", srv=True, resolver=lookup)
    answer, delay = resolver._poll()
    assert answer == {"a.example:8080": 5, "b.example:9090": 1, "[2001:db8::1]:80": 9}
    assert delay == 7
    with pytest.raises(ValueError, match="resolver="):
        DnsResolver("_http._tcp.web", srv=True)


class ScriptedDns:
    """A DNS lookup whose answer the test sets; "fail" raises as a resolver timeout would."""

    def __init__(self, hosts: list[str]) -> None:
        self.hosts: list[str] | str = hosts
        self.calls = 0

    def __call__(self, name: str, rdtype: str) -> list[DnsRecord]:
        self.calls += 1
        if self.hosts == "fail":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [DnsRecord(host) for host in self.hosts]


def test_dns_resolver_error_keeps_the_last_list_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    dns = ScriptedDns(["10.0.0.1", "10.0.0.2"])
    resolver = DnsResolver("web.internal", 8080, interval=0.02, resolver=dns)
    with (
        Balancer(backend_factory=Echo, shared=False) as balancer,
        Discovery(balancer, resolver),
    ):
        wanted = {"10.0.0.1:8080": 1, "10.0.0.2:8080": 1}
        wait_for(lambda: members(balancer) == wanted, what="the first answer")

        dns.hosts = "fail"
        calls = dns.calls
        wait_for(lambda: dns.calls >= calls + 5, what="five failed lookups")
        assert members(balancer) == wanted
        kept = warnings(caplog, "keeping the last good list (2 instances)")
        assert len(kept) == 1, caplog.text
        assert "gaierror" in kept[0]

        dns.hosts = ["10.0.0.2"]
        wait_for(lambda: members(balancer) == {"10.0.0.2:8080": 1}, what="the next good answer")
        assert "answers again" in caplog.text

        dns.hosts = []
        wait_for(lambda: balancer.snapshot() == [], what="an empty answer to drain everything")
        assert warnings(caplog, "lists no instances")


def test_a_live_weight_change_is_applied_in_place() -> None:
    records = [DnsRecord("10.0.0.1", 80, weight=2)]

    def lookup(name: str, rdtype: str) -> list[DnsRecord]:
        return records

    resolver = DnsResolver("_web._tcp.internal", srv=True, resolver=lookup, interval=0.02)
    with Balancer(backend_factory=Echo, shared=False) as balancer, Discovery(balancer, resolver):
        wait_for(lambda: members(balancer) == {"10.0.0.1:80": 2}, what="the first answer")
        balancer.invoke(None)
        records = [DnsRecord("10.0.0.1", 80, weight=7)]
        wait_for(lambda: members(balancer) == {"10.0.0.1:80": 7}, what="the new weight")
        (stats,) = balancer.snapshot()
        assert (stats.requests, stats.draining) == (1, False)


def test_discovery_runs_in_a_forked_monitor_process() -> None:
    with Balancer(backend_factory=Echo, monitor=False) as balancer:
        stop = fork.Event()
        monitor = fork.Process(
            target=run_discovery, args=(balancer, StaticResolver({"10.0.0.7:80": 4}), stop)
        )
        monitor.start()
        try:
            wait_for(lambda: members(balancer) == {"10.0.0.7:80": 4}, what="the monitor's register")
            assert balancer.invoke(None) == "10.0.0.7:80"
        finally:
            stop.set()
            monitor.join(30)
        assert monitor.exitcode == 0


def test_resolvers_pickle() -> None:
    for resolver in (
        StaticResolver(["10.0.0.1:80"]),
        DnsResolver("localhost", 80, interval=5),
        DnsResolver("_x._tcp.example", srv=True, resolver=localhost_lookup),
        EtcdResolver("http://127.0.0.1:2379,http://127.0.0.2:2379", "web"),
    ):
        assert isinstance(resolver, Resolver)
        copy = pickle.loads(pickle.dumps(resolver))
        assert repr(copy) == repr(resolver)
    copy = pickle.loads(pickle.dumps(DnsResolver("x", srv=True, resolver=localhost_lookup)))
    assert copy.resolve() == {"127.0.0.1:80": 1}


# etcd ---------------------------------------------------------------------------------------


def test_etcd_values_in_every_accepted_form() -> None:
    assert parse_etcd_value(b'{"addr": "10.0.0.1:80", "weight": 2}') == ("10.0.0.1:80", 2)
    assert parse_etcd_value(b'{"Addr": "Web-1:80", "Metadata": null}') == ("web-1:80", 1)
    assert parse_etcd_value(b"10.0.0.1:80\n") == ("10.0.0.1:80", 1)
    assert parse_etcd_value(b'"10.0.0.1:80"') == ("10.0.0.1:80", 1)
    assert parse_etcd_value(b'{"addr": "10.0.0.1:80", "weight": 0}') == ("10.0.0.1:80", 0)
    for bad in (b"[1, 2]", b'{"weight": 1}', b'{"addr": "x:1", "weight": "2"}', b"no port"):
        with pytest.raises(ValueError):
            parse_etcd_value(bad)


def test_etcd_unreachable_is_an_error_not_an_empty_list(caplog: pytest.LogCaptureFixture) -> None:
    resolver = EtcdResolver(f"http://127.0.0.1:{free_port()}", "web", timeout=1)
    with Balancer(["10.0.0.1:80"], backend_factory=Echo, shared=False) as balancer:
        discovery = Discovery(balancer, resolver).start()
        try:
            wait_for(lambda: discovery.failing, what="the connection to fail")
        finally:
            discovery.stop()
        assert members(balancer) == {"10.0.0.1:80": 1}
        assert discovery.desired is None
        assert warnings(caplog, "keeping the last good list (nothing yet)")


@pytest.mark.slow
@needs_etcd
def test_etcd_lists_skips_bad_values_and_relists_after_compaction(
    etcd: EtcdServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    etcd.put("/services/web/a", '{"addr": "10.0.0.1:80", "weight": 2}')
    etcd.put("/services/web/b", "10.0.0.2:80")
    etcd.put("/services/web/c", '{"addr": "10.0.0.3:80", "weight": 0}')
    etcd.put("/services/web/d", "not an address")
    etcd.put("/services/web0", "10.0.0.9:80")
    revision = etcd.put("/services/other/a", "10.0.0.8:80")
    resolver = EtcdResolver(etcd.url, "web")
    wanted = {"10.0.0.1:80": 2, "10.0.0.2:80": 1}
    assert resolver.resolve() == wanted
    assert warnings(caplog, "ignoring key '/services/web/d'")

    etcd.call("/v3/kv/compaction", {"revision": str(revision)})
    real_list = resolver._list
    lists = []

    def stale_list(*args: Any) -> Any:
        """The first listing claims an old revision, so the watch asks for compacted history."""
        registry = real_list(*args)
        if not lists:
            registry.revision = 1
        lists.append(registry)
        return registry

    monkeypatch.setattr(resolver, "_list", stale_list)
    stop = Stop()
    timer = threading.Timer(30, stop.set)
    timer.start()
    try:
        answers = resolver.watch(stop)
        assert next(answers) == wanted
        assert next(answers) == wanted  # listed again after the watch was refused
        etcd.delete("/services/web/b")
        assert next(answers) == {"10.0.0.1:80": 2}  # and watching from there
    finally:
        stop.set()
        timer.cancel()
    assert len(lists) == 2
    assert "compacted" in caplog.text


@pytest.mark.slow
@needs_etcd
def test_etcd_membership_follows_the_registry_under_load_through_an_etcd_restart(
    etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    etcd.put("/services/web/1", '{"addr": "10.0.0.1:8001", "weight": 1}')
    etcd.put("/services/web/2", "10.0.0.2:8002")
    with Balancer(backend_factory=Echo, capacity=8, monitor=False) as balancer:
        discovery = Discovery(balancer, EtcdResolver(etcd.url, "web", max_backoff=0.5))
        stop = fork.Event()
        out = fork.Queue()
        workers = []
        try:
            discovery.start()
            wait_for(
                lambda: members(balancer) == {"10.0.0.1:8001": 1, "10.0.0.2:8002": 1},
                what="the first listing",
            )
            workers = [
                fork.Process(target=send_load, args=(balancer, stop, out, 50)) for _ in range(2)
            ]
            for worker in workers:
                worker.start()

            etcd.put("/services/web/3", '{"addr": "10.0.0.3:8003", "weight": 2}')
            wait_for(
                lambda: requests_by_addr(balancer).get("10.0.0.3:8003", 0) > 0,
                what="picks of a 3rd",
            )
            etcd.delete("/services/web/1")
            wait_for(
                lambda: "10.0.0.1:8001" not in requests_by_addr(balancer),
                what="1 drained and freed",
            )

            etcd.kill()
            wait_for(lambda: discovery.failing, what="discovery to notice etcd is gone")
            before = requests_by_addr(balancer)
            wait_for(
                lambda: all(requests_by_addr(balancer)[a] > before[a] for a in before),
                what="workers to keep using the kept list while etcd is down",
            )
            assert members(balancer) == {"10.0.0.2:8002": 1, "10.0.0.3:8003": 2}

            etcd.start()
            etcd.put("/services/web/4", "10.0.0.4:8004")
            wait_for(
                lambda: requests_by_addr(balancer).get("10.0.0.4:8004", 0) > 0, what="a 4th after"
            )
            etcd.delete("/services/web/2")
            wait_for(
                lambda: "10.0.0.2:8002" not in requests_by_addr(balancer), what="2 drained after"
            )
            assert members(balancer) == {"10.0.0.3:8003": 2, "10.0.0.4:8004": 1}
            assert not discovery.failing
        finally:
            stop.set()
            results = [out.get(timeout=30) for _ in workers]
            for worker in workers:
                worker.join(30)
            discovery.stop()

    seen = {addr for picks, _ in results for addr in picks}
    assert seen == {"10.0.0.1:8001", "10.0.0.2:8002", "10.0.0.3:8003", "10.0.0.4:8004"}
    assert [errors for _, errors in results] == [[], []]
    assert [w.exitcode for w in workers] == [0, 0]
    assert len(warnings(caplog, "keeping the last good list (2 instances)")) == 1, caplog.text
    assert "answers again" in caplog.text
    assert not warnings(caplog, "did not stop")


@pytest.mark.slow
@needs_etcd
def test_the_demo_takes_its_backends_from_etcd(etcd: EtcdServer) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dispatcher",
            "--backends",
            "3",
            "--workers",
            "2",
            "--duration",
            "4",
            "--etcd",
            etcd.url,
            "--service",
            "shop",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    addrs = set(re.findall(r"127\.0\.0\.1:\d+", done.stdout))
    assert len(addrs) == 3, done.stdout[-3000:]
    # The demo published its backends under /services/shop/ and withdrew them on the way out.
    listed = etcd.call(
        "/v3/kv/range", {"key": _b64("/services/shop/"), "range_end": _b64("/services/shop0")}
    )
    assert "kvs" not in listed
