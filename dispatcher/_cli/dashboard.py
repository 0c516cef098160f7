"""The live dashboard of a balancer, for the demo and for ``python -m dispatcher top``.

Three parts, so the picture can be tested without processes or a terminal:

* `Sampler` turns successive snapshots into `Frame`s: it adds what one snapshot cannot tell
  (a trend of requests per second, state changes for the event log), the calls in flight of
  each worker (its row of the segment) and each worker's CPU and memory from `psutil`.
* `render(frame)` is a pure function from a `Frame` to a `rich` renderable that fits 80
  columns: long addresses lose their middle, never the state column.
* `Screen` shows frames: a full-screen `rich.live.Live` view on a terminal, a plain line every
  few seconds otherwise (CI, a pipe), where a redrawn screen would only be noise. Full screen,
  because other processes write to the same terminal (the balancer's monitor logs to stderr):
  a view redrawn in place would be pushed down by each of their lines.

Rates, error shares and percentiles are those of the snapshot's recent window (about the
last 10 s, `BackendStats.window`): a lifetime p99 barely moves on a long-running server.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import psutil
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .. import _layout as L
from .._segment import Segment
from .._view import BackendStats

HEALTHY, WARMING, EJECTED, DOWN, DRAINING = "healthy", "warming", "ejected", "down", "draining"
_STYLES = {HEALTHY: "green", WARMING: "yellow", EJECTED: "bold red", DOWN: "red", DRAINING: "blue"}
LEGEND = (
    ("warming N%", WARMING, "slow start: N% of its weight"),
    ("down", DOWN, "failing health checks"),
    ("ejected Ns", EJECTED, "failed in a row, N s left"),
    ("draining", DRAINING, "no new calls, finishing"),
)
LOG_LINES = 5
BACKEND_WIDTH = 19
"""The backend column's width: a longer name loses its middle (the port stays)."""
WORKER_COLUMNS = 6
"""Backends shown one by one in the per-worker view; the rest are summed in "other"."""
TREND_POINTS = 8
TREND_STEP_S = 2.0
"""The trend column: requests per second per step of 2 s, over the last 16 s."""
_SPARKS = " ▁▂▃▄▅▆▇█"
_BLOCKS = " ▏▎▍▌▋▊▉█"


@dataclass(frozen=True)
class WorkerInfo:
    """One process that picks through the balancer: its row of the segment, and psutil's
    view of it."""

    pid: int
    cpu_percent: float
    rss: int
    """Resident memory in bytes."""
    in_flight: Mapping[int, int] = field(default_factory=dict)
    """Its calls under way, by slot (`BackendStats.slot`); slots at 0 are left out."""
    retries: int = 0


@dataclass(frozen=True)
class WorkerRow:
    """What a worker's row of the segment holds: its pid and its own in-flight counts."""

    pid: int
    in_flight: Mapping[int, int]
    retries: int


def worker_rows(segment: Segment) -> list[WorkerRow]:
    """Every claimed worker row, read without the lock (each count at most one call old).

    The per-worker view no per-process balancer can give: which process has which calls
    under way on which backend.
    """
    state = segment.state
    words, c = state.words, state.layout.capacity
    rows = []
    for row, pid, _ in state.rows():
        base = state.row_base(row)
        counts = words[base : base + c].tolist()
        retries = int(words[base - L.W_HEADER + L.W_RETRIES])
        rows.append(
            WorkerRow(pid, {slot: n for slot, n in enumerate(counts) if n > 0}, max(retries, 0))
        )
    return rows


