"""The live dashboard of a balancer, for the demo and for ``python -m dispatcher top``.

Three parts, so the picture can be tested without processes or a terminal:

* `Sampler` turns successive `Balancer.snapshot()` results into `Frame`s: it adds what one
  snapshot cannot tell (requests per second, state changes for the event log) and each
  worker's CPU and memory from `psutil`.
* `render(frame)` is a pure function from a `Frame` to a `rich` renderable.
* `Screen` shows frames: a full-screen `rich.live.Live` view on a terminal, a plain line every
  few seconds otherwise (CI, a pipe), where a redrawn screen would only be noise. Full screen,
  because other processes write to the same terminal (the balancer's monitor logs to stderr):
  a view redrawn in place would be pushed down by each of their lines.

"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import psutil
from rich.bar import Bar
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .._latency import percentile_ns
from .._view import BackendStats

HEALTHY, WARMING, EJECTED, DOWN, DRAINING = "healthy", "warming", "ejected", "down", "draining"
_STYLES = {HEALTHY: "green", WARMING: "yellow", EJECTED: "bold red", DOWN: "red", DRAINING: "blue"}
LOG_LINES = 10


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    cpu_percent: float
    rss: int
    """Resident memory in bytes."""


@dataclass(frozen=True)
class Frame:
    """Everything one picture of the dashboard shows."""

    title: str
    source: str
    """The balancer's segment name."""
    strategy: str
    now: float
    """`time.monotonic()` when the snapshot was taken (ejections end on that clock)."""
    elapsed: float
    backends: tuple[BackendStats, ...]
    rates: Mapping[str, float] = field(default_factory=dict)
    """Requests per second by address, over the last few seconds."""
    workers: tuple[WorkerInfo, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    """A short name for some addresses, e.g. the demo's "b2 slow"."""
    event: str = ""
    """What the demo's timeline is doing now."""
    log: tuple[str, ...] = ()
    totals: str = ""
    """One line about the load sent, for the demo."""


def backend_state(stats: BackendStats) -> str:
    """draining, down, ejected, warming (slow start: less than its full weight) or healthy."""
    if stats.draining:
        return DRAINING
    if stats.down:
        return DOWN
    if stats.ejected:
        return EJECTED
    if stats.effective_weight < stats.weight:
        return WARMING
    return HEALTHY


def _state_text(stats: BackendStats, now: float) -> Text:
    state = backend_state(stats)
    text = Text(state, style=_STYLES[state])
    if state == EJECTED and stats.ejected_until is not None:
        text.append(f" {max(stats.ejected_until - now, 0.0):.0f}s", style="red")
    elif state == WARMING:
        text.append(f" {stats.effective_weight / stats.weight:.0%}", style="yellow")
    return text


def _latency(stats: BackendStats, fraction: float) -> str:
    ns = percentile_ns(stats.histogram, fraction)
    if ns is None:
        return "-"
    if ns < 1_000_000:
        return f"{ns / 1e6:.2f} ms"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.0f} ms"
    return f"{ns / 1e9:.1f} s"


def _name(frame: Frame, addr: str) -> str:
    label = frame.labels.get(addr)
    return f"{label} {addr}" if label else addr


def render(frame: Frame) -> RenderableType:
    """The dashboard for `frame`: a header, the backends, the workers and the event log."""
    header = Text.assemble(
        (frame.title, "bold"),
        f"  {frame.source}  strategy ",
        (frame.strategy or "custom", "bold cyan"),
        f"  {frame.elapsed:.0f}s",
    )
    if frame.event:
        header.append("\nnow: ", style="dim").append(frame.event, style="bold magenta")
    if frame.totals:
        header.append("\n" + frame.totals, style="dim")

    scale = max([4, *(b.in_flight for b in frame.backends)])
    backends = Table(title="backends", title_justify="left", expand=False)
    backends.add_column("backend", no_wrap=True)
    backends.add_column("state", no_wrap=True)
    backends.add_column("in flight", no_wrap=True)
    for column in ("req/s", "requests", "errors", "ejections", "p50", "p99"):
        backends.add_column(column, justify="right", no_wrap=True)
    for b in frame.backends:
        in_flight = Table.grid(padding=(0, 1))
        in_flight.add_row(Bar(scale, 0, b.in_flight, width=10, color="cyan"), str(b.in_flight))
        backends.add_row(
            _name(frame, b.addr),
            _state_text(b, frame.now),
            in_flight,
            f"{frame.rates.get(b.addr, 0.0):.0f}",
            str(b.requests),
            Text(str(b.failures), style="red" if b.failures else ""),
            str(b.times_ejected),
            _latency(b, 0.5),
            _latency(b, 0.99),
        )
    if not frame.backends:
        backends.add_row("(no backend registered)")

    workers = Table(title="workers", title_justify="left")
    workers.add_column("pid", justify="right")
    workers.add_column("CPU %", justify="right")
    workers.add_column("RSS", justify="right")
    for w in frame.workers:
        workers.add_row(str(w.pid), f"{w.cpu_percent:.0f}", f"{w.rss / 2**20:.0f} MiB")

    log = Table(title="events", title_justify="left", show_header=False, box=None)
    log.add_column("event")
    for line in frame.log[-LOG_LINES:]:
        log.add_row(line)
    lower = Table.grid(padding=(0, 4))
    lower.add_row(workers, log)
    return Group(header, backends, lower)


