from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from dispatcher import layout
from dispatcher.segment import NAME_PREFIX


def segments() -> set[str]:
    """Segments this test process created (other test runs may share the machine)."""
    mine = set()
    for name in os.listdir("/dev/shm"):
        if not name.startswith(NAME_PREFIX):
            continue
        try:
            with open(f"/dev/shm/{name}", "rb") as segment:
                header = segment.read(layout.HEADER_WORDS * layout.WORD)
        except OSError:
            continue
        if len(header) < layout.HEADER_WORDS * layout.WORD:
            continue
        words = struct.unpack_from(f"{layout.HEADER_WORDS}q", header)
        magic, owner = words[layout.H_MAGIC], words[layout.H_OWNER_PID]
        if magic == layout.MAGIC and owner == os.getpid():
            mine.add(name)
    return mine


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Every test must leave /dev/shm as it found it."""
    before = segments()
    yield
    leaked = segments() - before
    assert not leaked, f"segments left in /dev/shm: {leaked}"