@dataclass(frozen=True)
class Frame:
    """Everything one picture of the dashboard shows."""

    title: str
    source: str
    """The balancer's segment name (and its owner, for `top`)."""
    strategy: str
    now: float
    """`time.monotonic()` when the snapshot was taken (ejections end on that clock)."""
    elapsed: float
    backends: tuple[BackendStats, ...]
    trends: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    """Requests per second by address, one point per `TREND_STEP_S`, oldest first."""
    workers: tuple[WorkerInfo, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    """A short name for some addresses, e.g. the demo's "b2"."""
    event: str = ""
    """Where the demo's timeline is: the step now and the next one."""
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
    state = text = backend_state(stats)
    if state == EJECTED and stats.ejected_until is not None:
        text += f" {max(stats.ejected_until - now, 0.0):.0f}s"
    elif state == WARMING:
        text += f" {stats.effective_weight / stats.weight:.0%}"
    return Text(text, style=_STYLES[state])


def seconds_text(seconds: float | None) -> str:
    """A latency in at most 5 characters: 840µs, 5.2ms, 168ms, 1.2s, 12s; "-" for None."""
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 0.0095:
        return f"{seconds * 1e3:.1f}ms"
    if seconds < 0.9995:
        return f"{seconds * 1e3:.0f}ms"
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    return f"{seconds:.0f}s"


def middle_cut(text: str, width: int) -> str:
    """`text` in at most `width` characters: the middle gives way to "…", the end stays."""
    if len(text) <= width:
        return text
    tail = (width - 1) // 2 + 1
    return text[: width - 1 - tail] + "…" + text[-tail:]


def sparkline(points: Sequence[float], top: float) -> str:
    """One character per point, scaled to `top`; a blank is zero."""
    if top <= 0:
        return " " * len(points)
    last = len(_SPARKS) - 1
    return "".join(_SPARKS[min(last, round(p / top * last))] if p > 0 else " " for p in points)


def bar(value: float, top: float, width: int) -> str:
    """A horizontal bar of `width` cells, in eighths of a cell."""
    if top <= 0 or value <= 0:
        return " " * width
    eighths = min(round(value / top * width * 8), width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (_BLOCKS[part] if part else "")).ljust(width)


def _handle(frame: Frame, stats: BackendStats) -> str:
    """A short name: the label, or "#slot"."""
    return frame.labels.get(stats.addr) or f"#{stats.slot}"


def _rate(stats: BackendStats) -> str:
    return "-" if stats.rate is None else f"{stats.rate:.0f}"


def _errors(stats: BackendStats) -> Text:
    ratio = stats.error_ratio
    if ratio is None:
        return Text("-", style="dim")
    shown = f"{ratio:.0%}" if ratio >= 0.095 or ratio == 0 else f"{ratio:.1%}"
    return Text(shown, style="red" if ratio >= 0.05 else "")


def render(frame: Frame) -> RenderableType:
    """The dashboard for `frame`, within 80 columns: header, backends, legend, in flight per
    worker, events."""
    # Spaces end a styled run rather than start one: some SVG renderers drop leading ones.
    header = Text.assemble(
        (frame.title + " ", "bold"),
        f"· {frame.source} · ",
        ((frame.strategy or "custom") + " ", "bold cyan"),
        f"· {frame.elapsed:.0f} s",
    )
    if frame.event:
        header.append("\n" + frame.event, style="bold magenta")
    if frame.totals:
        header.append("\n" + frame.totals, style="dim")
    window = next((b.window for b in frame.backends if b.window), None)
    span = f"rates and latency over the last {window:.0f} s" if window else "since start"
    parts: list[RenderableType] = [
        header,
        Text(f"\nbackends ({span})", style="bold"),
        _backends(frame),
        _legend(),
        Text("\nin flight per worker: each process's row of the shared segment", style="bold"),
        _workers(frame),
    ]
    if frame.log:
        parts.append(Text("\nevents", style="bold"))
        parts.extend(
            Text(line, no_wrap=True, overflow="ellipsis") for line in frame.log[-LOG_LINES:]
        )
    return Group(*parts)


def _table() -> Table:
    return Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, header_style="dim")


def _backends(frame: Frame) -> Table:
    table = _table()
    table.add_column("backend", no_wrap=True, width=BACKEND_WIDTH)
    table.add_column("state", no_wrap=True, width=11)
    table.add_column("in flight", no_wrap=True, width=9)
    table.add_column("req/s", justify="right", no_wrap=True, width=5)
    table.add_column(f"{TREND_POINTS * TREND_STEP_S:.0f} s", no_wrap=True, width=TREND_POINTS)
    table.add_column("err", justify="right", no_wrap=True, width=4)
    for column in ("p50", "p90", "p99"):
        table.add_column(column, justify="right", no_wrap=True, width=5)
    in_flight_top = max([4, *(b.in_flight for b in frame.backends)])
    trend_top = max([0.0, *(p for t in frame.trends.values() for p in t)])
    for b in frame.backends:
        handle = middle_cut(_handle(frame, b), 8)
        name = f"{handle} {middle_cut(b.addr, BACKEND_WIDTH - len(handle) - 1)}"
        trend = frame.trends.get(b.addr, ())
        table.add_row(
            name,
            _state_text(b, frame.now),
            Text.assemble((bar(b.in_flight, in_flight_top, 5), "cyan"), f"{b.in_flight:>4}"),
            _rate(b),
            Text(sparkline(trend, trend_top).rjust(TREND_POINTS), style="cyan"),
            _errors(b),
            seconds_text(b.p50),
            seconds_text(b.p90),
            seconds_text(b.p99),
        )
    if not frame.backends:
        table.add_row("(none registered)")
    return table


def _legend() -> Table:
    legend = Table.grid(padding=(0, 1))
    for _ in range(4):
        legend.add_column(no_wrap=True)
    for i in range(0, len(LEGEND), 2):
        cells: list[Text] = []
        for name, state, meaning in LEGEND[i : i + 2]:
            cells += [Text(name, style=_STYLES[state]), Text(meaning + "  ", style="dim")]
        legend.add_row(*cells)
    return legend


