"""Client-side load balancing with one view of load shared by every worker process.

Every public name is here. The modules whose names start with an underscore are the
implementation and may change in any release; `dispatcher.aio`, `dispatcher.discovery`,
`dispatcher.gunicorn`, `dispatcher.servers`, `dispatcher.requests` and `dispatcher.httpx` are
public modules for what needs an import of its own (async backends, resolvers, server hooks,
adapters for the ``requests`` and ``httpx`` libraries).
"""

from ._backends import Backend, HttpBackend, HttpRequest, HttpResponse
from ._balancer import Balancer
from ._health import HealthCheck
from ._http_client import HttpHeaders
from ._pool import WorkerPool
from ._strategies import (
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
from ._view import BackendStats, View
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
    ConnectError,
    ConnectTimeout,
    DispatcherError,
    DuplicateBackend,
    EtcdError,
    InvalidAddress,
    InvalidRequest,
    LockBusy,
    NoBackendAvailable,
    ProtocolError,
    ReadTimeout,
    SegmentError,
    TLSError,
    UnknownBackend,
    WorkerDied,
)
from .servers import attach_from_env, shared_balancer

__all__ = [
    "STRATEGIES",
    "Backend",
    "BackendError",
    "BackendStats",
    "Balancer",
    "CapacityExceeded",
    "ConnectError",
    "ConnectTimeout",
    "ConsistentHash",
    "Discovery",
    "DispatcherError",
    "DnsResolver",
    "DuplicateBackend",
    "EtcdError",
    "EtcdResolver",
    "HealthCheck",
    "HttpBackend",
    "HttpHeaders",
    "HttpRequest",
    "HttpResponse",
    "InvalidAddress",
    "InvalidRequest",
    "LeastLoaded",
    "LockBusy",
    "NoBackendAvailable",
    "PeakEwma",
    "PowerOfTwo",
    "ProtocolError",
    "Random",
    "ReadTimeout",
    "Resolver",
    "RoundRobin",
    "SegmentError",
    "StaticResolver",
    "Strategy",
    "TLSError",
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
