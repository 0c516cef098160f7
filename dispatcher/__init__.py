"""Client-side load balancing with one view of load shared by every worker process.

Every public name is here. The modules whose names start with an underscore are the
implementation and may change in any release; `dispatcher.aio`, `dispatcher.discovery`,
`dispatcher.gunicorn`, `dispatcher.servers`, `dispatcher.requests` and `dispatcher.httpx` are
public modules for what needs an import of its own (async backends, resolvers, server hooks,
adapters for the ``requests`` and ``httpx`` libraries).
"""

from ._backends import Backend, HttpBackend, HttpRequest, HttpResponse
from ._balancer import Balancer
from ._events import Event
from ._health import HealthCheck
from ._http_client import HttpHeaders
from ._latency import BUCKET_BOUNDS, percentile
from ._pool import WorkerPool
from ._strategies import (
    STRATEGIES,
    ClientSideWeightedRoundRobin,
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
    OptionMismatch,
    ProtocolError,
    ReadTimeout,
    SegmentError,
    TLSError,
    UnknownBackend,
    WorkerDied,
)
from .servers import attach_from_env, shared_balancer

__all__ = [
    "BUCKET_BOUNDS",
    "STRATEGIES",
    "Backend",
    "BackendError",
    "BackendStats",
    "Balancer",
    "CapacityExceeded",
    "ClientSideWeightedRoundRobin",
    "ConnectError",
    "ConnectTimeout",
    "ConsistentHash",
    "Discovery",
    "DispatcherError",
    "DnsResolver",
    "DuplicateBackend",
    "EtcdError",
    "EtcdResolver",
    "Event",
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
    "OptionMismatch",
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
    "percentile",
    "reconcile",
    "shared_balancer",
]
