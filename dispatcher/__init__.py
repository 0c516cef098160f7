"""Client-side load balancing with one view of load shared by every worker process."""

from .backends import Backend, HttpBackend, HttpRequest, HttpResponse
from .balancer import Balancer
from .errors import (
    BackendError,
    CapacityExceeded,
    DispatcherError,
    DuplicateBackend,
    InvalidAddress,
    NoBackendAvailable,
    SegmentError,
    UnknownBackend,
)
from .pool import WorkerDied, WorkerPool
from .state import BackendStats, View
from .strategies import (
    STRATEGIES,
    ConsistentHash,
    LeastLoaded,
    PeakEwma,
    PowerOfTwo,
    Random,
    RoundRobin,
    Strategy,
    WeightedRandom,
    WeightedRoundRobin,
)

__all__ = [
    "STRATEGIES",
    "Backend",
    "BackendError",
    "BackendStats",
    "Balancer",
    "CapacityExceeded",
    "ConsistentHash",
    "DispatcherError",
    "DuplicateBackend",
    "HttpBackend",
    "HttpRequest",
    "HttpResponse",
    "InvalidAddress",
    "LeastLoaded",
    "NoBackendAvailable",
    "PeakEwma",
    "PowerOfTwo",
    "Random",
    "RoundRobin",
    "SegmentError",
    "Strategy",
    "UnknownBackend",
    "View",
    "WeightedRandom",
    "WeightedRoundRobin",
    "WorkerDied",
    "WorkerPool",
]
