"""Events: one log line on the ``dispatcher`` logger and one call of ``on_event`` each, for
the whole server, never with the shared lock held."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from dispatcher import Balancer, Event, HealthCheck, _segment
from dispatcher import _layout as L
from tests import helpers
from tests.helpers import Echo, wait_for

A, B, C = "127.0.0.1:7601", "127.0.0.1:7602", "127.0.0.1:7603"

lock_holders: list[int] = []
"""What `check_the_lock` saw of the lock's holder word when it was called."""


def check_the_lock(event: Event) -> None:
    """An ``on_event`` that records the lock holder word at the moment it is called."""
    helpers.record_event(event)
    lock_holders.append(int(_segment._open[event.balancer].state.words[L.H_LOCK_PID]))


def test_membership_changes_are_logged_and_called_back_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    helpers.events_seen.clear()
    lock_holders.clear()
    caplog.set_level(logging.INFO, logger="dispatcher")
    with Balancer([A], backend_factory=Echo, monitor=False, on_event=check_the_lock) as owner:
        owner.register(B, weight=3)
        owner.invoke(None)
        with helpers.as_another_process(owner):
            attached = Balancer.attach(owner.name, backend_factory=Echo)
            attached.drain(B)  # attached: loads the callback from the segment
            attached.register(C)
            attached.unregister(C)
            attached.close()
    seen = [(e.kind, e.backend) for e in helpers.events_seen]
    assert seen == [
        ("registered", A),
        ("registered", B),
        ("draining", B),
        ("registered", C),
        ("unregistered", C),
    ]
    assert lock_holders == [0] * len(seen)  # the lock was free at every call
    records = [r for r in caplog.records if r.name == "dispatcher"]
    lines = [r for r in records if hasattr(r, "dispatcher_event")]
    assert [r.getMessage() for r in lines] == [str(e) for e in helpers.events_seen]
    assert all(r.dispatcher_event in helpers.events_seen for r in lines)  # type: ignore[attr-defined]
    others = [r.getMessage() for r in records if r not in lines]
    assert others == [f"balancer {owner.name} created, owned by process {os.getpid()}"]
    assert f"{owner.name}: {B} registered: weight 3" in caplog.text
    assert {e.balancer for e in helpers.events_seen} == {owner.name}


def failing_callback(event: Event) -> None:
    raise RuntimeError("the user's callback broke")


def test_a_callback_that_raises_is_logged_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Balancer([A], backend_factory=Echo, monitor=False, on_event=failing_callback) as b:
        b.register(B)
        assert {s.addr for s in b.snapshot()} == {A, B}
    assert "the on_event callback raised on registered" in caplog.text


def test_a_callback_others_cannot_load_is_refused() -> None:
    for wrong in (lambda event: None, 42):
        with pytest.raises(TypeError, match="on_event"):
            Balancer([A], backend_factory=Echo, monitor=False, on_event=wrong)  # type: ignore[arg-type]
    seen = []
    with Balancer([A], backend_factory=Echo, shared=False, on_event=seen.append) as local:
        local.register(B)  # a balancer of one process may use any callable
    assert [e.kind for e in seen] == ["registered", "registered"]


@pytest.mark.monitor
def test_the_monitor_reports_ejection_return_and_reaping_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = str(tmp_path / "events")
    monkeypatch.setenv("DISPATCHER_TEST_EVENTS", events)
    ctx = multiprocessing.get_context("fork")
    with Balancer(
        [A, B],
        backend_factory=Echo,
        strategy="round_robin",
        failure_threshold=3,
        ejection_seconds=1.0,
        on_event=helpers.record_event,
    ) as balancer:
        # Two processes fail: whichever ends the third failure in a row on a backend ejects
        # it; the other backend is the last one and stays (50% at most are ejected).
        workers = [ctx.Process(target=helpers.fail_many, args=(balancer, 6)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
            assert worker.exitcode == 0
        wait_for(lambda: any(e["kind"] == "returned" for e in helpers.read_events(events)), 30)
        # A worker killed mid-call: its call is reclaimed, and that is reported once.
        gate = ctx.Event()
        holder = ctx.Process(target=helpers.hold_one_call, args=(balancer, gate))
        holder.start()
        wait_for(lambda: helpers.in_flight(balancer) == 1)
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
        holder.join()
        wait_for(lambda: any(e["kind"] == "reaped" for e in helpers.read_events(events)), 30)
        times = {s.addr: s.times_ejected for s in balancer.snapshot()}
        monitor_pid = int(balancer._state.words[L.H_MONITOR_PID])
    seen = [e for e in helpers.read_events(events) if e["kind"] != "registered"]
    assert sorted(times.values()) == [0, 1]
    (out,) = [addr for addr, count in times.items() if count]
    ejected = [e for e in seen if e["kind"] == "ejected"]
    assert [e["backend"] for e in ejected] == [out]
    assert ejected[0]["reason"].startswith("3 failures in a row; out for")
    assert ejected[0]["duration"] == 1.0  # the first ejection: ejection_seconds
    returned = [e for e in seen if e["kind"] == "returned"]
    assert [e["backend"] for e in returned] == [out]
    assert returned[0]["reason"].endswith("it ran its course")
    assert returned[0]["duration"] >= 0.9  # the ejection lasted its second (less rounding)
    reaped = [e for e in seen if e["kind"] == "reaped"]
    assert [(e["worker"], e["backend"]) for e in reaped] == [(holder.pid, "")]
    assert reaped[0]["reason"].startswith("it died with 1 call(s) in flight, now taken off")
    assert {e["pid"] for e in seen} == {monitor_pid}
    assert len(seen) == 3


@pytest.mark.monitor
def test_the_monitor_reports_health_verdicts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events, failing = str(tmp_path / "events"), tmp_path / "failing"
    failing.write_text(A)
    monkeypatch.setenv("DISPATCHER_TEST_EVENTS", events)
    monkeypatch.setenv("DISPATCHER_TEST_FAILING_FILE", str(failing))
    check = HealthCheck(check=helpers.probe_env, interval=0.1, rise=2, fall=2)
    with Balancer([A, B], backend_factory=Echo, health_check=check, on_event=helpers.record_event):
        wait_for(lambda: any(e["kind"] == "down" for e in helpers.read_events(events)), 30)
        failing.write_text("")
        wait_for(lambda: any(e["kind"] == "up" for e in helpers.read_events(events)), 30)
    verdicts = [e for e in helpers.read_events(events) if e["kind"] in ("down", "up")]
    assert [(e["kind"], e["backend"]) for e in verdicts] == [("down", A), ("up", A)]
    assert verdicts[0]["reason"].startswith("2 health checks failed in a row")
    assert verdicts[1]["reason"].startswith("2 health checks passed in a row (it was down")
    assert verdicts[1]["duration"] > 0
