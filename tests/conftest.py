from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dispatcher.segment import NAME_PREFIX


def segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(NAME_PREFIX)}


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Every test must leave /dev/shm as it found it."""
    before = segments()
    yield
    leaked = segments() - before
    assert not leaked, f"segments left in /dev/shm: {leaked}"
