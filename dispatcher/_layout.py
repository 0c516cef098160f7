"""Where each number lives in the shared segment; this module knows bytes and nothing else.

The segment is an array of 8-byte words, read through two casts of the same buffer: ``q``
(signed 64-bit integers) and ``d`` (doubles, for the latency average only). Per-backend fields
are stored field-major, so a strategy scanning the in-flight counts reads one contiguous run::

    word 0                HEADER_WORDS                                       total
    +--------------------+-------------------------------------------------+
    | header (192 words) | per-slot fields, one run of `capacity` words    |
    |  magic, layout,    |   STATE[c] GENERATION[c] WEIGHT[c] IN_FLIGHT[c] |
    |  sizes, owner,     |   REQUESTS[c] FAILURES[c] ... ROTATION_NS[c]    |
    |  version, cursor,  +-------------------------------------------------+
    |  lock holder,      | latency histogram: c x BUCKETS words            |
    |  policy, retries,  +-------------------------------------------------+
    |  names, monitor,   | addresses: c x 256 bytes (length byte + ASCII)  |
    |  scope, digests,   +-------------------------------------------------+
    |  monitor's spec    | worker rows: w x (PID, START, RETRIES,          |
    |                    |                   IN_FLIGHT[c])                 |
    +--------------------+-------------------------------------------------+

Nothing here takes a lock; `_state` says which lock guards which word.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SegmentError

WORD = 8
MAGIC = int.from_bytes(b"dispatch", "little")
LAYOUT_VERSION = 3
MAX_CAPACITY = 4096
"""Most backend slots a segment holds: what the lock holds of a pick or a reap grow with."""
MAX_WORKERS = 1024
"""Most worker rows a segment holds: what a recovery's repair grows with, with capacity."""
HEADER_WORDS = 192
ADDRESS_BYTES = 256
NAME_BYTES = 64

# Header words.
H_MAGIC = 0
H_LAYOUT = 1
H_CAPACITY = 2
H_MAX_WORKERS = 3
H_SIZE = 4
H_OWNER_PID = 5
H_VERSION = 6
"""Membership version: bumped by every change of the eligible set; CLOSED once the owner closed."""
CLOSED = -1
H_CURSOR = 7
H_LOCK_PID = 8
"""The pid of the process holding the lock, 0 when free or just taken (see `_lock`)."""
H_FAILURE_THRESHOLD = 10
H_EJECTION_BASE_NS = 11
H_EJECTION_MAX_NS = 12
H_MAX_EJECTED_PERCENT = 13
H_SLOW_START_NS = 14
H_PANIC_PERCENT = 15
H_LOCK_NAME = 16
"""Start of the lock's semaphore name (NAME_BYTES bytes, length-prefixed)."""
H_STRATEGY_NAME = 24
"""Start of the owner's strategy name (NAME_BYTES bytes), so attach-by-name can reuse it."""
H_RETRIES = 32
"""Retries under way in all processes, against the shared retry budget."""
H_OWNER_START = 33
"""The owner's start time (`_workers.start_time`), so a reused pid is not taken for it."""
H_MONITOR = 34
"""Nonzero when the segment wants a monitor process (the owner asked for one)."""
H_MONITOR_PID = 35
H_MONITOR_START = 36
H_MONITOR_BEAT_NS = 37
"""When the monitor last went round its loop: a stale beat from a dead pid means restart it."""
H_LATENCY = 62
"""Nonzero while every process records each call's latency (histogram and peak EWMA)."""
H_WEIGHTS_NS = 63
"""When the weights from backends' reports were last computed (by one process for the host)."""
H_SCOPE = 38
"""How the segment ends. OWNED: its owner closes it (or the owner's resource tracker unlinks
it). Otherwise no process owns it and its monitor removes it once nobody holds it: SCOPE_PARENT
(`Balancer.shared` by default: the owner words name the parent of the processes that share
it, the server) or SCOPE_NAMED (an explicit scope string: the owner words are 0)."""
OWNED = 0
SCOPE_PARENT = 1
SCOPE_NAMED = 2
H_SCOPE_KEY = 39
"""Two words: the digest of (user, scope, name) that names a shared segment's creation lock."""
H_ADDRS_DIGEST = 41
"""A shared segment's creation-time addresses, digested, so later callers can be compared."""
H_STRATEGY_DIGEST = 42
"""The digest of a custom strategy's class (0 for a strategy given by name)."""
H_SHARED_NAME = 48
"""Start of the name given to `Balancer.shared` (NAME_BYTES bytes, length-prefixed)."""
H_SPEC = 64
"""Start of the monitor's spec: its health check, pickled, length-prefixed (SPEC_BYTES)."""
SPEC_BYTES = (HEADER_WORDS - H_SPEC) * WORD

