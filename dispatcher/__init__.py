"""Client-side load balancing with one view of load shared by every worker process."""

from .backends import Backend, HttpBackend, HttpRequest, HttpResponse
from .balancer import Balancer
from .discovery import (
    Discovery,
    DnsResolver,
    EtcdResolver,
    Resolver,
    StaticResolver,
    reconcile,
)
from .errors import (
    BackendError,
    CapacityExceeded,
    DispatcherError,
    DuplicateBackend,
    EtcdError,
    InvalidAddress,
    NoBackendAvailable,
    SegmentError,
    UnknownBackend,
    WorkerDied,
)
from .health import HealthCheck
from .pool import WorkerPool
from .servers import attach_from_env, shared_balancer
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
    "Discovery",
    "DispatcherError",
    "DnsResolver",
    "DuplicateBackend",
    "EtcdError",
    "EtcdResolver",
    "HealthCheck",
    "HttpBackend",
    "HttpRequest",
    "HttpResponse",
    "InvalidAddress",
    "LeastLoaded",
    "NoBackendAvailable",
    "PeakEwma",
    "PowerOfTwo",
    "Random",
    "Resolver",
    "RoundRobin",
    "SegmentError",
    "StaticResolver",
    "Strategy",
    "UnknownBackend",
    "View",
    "WeightedRandom",
    "WeightedRoundRobin",
    "WorkerDied",
    "WorkerPool",
    "attach_from_env",
    "reconcile",
    "shared_balancer",
]
