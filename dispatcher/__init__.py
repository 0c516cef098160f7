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
from .strategies import STRATEGIES, Strategy

__all__ = [
    "STRATEGIES",
    "Backend",
    "BackendError",
    "BackendStats",
    "Balancer",
    "CapacityExceeded",
    "DispatcherError",
    "DuplicateBackend",
    "HttpBackend",
    "HttpRequest",
    "HttpResponse",
    "InvalidAddress",
    "NoBackendAvailable",
    "SegmentError",
    "Strategy",
    "UnknownBackend",
    "View",
    "WorkerDied",
    "WorkerPool",
]
