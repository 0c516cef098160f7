"""The command line: ``python -m dispatcher`` runs the demo, ``... top`` watches a server."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from importlib import metadata

from rich.console import Console

from .._core import CORE
from .._strategies import STRATEGIES
from . import demo
from .top import top

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PLAIN_WIDTH = 120
"""Columns for output to a pipe or a file, where rich would assume 80 and wrap the tables."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dispatcher",
        description=(
            "Run the demo: local HTTP backends, a worker pool sending them load through one "
            "shared balancer, and a scripted slowdown, crash and restart, on a live dashboard."
        ),
        epilog="Watch a running server instead: python -m dispatcher top NAME_OR_PID",
    )
    parser.add_argument("--version", action="version", version=version())
    parser.add_argument("--backends", type=_count, default=4, help="backends (default 4)")
    parser.add_argument("--workers", type=_count, default=4, help="worker processes (default 4)")
    parser.add_argument(
        "--strategy",
        choices=sorted(STRATEGIES),
        default=demo.DEFAULT_STRATEGY,
        metavar="NAME",
        help=f"how to pick a backend: {', '.join(sorted(STRATEGIES))} "
        f"(default {demo.DEFAULT_STRATEGY})",
    )
    parser.add_argument(
        "--rate", type=_positive, default=100.0, help="requests per second (default 100)"
    )
    parser.add_argument(
        "--duration",
        type=_positive,
        metavar="SECONDS",
        help="stop after this long (default: run until Ctrl-C)",
    )
    parser.add_argument(
        "--slow-start",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="how long a backend back in rotation takes to get its full share (default 10)",
    )
    parser.add_argument("--svg", metavar="PATH", help="save the last live frame as an SVG picture")
    parser.add_argument(
        "--etcd",
        metavar="URL",
        help="publish the backends in this etcd (v3, e.g. http://127.0.0.1:2379) and take the "
        "balancer's membership from it",
    )
    parser.add_argument(
        "--service",
        default="demo",
        metavar="NAME",
        help="the etcd service name: keys under /services/NAME/ (default demo)",
    )
    commands = parser.add_subparsers(dest="command", metavar="{top}")
    top = commands.add_parser(
        "top",
        help="watch the balancer of a running server",
        description=(
            "Attach read-only to the balancer of a running server and show its live state."
        ),
    )
    top.add_argument(
        "target",
        metavar="NAME_OR_PID",
        help="the balancer's segment name (Balancer.name), or the pid of the process owning it",
    )
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument(
        "--json",
        action="store_true",
        help="print a snapshot as JSON for programs (with --interval: one per line until stopped)",
    )
    top.add_argument(
        "--interval",
        type=_positive,
        metavar="SECONDS",
        help="seconds between frames (default 0.25), or between JSON lines",
    )
    return parser


def version() -> str:
    """The installed version and the core that runs the hot path."""
    try:
        number = metadata.version("dispatcher-lb")
    except metadata.PackageNotFoundError:
        number = "(not installed)"
    return f"dispatcher {number}; core: {CORE}"


def _count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be in 1-64, not {value}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=PLAIN_WIDTH)
    with stop_on_signals() as stop:
        if args.command == "top":
            return top(
                args.target,
                console,
                stop,
                once=args.once,
                interval=args.interval,
                as_json=args.json,
            )
        options = demo.Options(
            backends=args.backends,
            workers=args.workers,
            strategy=args.strategy,
            rate=args.rate,
            duration=args.duration,
            slow_start=args.slow_start,
            svg=args.svg,
            etcd=args.etcd,
            service=args.service,
        )
        return demo.run(options, console, stop)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event that SIGINT, SIGTERM and SIGHUP set, so loops end and clean up uninterrupted.

    SIGHUP comes when the terminal goes away (a closed window, tmux kill-session): its
    default action would leave the backends, the workers and the segment behind.
    """
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
