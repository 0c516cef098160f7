"""A short run of ``scripts/soak.py``, so every CI run kills backends and workers mid-call."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


def test_a_short_soak_loses_nothing() -> None:
    args = ["--calls", "8000", "--processes", "3", "--threads", "3", "--seed", "11"]
    args += ["--backend-kills", "3", "--worker-kills", "4"]
    run = subprocess.run(
        [sys.executable, str(SOAK), *args], check=False, capture_output=True, text=True, timeout=120
    )
    report = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.returncode == 0, report
    assert "nothing lost" in run.stdout and "MISMATCH" not in run.stdout, report
    faults = re.search(r"(\d+) backend kills / (\d+) restarts, (\d+) worker kills", run.stdout)
    assert faults is not None, report
    kills, restarts, worker_kills = map(int, faults.groups())
    assert kills == restarts >= 1 and worker_kills == 4, report