# Per-slot fields, in order; each is a run of `capacity` words.
STATE = 0
GENERATION = 1
WEIGHT = 2
IN_FLIGHT = 3
REQUESTS = 4
FAILURES = 5
CONSECUTIVE_FAILURES = 6
LAST_FAILURE_NS = 7
EJECTED_UNTIL_NS = 8
TIMES_EJECTED = 9
EWMA_NS = 10
"""Exponentially weighted latency average, a double."""
EWMA_STAMP_NS = 11
ROTATION_NS = 12
"""When the slot last entered rotation: registered, or back up after health checks."""
DOWN = 13
"""Nonzero while active health checks hold the slot out of rotation."""
FAIL_SCORE = 14
"""Recent failures, a double that decays with time (`_latency.failure_score`): strategies count
its whole part as calls in flight, so a backend that fails fast does not look idle."""
FAIL_STAMP_NS = 15
REPORT_LOAD = 16
"""The utilization the backend last reported of itself (ORCA), a double; 0.0: none."""
REPORT_RPS = 17
"""Requests per second it last reported serving (from every client), a double."""
REPORT_EPS = 18
"""Errors per second it last reported, a double."""
REPORT_NS = 19
"""When its last report arrived."""
REPORT_SINCE_NS = 20
"""When its current run of reports began (a backend's first reports are not trusted yet)."""
REPORTED_WEIGHT = 21
"""The weight computed from the reports, once per host (a double; 0.0: not known)."""
REQUESTS_MARK = 22
FAILURES_MARK = 23
"""Requests and failures when the reported weights were last computed: the rates of the
calls this host made, for backends that report no rates of their own."""
SLOT_FIELDS = 24

FREE = 0
LIVE = 1
DRAINING = 2
"""Registered but taking no new calls; freed when its last call in flight ends."""

BUCKETS = 72
"""Half-octave latency buckets: ``2 * bit_length(ns) + next bit``; the last holds >= 51 s."""

# Worker row words, before its per-slot in-flight run.
W_PID = 0
W_START = 1
W_RETRIES = 2
W_HEADER = 3


@dataclass(frozen=True)
class Layout:
    """Word offsets of every region for a given capacity and number of worker rows."""

    capacity: int
    max_workers: int

    def field(self, field: int) -> int:
        """Word index of slot 0 of `field`."""
        return HEADER_WORDS + field * self.capacity

    @property
    def histogram(self) -> int:
        return HEADER_WORDS + SLOT_FIELDS * self.capacity

    @property
    def addresses(self) -> int:
        """Byte offset of slot 0's address."""
        return (self.histogram + BUCKETS * self.capacity) * WORD

    @property
    def workers(self) -> int:
        return self.addresses // WORD + self.capacity * ADDRESS_BYTES // WORD

    @property
    def worker_stride(self) -> int:
        return W_HEADER + self.capacity

    @property
    def words(self) -> int:
        return self.workers + self.max_workers * self.worker_stride

    @property
    def size(self) -> int:
        return self.words * WORD


def bucket_of(latency_ns: int) -> int:
    """Histogram bucket of a latency: two per power of two, so p99 is within ~19%."""
    if latency_ns < 2:
        return 0
    bits = latency_ns.bit_length()
    return min(BUCKETS - 1, 2 * bits + ((latency_ns >> (bits - 2)) & 1) - 2)


def bucket_floor_ns(bucket: int) -> int:
    """Smallest latency that lands in `bucket` (inverse of `bucket_of` for bucket >= 2)."""
    bits, half = divmod(bucket + 2, 2)
    return (2 + half) << (bits - 2) if bits >= 2 else bucket


