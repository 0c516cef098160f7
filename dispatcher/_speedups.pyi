from collections.abc import Callable
from typing import Any

def configure(
    *, decay_ns: float, stale_ns: int, failure_penalty_ns: float, buckets: int
) -> None: ...

class HotPath:
    pid: int
    own_row: int
    def __init__(
        self,
        *,
        buffer: memoryview,
        semaphore: object,
        commit: Callable[..., bool],
        finish: Callable[..., None],
        owner: object,
        header: tuple[int, int, int],
        columns: tuple[int, int, int, int, int, int, int, int],
        capacity: int,
        draining: int,
        ended: int,
        ticket: tuple[int, int, int],
    ) -> None: ...
    def commit(
        self, version: int, slot: int, cursor: int, call: list[Any], blocking: bool = ...
    ) -> bool: ...
    def finish(
        self, call: list[Any], outcome: int, blocking: bool = ..., report: object = ...
    ) -> None: ...
    def release(self) -> None: ...

class EqualScan:
    def __init__(
        self,
        *,
        lo: int,
        hi: int,
        turns: object,
    ) -> None: ...
    def pick(self, in_flight: object) -> int: ...
