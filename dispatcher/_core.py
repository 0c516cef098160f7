"""Which core runs the hot path: the compiled `_speedups`, or the pure Python reference.

The compiled core is an optional C extension, built at install time when a C compiler is
there. It does the two lock holds of every call (`SharedState.commit` and `finish`) and
`least_loaded`'s scan, on the same words, semaphore and holder record as the Python code,
which handles every case it leaves alone and stays the reference: both leave the same bytes.
``DISPATCHER_PURE_PYTHON=1`` in the environment keeps it off; ``python -m dispatcher
--version`` says which core runs.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from ._latency import DECAY_NS, FAILURE_PENALTY_NS, STALE_NS
from ._layout import BUCKETS

PURE_PYTHON_VARIABLE = "DISPATCHER_PURE_PYTHON"


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get(PURE_PYTHON_VARIABLE, "") not in ("", "0"):
        return None, f"pure Python ({PURE_PYTHON_VARIABLE} is set)"
    try:  # by name: an optional module, which may not be built
        _speedups = importlib.import_module(f"{__package__}._speedups")
    except ImportError:
        return None, "pure Python (the compiled core is not built)"
    _speedups.configure(
        decay_ns=float(DECAY_NS),
        stale_ns=STALE_NS,
        failure_penalty_ns=float(FAILURE_PENALTY_NS),
        buckets=BUCKETS,
    )
    return _speedups, "compiled"


speedups, CORE = _load()
"""The compiled core, or None: the pure Python one runs; and which one runs, and why."""