def write_header(words: memoryview, layout: Layout, owner_pid: int, owner_start: int) -> None:
    """Fill the identifying header words of a fresh, zeroed segment."""
    words[H_LAYOUT] = LAYOUT_VERSION
    words[H_CAPACITY] = layout.capacity
    words[H_MAX_WORKERS] = layout.max_workers
    words[H_SIZE] = layout.size
    words[H_OWNER_PID] = owner_pid
    words[H_OWNER_START] = owner_start
    words[H_MAGIC] = MAGIC


def read_layout(words: memoryview, name: str, size: int) -> Layout:
    """Return the layout a segment declares, once its header proves it is ours."""
    if len(words) < HEADER_WORDS or words[H_MAGIC] != MAGIC:
        raise SegmentError(f"shared memory {name!r} is not a dispatcher segment")
    if words[H_LAYOUT] != LAYOUT_VERSION:
        raise SegmentError(
            f"shared memory {name!r} has layout version {words[H_LAYOUT]}, "
            f"this dispatcher reads version {LAYOUT_VERSION}"
        )
    capacity, max_workers = words[H_CAPACITY], words[H_MAX_WORKERS]
    if not (1 <= capacity <= MAX_CAPACITY and 1 <= max_workers <= MAX_WORKERS):
        raise SegmentError(
            f"shared memory {name!r} has a corrupt header: capacity {capacity}, "
            f"max_workers {max_workers}"
        )
    layout = Layout(capacity, max_workers)
    if words[H_SIZE] != layout.size or size < layout.size:
        raise SegmentError(
            f"shared memory {name!r} is {size} bytes, its header declares {words[H_SIZE]} "
            f"and its layout needs {layout.size}"
        )
    return layout


def address_record(addr: str) -> bytes:
    """A slot's address as stored: a length byte, then the canonical ``host:port`` in ASCII."""
    data = addr.encode("ascii")
    if len(data) >= ADDRESS_BYTES:
        raise ValueError(f"address {addr!r} does not fit a slot")
    return bytes([len(data)]) + data


def read_address(addresses: bytes | bytearray | memoryview, slot: int) -> str:
    """The address of `slot` in a copy (or view) of the address region."""
    offset = slot * ADDRESS_BYTES
    data = bytes(addresses[offset + 1 : offset + 1 + addresses[offset]])
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise SegmentError(f"slot {slot} holds an address that is not ASCII: {data!r}") from None


def write_spec(buf: memoryview, data: bytes) -> None:
    """Store the monitor's spec (bytes) in the header."""
    start = H_SPEC * WORD
    if len(data) > SPEC_BYTES - WORD:
        raise ValueError(
            f"the health check takes {len(data)} bytes pickled, more than {SPEC_BYTES - WORD}"
        )
    buf[start : start + WORD] = len(data).to_bytes(WORD, "little")
    buf[start + WORD : start + WORD + len(data)] = data


def read_spec(buf: memoryview) -> bytes:
    start = H_SPEC * WORD
    length = min(int.from_bytes(buf[start : start + WORD], "little"), SPEC_BYTES - WORD)
    return bytes(buf[start + WORD : start + WORD + length])


def write_name(buf: memoryview, word: int, value: str) -> None:
    """Store a short ASCII name, length-prefixed, at header word `word`."""
    data = value.encode("ascii")
    if len(data) >= NAME_BYTES:
        raise ValueError(f"name {value!r} is longer than {NAME_BYTES - 1} bytes")
    start = word * WORD
    buf[start] = len(data)
    buf[start + 1 : start + 1 + len(data)] = data


def read_name(buf: memoryview, word: int) -> str:
    """The name stored at header word `word`; `SegmentError` if it is not printable ASCII."""
    start = word * WORD
    length = min(buf[start], NAME_BYTES - 1)
    data = bytes(buf[start + 1 : start + 1 + length])
    if not (data.isascii() and data.decode("ascii").isprintable()):
        raise SegmentError(f"a name in the segment header is not printable ASCII: {data!r}")
    return data.decode("ascii")
