"""The model: the frozen dataclasses a validated config is made of, and their small methods.

Nothing here parses text; ``load`` builds these, and the rest of edgeproxy reads them.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from typing import Final

from .hosts import _is_loopback_host


@dataclass(frozen=True, slots=True)
class TokenClass:
    """Who a listener token says the client is: a name for logs and metrics (never the token)
    and its priority class: ``priority`` by default, at most ``max_priority`` if it asks."""

    name: str | None = None
    priority: str = "normal"
    max_priority: str = "high"


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One inbound socket. ``address`` is normalized: '127.0.0.1:8787', '[::1]:8787', 'unix:/x'."""

    address: str
    host: str | None
    port: int | None
    unix: str | None
    tokens: tuple[str, ...] = field(default=(), repr=False)  # secrets: never in a repr
    # Each token's class (same order as ``tokens``): its name and priority.
    token_classes: tuple[TokenClass, ...] = ()
    tls: TLSConfig | None = None
    # Browser guard (engine/guard.py): extra Host names a loopback listener answers to
    # (lower-case, no port; '*.suffix' for a whole domain, '*' for any), and the browser
    # Origins allowed to call it ('scheme://host[:port]' as browsers send them, or '*').
    hosts: tuple[str, ...] = ()
    origins: tuple[str, ...] = ()

    def is_loopback(self) -> bool:
        """True when only this host can connect: a unix socket, 127.0.0.0/8, ::1, localhost."""
        if self.unix is not None:
            return True
        return self.host is not None and _is_loopback_host(self.host)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: ListenerConfig | None  # None: no admin listener


@dataclass(frozen=True, slots=True)
class LineConfig:
    """An egress line. ``kind`` is 'direct' (optionally ``bind``), 'proxy' or 'via'."""

    name: str
    kind: str
    bind: str | None = None
    proxy: str | None = None
    via: str | None = None
    token: str | None = None
    compress: str = "br"
    ca: str | None = None


def key_id(key: str) -> str:
    """A short, stable name for a key that reveals nothing of it: ``k-`` + 6 hex of its SHA-256."""
    return "k-" + hashlib.sha256(key.encode()).hexdigest()[:6]


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """One key of an endpoint's pool, with its optional local limits (per minute)."""

    key: str = field(repr=False)  # the secret: never in a repr, a log line or an error
    id: str = ""  # what logs, metrics and /-/status call it
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """One origin of an upstream. ``url`` is scheme://host[:port]base_path, no trailing slash."""

    url: str
    scheme: str
    host: str
    port: int
    base_path: str
    keys: tuple[str, ...] = field(default=(), repr=False)  # secrets: never in a repr
    lines: tuple[str, ...] = ()
    priority: int = 1
    models: tuple[tuple[str, str], ...] = ()
    # The pool behind ``keys`` (same order), with ids and local limits. Empty when the
    # endpoint was built by hand from bare keys: ``key_configs()`` fills it in.
    key_pool: tuple[KeyConfig, ...] = field(default=(), repr=False)
    # A PEM bundle trusted for this endpoint's certificate, in addition to the system CAs.
    ca: str | None = None
    # Its share of its tier's requests (None: not set; 1 when another endpoint sets one).
    weight: int | None = None

    @property
    def origin(self) -> str:
        """'scheme://host:port' with the port always present: what the edge allow-list compares."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def model_map(self) -> dict[str, str]:
        return dict(self.models)

    def key_configs(self) -> tuple[KeyConfig, ...]:
        if self.key_pool or not self.keys:
            return self.key_pool
        return tuple(KeyConfig(k, key_id(k)) for k in self.keys)


_RETRY_ON_DEFAULT: Final = frozenset({"connect", "reset", "timeout", "429", "500", "502", "503", "504"})


@dataclass(frozen=True, slots=True)
class EjectionConfig:
    """`failover.ejection`: when real attempts take a path (or a model at an endpoint) out of
    rotation, and for how long (base_time, doubling per ejection up to max_time)."""

    origin_errors: int = 5  # 5xx, timeouts with a healthy line, stalls: in a row, per model
    local_failures: int = 3  # connect refused or timed out, reset: in a row, per path
    base_time: float = 2.0
    max_time: float = 5.0


@dataclass(frozen=True, slots=True)
class ModelTimeouts:
    """`failover.models.<pattern>`: a model's own timeouts (None: the upstream's)."""

    first_byte_timeout: float | None = None
    stream_first_byte_timeout: float | None = None
    first_event_timeout: float | None = None
    stream_idle_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The timeouts one request runs with (its model's, streaming or not)."""

    first_byte: float  # response headers
    first_event: float  # an SSE answer's first event, before commit
    stream_idle: float  # between bytes of a streamed answer, after commit


# Reasoning models think before their first token, for minutes at high effort, and on some
# APIs (OpenAI Chat Completions, Gemini) say nothing meanwhile: the first event (and a
# non-streaming answer) may take as long as the SDKs wait (600 s). Their headers come at once
# like any model's. A config's `failover.models` patterns are matched before these.
BUILTIN_MODEL_TIMEOUTS: Final = tuple(
    (pattern, ModelTimeouts(first_byte_timeout=600.0, first_event_timeout=600.0))
    for pattern in ("o1*", "o3*", "o4*", "gpt-5*", "gemini-2.5-pro*", "*reasoner*", "*thinking*")
)


