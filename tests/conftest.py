from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dispatcher import _segment as segment


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Every test must leave /dev/shm as it found it (other test runs may share the machine,
    so only segments this test process created count)."""
    before = set(segment.find_by_owner(os.getpid(), closed=True))
    yield
    leaked = set(segment.find_by_owner(os.getpid(), closed=True)) - before
    assert not leaked, f"segments left in /dev/shm: {leaked}"