def summary(frame: Frame) -> Table:
    """Every backend with its totals: what the demo prints at the end."""
    table = Table(title="summary", title_justify="left")
    for column in ("backend", "state", "requests", "errors", "ejections", "p50", "p99"):
        table.add_column(column, justify="left" if column in ("backend", "state") else "right")
    for b in frame.backends:
        table.add_row(
            _name(frame, b.addr),
            backend_state(b),
            str(b.requests),
            str(b.failures),
            str(b.times_ejected),
            _latency(b, 0.5),
            _latency(b, 0.99),
        )
    return table


def plain_line(frame: Frame) -> str:
    """One line per frame for a log or a CI job, where a redrawn screen makes no sense."""
    parts = [
        f"{_name(frame, b.addr)} {backend_state(b)} {frame.rates.get(b.addr, 0.0):.0f}/s "
        f"req={b.requests} err={b.failures} p99={_latency(b, 0.99)}"
        for b in frame.backends
    ]
    event = f" | {frame.event}" if frame.event else ""
    return f"[{frame.elapsed:5.1f}s] {frame.strategy}{event} | " + " | ".join(parts)


class Sampler:
    """Makes frames from successive snapshots; keeps the history that rates and the log need."""

    def __init__(
        self,
        snapshot: Callable[[], Sequence[BackendStats]],
        pids: Callable[[], Iterable[int]],
        *,
        title: str,
        source: str,
        strategy: str,
        labels: Mapping[str, str] | None = None,
        window: float = 2.0,
    ) -> None:
        self._snapshot = snapshot
        self._pids = pids
        self._title, self._source, self._strategy = title, source, strategy
        self._labels = dict(labels or {})
        self._window = window
        self._start = time.monotonic()
        self._history: deque[tuple[float, dict[tuple[str, int], int]]] = deque()
        self._states: dict[str, str] = {}
        self._sampled = False
        self._log: deque[str] = deque(maxlen=LOG_LINES * 4)
        self._processes: dict[int, psutil.Process] = {}

    def note(self, text: str) -> None:
        """Add a line to the event log, stamped with the time since the sampler started."""
        self._log.append(f"{time.monotonic() - self._start:5.1f}s  {text}")

    def sample(self, *, event: str = "", totals: str = "") -> Frame:
        backends = tuple(self._snapshot())
        now = time.monotonic()
        counts = {(b.addr, b.slot): b.requests for b in backends}
        history = self._history
        history.append((now, counts))
        while len(history) > 2 and now - history[1][0] >= self._window:
            history.popleft()
        then, before = history[0]
        span = now - then
        rates = {}
        for b in backends:
            done = b.requests - before.get((b.addr, b.slot), b.requests)
            rates[b.addr] = max(done, 0) / span if span > 0 else 0.0
        self._log_changes(backends)
        return Frame(
            title=self._title,
            source=self._source,
            strategy=self._strategy,
            now=now,
            elapsed=now - self._start,
            backends=backends,
            rates=rates,
            workers=self._workers(),
            labels=self._labels,
            event=event,
            log=tuple(self._log),
            totals=totals,
        )

    def _log_changes(self, backends: Sequence[BackendStats]) -> None:
        seen = {}
        for b in backends:
            state = seen[b.addr] = backend_state(b)
            before = self._states.get(b.addr)
            if before is None and self._sampled:
                self.note(f"{self._labels.get(b.addr, b.addr)} registered, {state}")
            elif before is not None and before != state:
                self.note(f"{self._labels.get(b.addr, b.addr)} {state}")
        for addr in self._states.keys() - seen.keys():
            self.note(f"{self._labels.get(addr, addr)} unregistered")
        self._states = seen
        self._sampled = True

    def _workers(self) -> tuple[WorkerInfo, ...]:
        infos = []
        processes = {}
        for pid in self._pids():
            process = self._processes.get(pid)
            try:
                if process is None:
                    process = psutil.Process(pid)
                    process.cpu_percent(None)
                cpu = process.cpu_percent(None)
                rss = process.memory_info().rss
            except psutil.Error:
                continue
            processes[pid] = process
            infos.append(WorkerInfo(pid, cpu, rss))
        self._processes = processes
        return tuple(infos)


class Screen:
    """Shows frames live on a terminal, or as a plain line every `every` seconds otherwise."""

    def __init__(self, console: Console, *, every: float = 2.0) -> None:
        self.console = console
        self._every = every
        self._last_line = float("-inf")
        self._live: Live | None = None

    def __enter__(self) -> Screen:
        if self.console.is_terminal:
            self._live = Live(console=self.console, auto_refresh=False, screen=True)
            self._live.start()
        return self

    def show(self, frame: Frame) -> None:
        if self._live is not None:
            self._live.update(render(frame), refresh=True)
        elif time.monotonic() - self._last_line >= self._every:
            self._last_line = time.monotonic()
            self.console.print(plain_line(frame), highlight=False, soft_wrap=True)

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