@dataclass(frozen=True, slots=True)
class FailoverConfig:
    retries: int = 2
    retry_on: frozenset[str] = _RETRY_ON_DEFAULT
    first_byte_timeout: float = 300.0
    # A streaming request's headers: every major API sends them once it accepts the request,
    # before generating; silence this long is an origin that will not answer.
    stream_first_byte_timeout: float = 30.0
    first_event_timeout: float = 30.0
    stream_idle_timeout: float = 60.0
    hedge: float | None = None
    # Every key of the upstream rate-limited: how long a request may wait for one to free up
    # before it gets a 429 with Retry-After.
    queue_timeout: float = 2.0
    ejection: EjectionConfig = EjectionConfig()
    # Per-model timeouts: (fnmatch pattern, overrides), the config's first, then the built-in.
    models: tuple[tuple[str, ModelTimeouts], ...] = BUILTIN_MODEL_TIMEOUTS
    # A stream broken after commit goes on from another endpoint where the API can continue
    # an answer (Anthropic Messages: an assistant prefill); filters/resume.py.
    resume: bool = False

    def timeouts(self, model: str | None, streaming: bool) -> Timeouts:
        """The timeouts of a request for ``model`` (the first pattern that matches it)."""
        over = ModelTimeouts()
        if model is not None:
            for pattern, timeouts in self.models:
                if fnmatch.fnmatchcase(model, pattern):
                    over = timeouts
                    break
        if streaming:
            first_byte = _first(over.stream_first_byte_timeout, self.stream_first_byte_timeout)
        else:
            first_byte = _first(over.first_byte_timeout, self.first_byte_timeout)
        return Timeouts(
            first_byte,
            _first(over.first_event_timeout, self.first_event_timeout),
            _first(over.stream_idle_timeout, self.stream_idle_timeout),
        )


def _first(value: float | None, default: float) -> float:
    return default if value is None else value


@dataclass(frozen=True, slots=True)
class FallbackConfig:
    """One entry of an upstream's ``fallbacks``: an error answer matching ``on`` (the origin's
    error code as written, or a status as three digits) sends the request again with ``model``;
    only while the request asks for ``from_model``, if set."""

    on: str
    model: str
    from_model: str | None = None

    @property
    def status(self) -> int | None:
        """The status ``on`` names, or None when it names an error code."""
        return int(self.on) if self.on.isdigit() else None


@dataclass(frozen=True, slots=True)
class UpstreamCacheConfig:
    """An upstream's ``cache``: its complete 200 answers are kept ``ttl`` seconds; per client
    credential unless ``shared`` (then every client of this upstream gets the same answers)."""

    ttl: float
    shared: bool = False


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """An upstream's ``admission``: at most ``max_inflight`` requests at its origins at once
    (None: no cap; the queue then only orders waits for keys), ``queue`` more waiting, each
    for ``queue_timeout`` seconds from its arrival at most."""

    max_inflight: int | None = None
    queue: int = 10_000
    queue_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    prefix: str
    provider: str
    endpoints: tuple[EndpointConfig, ...]
    failover: FailoverConfig
    fallbacks: tuple[FallbackConfig, ...] = ()
    cache: UpstreamCacheConfig | None = None  # off when absent
    admission: AdmissionConfig | None = None  # off when absent


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    interval: float = 5.0
    timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class RouteConfig:
    tolerance: float = 0.010


@dataclass(frozen=True, slots=True)
class PoolConfig:
    max_per_path: int = 256
    keepalive: float = 60.0
    warm: int = 1
    connect_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body: int = 32 * 1024 * 1024
    replay_body: int = 16 * 1024 * 1024
    max_header: int = 16 * 1024
    max_connections: int = 10000
    # Per client address (an IPv6 /64 counts as one): nginx's limit_conn.
    max_connections_per_address: int = 1024
    # A request's head must arrive whole within this of its first byte (client_header_timeout).
    header_timeout: float = 10.0
    # A request body that sends nothing for this long is cut (client_body_timeout).
    body_timeout: float = 30.0
    # An idle keep-alive connection (or one that never sends a request) is closed after this.
    keepalive_timeout: float = 75.0
    # Request bodies held in memory (for a replay), all connections together.
    buffer_memory: int = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The store every caching upstream shares: ``memory`` (this process) or a ``redis://`` URL."""

    store: str = "memory"
    max_memory: int = 256 << 20  # the memory store's bound, least recently used out first
    max_entry: int = 8 << 20  # larger answers are not stored


@dataclass(frozen=True, slots=True)
class LogConfig:
    access: str = "json"
    level: str = "info"
    buffer: int = 4 << 20  # bytes held, per log, for a reader that is behind


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[ListenerConfig, ...]
    admin: AdminConfig
    lines: tuple[LineConfig, ...]
    upstreams: tuple[UpstreamConfig, ...]
    probe: ProbeConfig
    route: RouteConfig
    failover: FailoverConfig
    pool: PoolConfig
    limits: LimitsConfig
    log: LogConfig
    drain_timeout: float = 30.0
    source: str | None = None
    cache: CacheConfig = CacheConfig()

    def line(self, name: str) -> LineConfig:
        for line in self.lines:
            if line.name == name:
                return line
        raise KeyError(f"no line named {name!r}")
