"""Service discovery: keep a balancer's membership equal to what a registry says.

A resolver turns a source (a fixed list, DNS, etcd) into a stream of *full* answers, each a
``{canonical address: weight}`` dict, never deltas: a full answer can be compared with the last
one and reconciled against the balancer whatever happened in between (a missed event, a
restarted registry). When the source cannot answer,
the resolver yields the exception instead, and `Discovery` keeps the last good answer: a
registry that blinks must never empty the pool. A source that answers fine with no instances
is believed, as Envoy's strict DNS and EDS clusters believe it: every backend is drained.

`reconcile` is the one place that writes membership: new instances are registered, removed
ones drained (no new picks, the slot is freed when their calls in flight end), so a worker
process sees the change on its next pick and no call is cut short.

Resolvers hold only their configuration (connections are made inside `watch`), so they pickle:
`Discovery` can run in any process that holds the balancer, attached or owner.
"""

from ._dns import DnsLookup, DnsRecord, DnsResolver, getaddrinfo_lookup
from ._etcd import EtcdResolver, parse_etcd_value
from ._reconcile import Changes, Discovery, reconcile
from ._resolver import Answer, PollingResolver, Resolver, StaticResolver, Stop

__all__ = [
    "Answer",
    "Changes",
    "Discovery",
    "DnsLookup",
    "DnsRecord",
    "DnsResolver",
    "EtcdResolver",
    "PollingResolver",
    "Resolver",
    "StaticResolver",
    "Stop",
    "getaddrinfo_lookup",
    "parse_etcd_value",
    "reconcile",
]