def _workers(frame: Frame) -> Table:
    table = Table(box=None, padding=(0, 2, 0, 0), pad_edge=False, header_style="dim")
    table.add_column("pid", justify="right", no_wrap=True)
    table.add_column("CPU", justify="right", no_wrap=True)
    table.add_column("RSS", justify="right", no_wrap=True)
    shown = frame.backends[:WORKER_COLUMNS]
    for b in shown:
        table.add_column(middle_cut(_handle(frame, b), 5), justify="right", no_wrap=True)
    hidden = {b.slot for b in frame.backends[WORKER_COLUMNS:]}
    if hidden:
        table.add_column("other", justify="right", no_wrap=True)
    table.add_column("all", justify="right", no_wrap=True)
    for w in frame.workers:
        cells: list[Text | str] = [str(w.pid), f"{w.cpu_percent:.0f}%", f"{w.rss / 2**20:.0f}M"]
        for b in shown:
            count = w.in_flight.get(b.slot, 0)
            cells.append(Text(str(count), style="cyan") if count else Text("·", style="dim"))
        if hidden:
            cells.append(str(sum(n for s, n in w.in_flight.items() if s in hidden)))
        cells.append(Text(str(sum(w.in_flight.values())), style="bold"))
        table.add_row(*cells)
    if not frame.workers:
        table.add_row("(none yet)")
    return table


def summary(frame: Frame) -> Table:
    """Every backend with its totals since it was registered: what the demo prints at the
    end (the percentiles are the last window's)."""
    table = Table(title="summary", title_justify="left")
    for column in ("backend", "state", "requests", "errors", "ejections", "p50", "p99"):
        table.add_column(column, justify="left" if column in ("backend", "state") else "right")
    for b in frame.backends:
        table.add_row(
            f"{_handle(frame, b)} {b.addr}",
            backend_state(b),
            str(b.requests),
            str(b.failures),
            str(b.times_ejected),
            seconds_text(b.p50),
            seconds_text(b.p99),
        )
    return table


def plain_line(frame: Frame) -> str:
    """One line per frame for a log or a CI job, where a redrawn screen makes no sense."""
    parts = [
        f"{_handle(frame, b)} {b.addr} {backend_state(b)} {_rate(b)}/s "
        f"req={b.requests} err={b.failures} p99={seconds_text(b.p99)}"
        for b in frame.backends
    ]
    event = f" | {frame.event}" if frame.event else ""
    return f"[{frame.elapsed:5.1f}s] {frame.strategy}{event} | " + " | ".join(parts)


class Sampler:
    """Makes frames from successive snapshots; keeps the history that trends and the log need.

    `snapshot` gives the backends' numbers (`Segment.snapshot`, whose recent window lives in
    this process), `rows` the worker rows (`worker_rows`).
    """

    def __init__(
        self,
        snapshot: Callable[[], Sequence[BackendStats]],
        rows: Callable[[], Iterable[WorkerRow]],
        *,
        title: str,
        source: str,
        strategy: str,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._rows = rows
        self._title, self._source, self._strategy = title, source, strategy
        self._labels = dict(labels or {})
        self._start = time.monotonic()
        self._steps: deque[tuple[float, dict[str, int]]] = deque(maxlen=TREND_POINTS + 1)
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
        self._log_changes(backends)
        return Frame(
            title=self._title,
            source=self._source,
            strategy=self._strategy,
            now=now,
            elapsed=now - self._start,
            backends=backends,
            trends=self._trends(now, backends),
            workers=self._workers(),
            labels=self._labels,
            event=event,
            log=tuple(self._log),
            totals=totals,
        )

    def _trends(self, now: float, backends: Sequence[BackendStats]) -> dict[str, tuple[float, ...]]:
        """Requests per second of each step of `TREND_STEP_S`, from the requests counters."""
        steps = self._steps
        if not steps or now - steps[-1][0] >= TREND_STEP_S:
            steps.append((now, {b.addr: b.requests for b in backends}))
        trends: dict[str, tuple[float, ...]] = {}
        for b in backends:
            points = []
            for (then, before), (later, after) in zip(steps, list(steps)[1:], strict=False):
                done = after.get(b.addr, 0) - before.get(b.addr, after.get(b.addr, 0))
                points.append(max(done, 0) / max(later - then, 1e-9))
            trends[b.addr] = tuple(points[-TREND_POINTS:])
        return trends

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
        for row in self._rows():
            process = self._processes.get(row.pid)
            try:
                if process is None:
                    process = psutil.Process(row.pid)
                    process.cpu_percent(None)
                cpu = process.cpu_percent(None)
                rss = process.memory_info().rss
            except psutil.Error:
                continue
            processes[row.pid] = process
            infos.append(WorkerInfo(row.pid, cpu, rss, row.in_flight, row.retries))
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
