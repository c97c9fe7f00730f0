"""Egress lines and paths.

A ``Line`` knows how to open a TCP (+TLS) connection out of this host its way. A ``Path`` is
one (endpoint, line) pair: it owns its connection pool and its counters. Paths are keyed by
``(upstream, endpoint url, line)`` so a config reload can keep the unchanged ones (and their
warm pools) and build or drain only what changed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from ..net.client import Conn, Response
from ..net.dns import Address, Resolver
from ..net.pool import Pool
from ..net.tunnel import Handshake, ProxySpec, http_connect, socks5_connect
from ..proto import codec
from ..proto.errors import ConnectError
from ..proto.hop import ENDPOINT_HEADER, PROBE_HEADER
from ..proto.providers import probe_target
from .estimator import Estimator
from .health import Health

if TYPE_CHECKING:
    from ..config import EndpointConfig, LineConfig, PoolConfig, UpstreamConfig

__all__ = ["PROBE_HEADER_LINE", "Line", "Path", "PathKey", "Via", "same_connections", "tls_context"]

PathKey = tuple[str, str, str]  # (upstream name, endpoint url, line name)

log = logging.getLogger("edgeproxy")

# Bounds for the RTT-derived timeouts below (seconds). The floors keep a loaded machine's
# scheduling hiccups from looking like a dead line.
CONNECT_FLOOR: Final = 0.5
SUSPECT_FLOOR: Final = 0.2
SUSPECT_CEILING: Final = 1.0
# Marks a probe sent over a `via` line: the edge answers it itself, with its own RTT.
PROBE_HEADER_LINE: Final = f"{PROBE_HEADER}: 1\r\n".encode()


def same_connections(a: LineConfig, b: LineConfig) -> bool:
    """Would connections opened over a line configured ``a`` be the same as over ``b``? What
    they depend on: the kind, the source address, the proxy (with its credentials), the edge's
    URL and the CA its certificate is checked against. A `via` line's token and compression
    travel in each request, not in the connection: changing them keeps the pools."""
    return (a.kind, a.bind, a.proxy, a.via, a.ca) == (b.kind, b.bind, b.proxy, b.via, b.ca)


def tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """Client TLS: verify certificates and host names; ALPN pinned to HTTP/1.1. ``cafile``
    (a `via` line's or an endpoint's ``ca``) is trusted in addition to the system CAs, which
    OpenSSL finds at its default paths (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` replace those)."""
    ctx = ssl.create_default_context()
    if cafile is not None:
        ctx.load_verify_locations(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class Line:
    """An egress line: ``direct`` (optionally bound to a source address), ``proxy``, or
    ``via`` (a peer edgeproxy: every connection goes to the edge, whatever the origin)."""

    __slots__ = ("bind", "config", "kind", "name", "proxy", "via")

    def __init__(self, config: LineConfig) -> None:
        self.name = config.name
        self.kind = config.kind
        self.bind = config.bind
        self.proxy = ProxySpec(config.proxy) if config.proxy else None
        self.via = Via(config) if config.kind == "via" else None
        self.config = config

    def __repr__(self) -> str:
        where = f" bind={self.bind}" if self.bind else f" {self.proxy.label}" if self.proxy else ""
        if self.via is not None:
            where = f" {self.via.url}"
        return f"<Line {self.name} {self.kind}{where}>"

    async def connect(
        self,
        factory: Callable[[], Conn],
        resolver: Resolver,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        timeout: float,
        reach_timeout: float | None = None,
    ) -> tuple[Conn, float]:
        """Open one connection to host:port over this line.

        Returns the connection and the time it took to reach the origin (TCP, plus the proxy's
        tunnel set-up), which is about one round trip over the line: an RTT sample. DNS and
        TLS are not in it. ``reach_timeout`` bounds that part alone (TLS may take longer).
        """
        loop = asyncio.get_running_loop()
        transport: asyncio.Transport | None = None
        if self.via is not None:  # the hop: to the edge, with its certificate checked
            host, port, tls = self.via.host, self.via.port, self.via.tls
        try:
            async with asyncio.timeout(timeout):
                proxy = self.proxy
                if proxy is None:
                    addrs = await resolver.resolve(host)
                    started = loop.time()
                    async with asyncio.timeout(reach_timeout):
                        transport, hs = await self._open_tcp(addrs, port)
                else:
                    addrs = await resolver.resolve(proxy.host)
                    target = host
                    if proxy.scheme == "socks5" and not proxy.remote_dns:
                        target = (await resolver.resolve(host))[0][1]
                    started = loop.time()
                    async with asyncio.timeout(reach_timeout):
                        transport, hs = await self._open_tcp(addrs, proxy.port)
                    if proxy.scheme == "http":
                        await http_connect(hs, proxy, host, port)
                    else:
                        await socks5_connect(hs, proxy, target, port)
                reach = loop.time() - started
                if tls is not None:
                    transport = await loop.start_tls(transport, hs, tls, server_hostname=host)  # type: ignore[assignment]
                    if transport is None:
                        raise ConnectError(f"TLS to {host}: connection closed during the handshake")
        except BaseException:
            if transport is not None:
                transport.abort()
            raise
        conn = factory()
        transport.set_protocol(conn)
        conn.connection_made(transport)
        return conn, reach

    async def _open_tcp(self, addrs: list[Address], port: int) -> tuple[asyncio.Transport, Handshake]:
        """TCP to the first address that answers (bound to ``bind`` when set)."""
        loop = asyncio.get_running_loop()
        if self.bind is not None:
            want = int(socket.AF_INET6 if ":" in self.bind else socket.AF_INET)
            addrs = [a for a in addrs if a[0] == want] or addrs
        last: OSError | None = None
        for family, ip in addrs:
            try:
                transport, hs = await loop.create_connection(
                    Handshake, ip, port, family=family, local_addr=(self.bind, 0) if self.bind else None
                )
                return transport, hs  # type: ignore[return-value]
            except OSError as exc:
                last = exc
        assert last is not None
        raise last


class Via:
    """Where a `via` line goes and how it presents itself to the edge."""

    __slots__ = ("compress", "headers", "host", "port", "prefs", "tls", "url")

    def __init__(self, config: LineConfig) -> None:
        assert config.via is not None and config.token is not None
        parts = urlsplit(config.via)
        self.url = config.via
        self.host = parts.hostname or ""
        https = parts.scheme == "https"
        self.port = parts.port or (443 if https else 80)
        self.tls = tls_context(config.ca) if https else None
        if not https and not _is_loopback(self.host):
            log.warning(
                "lines.%s: the hop to %s is plain http: its token and any API keys cross in clear"
                " text (use https unless the network between is private, e.g. a VPN)",
                config.name,
                self.url,
            )
        self.compress = None if config.compress == "off" else config.compress
        # The codings we take answers in, best first (`compress: off`: none, plain bytes).
        self.prefs: tuple[str, ...] = {"br": ("br", "gzip"), "gzip": ("gzip",), "zstd": ("zstd", "br", "gzip")}.get(
            config.compress, ()
        )
        # Sent on every hop request (and probe): our token.
        self.headers = f"x-edgeproxy-token: {config.token}\r\n".encode("latin-1")

    def accept(self, wanted: str | None) -> bytes:
        """The Accept-Encoding for one hop request. Codings the client itself takes come
        first: an answer in one of those passes through to it untouched (no decoding here,
        no size cap); the others are decoded by us."""
        if not self.prefs:
            return b"Accept-Encoding: identity\r\n"
        first = [c for c in self.prefs if codec.accepts(wanted, c)]
        order = first + [c for c in self.prefs if c not in first]
        return b"Accept-Encoding: " + ", ".join(order).encode() + b"\r\n"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Path:
    """One (endpoint, line) pair with its own pool, RTT estimate, health and counters."""

    __slots__ = (
        "key",
        "upstream",
        "endpoint",
        "line",
        "label",
        "pool",
        "estimator",
        "health",
        "probe_head",
        "requests",
        "failures",
        "inflight",
        "peak",
        "last_error",
        "last_error_at",
        "connect_rtt",
        "waiting",
        "connecting",
        "host_header",
        "edge_rtt",
        "hop",
        "hop_headers",
        "hop_origin",
    )

    def __init__(
        self,
        upstream: UpstreamConfig,
        endpoint: EndpointConfig,
        line: Line,
        pool_config: PoolConfig,
        resolver: Resolver,
    ) -> None:
        self.key: PathKey = (upstream.name, endpoint.url, line.name)
        self.upstream = upstream.name
        self.label = f"{upstream.name}:{endpoint.host}:{endpoint.port} via {line.name}"
        tls = tls_context(endpoint.ca) if endpoint.scheme == "https" else None
        host, port = endpoint.host, endpoint.port

        async def connector(factory: Callable[[], Conn], timeout: float, reach: float | None) -> tuple[Conn, float]:
            # The line as it is now: a reload may hand this path a new Line whose connections
            # go the same way (see ``retarget``); one Line per name stays in use.
            return await self.line.connect(factory, resolver, host, port, tls, timeout, reach)

        self.pool = Pool(
            self.label,
            connector,
            max_size=pool_config.max_per_path,
            keepalive=pool_config.keepalive,
            warm=pool_config.warm,
            connect_timeout=pool_config.connect_timeout,
        )
        self.pool.on_connect = self._on_connect
        self.estimator = Estimator()
        self.health = Health()
        self.edge_rtt: float | None = None  # a via path: the edge's own RTT to the origin, last reported
        self.retarget(upstream, endpoint, line)
        self.requests = 0
        self.failures = 0
        self.inflight = 0
        self.peak = 0  # the most in flight at once since the owner last looked (Upstream.keep_standby)
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.connect_rtt: float | None = None
        # Attempts sent on this path and not yet committed: failed over if the line dies.
        self.waiting: dict[Response, Any] = {}  # -> the engine's Ctx
        # Attempts opening a new connection here (their acquire): failed over too.
        self.connecting: dict[asyncio.Future[Any], Any] = {}  # -> the engine's Ctx

    def retarget(self, upstream: UpstreamConfig, endpoint: EndpointConfig, line: Line) -> None:
        """Take the config of a reload that kept this path (same key, same connection
        settings: ``same_connections``): its endpoint (priority, models, keys...), its Line
        (a via line's token or compression) and what is derived from them. The pool, the
        estimator and the health stay: they are about the way to the origin, which did not
        change.

        Called by ``State.commit`` at the swap, while requests of the previous State may be in
        flight on this path. Safe because every field set here is either unchanged (all that
        derives from the endpoint URL, in the key: host, port, base path, Host header, the
        hop's absolute origin) or a whole new value read per attempt or probe (priority at
        ranking, the hop headers and probe head as ready-made bytes, the Via's compression),
        and either version is valid for this origin and edge: an attempt planned before the
        swap and sent after carries the new token or the old, never a mix within a header.
        No await in here: nothing runs between two of these assignments.
        """
        assert (upstream.name, endpoint.url, line.name) == self.key
        self.endpoint = endpoint
        self.line = line
        host, port = endpoint.host, endpoint.port
        default_port = 443 if endpoint.scheme == "https" else 80
        bracketed = f"[{host}]" if ":" in host else host
        self.host_header = bracketed if port == default_port else f"{bracketed}:{port}"
        target = probe_target(upstream.provider, endpoint.base_path)
        # A `via` path sends the endpoint's URL as the request target (absolute form), so the
        # edge knows which of its origins is meant; it answers probes itself (see filters/edge.py).
        # The endpoint's URL goes along too: an origin serving two APIs (a relay) may be two
        # endpoints on the edge, told apart by it.
        self.hop = line.via
        hop_origin, hop_headers = "", b""
        if line.via is not None:
            hop_origin = f"{endpoint.scheme}://{self.host_header}"
            hop_headers = line.via.headers + f"{ENDPOINT_HEADER}: {endpoint.url}\r\n".encode("latin-1")
        self.hop_origin, self.hop_headers = hop_origin, hop_headers
        probe_extra = (hop_headers + PROBE_HEADER_LINE).decode("latin-1") if line.via is not None else ""
        self.probe_head = (
            f"GET {hop_origin}{target} HTTP/1.1\r\nHost: {self.host_header}\r\n{probe_extra}"
            "User-Agent: edgeproxy-probe\r\n\r\n"
        ).encode("latin-1")

    def __repr__(self) -> str:
        return f"<Path {self.label} {self.health.state} {self.estimator!r} {self.pool!r}>"

    def score(self) -> float | None:
        """Lower is better; None until measured. The formula: see ``estimator``."""
        return self.estimator.score()

    def connect_timeout(self) -> float:
        """How long a new connection may take here: set-up is TCP, maybe a proxy tunnel and
        TLS, up to about four round trips; so 4 x (SRTT + 4 RTTVAR), between CONNECT_FLOOR
        and pool.connect_timeout. Unmeasured paths get the configured bound."""
        est = self.estimator
        if est.srtt is None or est.rttvar is None:
            return self.pool.connect_timeout
        return min(max(4 * (est.srtt + 4 * est.rttvar), CONNECT_FLOOR), self.pool.connect_timeout)

    def suspect_after(self) -> float:
        """Waiting longer than this for response headers makes the line suspect (an early
        probe checks it): a few round trips, at least SUSPECT_FLOOR."""
        est = self.estimator
        if est.srtt is None or est.rttvar is None:
            return SUSPECT_CEILING
        return min(max(3 * (est.srtt + 4 * est.rttvar), SUSPECT_FLOOR), SUSPECT_CEILING)

    def urgent_probe_timeout(self, ceiling: float) -> float:
        """Timeout for a probe sent because a real request already waits too long: one and a
        half RTOs. (Failing it only makes the line suspect until a re-probe with the full
        timeout says; a black hole is left that much sooner.)"""
        est = self.estimator
        if est.srtt is None or est.rttvar is None:
            return ceiling
        return min(max(1.5 * (est.srtt + 4 * est.rttvar), SUSPECT_FLOOR), ceiling)

    def is_full(self) -> bool:
        return self.inflight >= self.pool.max_size

    def _on_connect(self, seconds: float) -> None:
        # Shown, not scored: a middlebox that terminates TCP near this host (a transparent
        # proxy, a WAN accelerator, our own line simulator) answers the handshake in
        # microseconds whatever the path behind it, and would make a slow line look fast.
        # Probes time a full HTTP exchange with the origin itself.
        self.connect_rtt = seconds

    def on_response_end(self, resp: object) -> None:
        self.inflight -= 1

    def on_failure(self, error: BaseException) -> None:
        self.failures += 1
        self.last_error = str(error)
        self.last_error_at = time.time()

    def status(self) -> dict[str, object]:
        """What /-/status shows for this path (no secrets: URLs here carry none)."""
        est, health = self.estimator, self.health
        now = time.monotonic()
        return {
            "upstream": self.upstream,
            "endpoint": self.endpoint.url,
            "line": self.line.name,
            "priority": self.endpoint.priority,
            "state": health.state,  # the line's; the origin's per model: the upstream's "origins"
            "srtt_ms": _ms(est.srtt),
            "rttvar_ms": _ms(est.rttvar),
            "last_rtt_ms": _ms(est.last_sample),
            "connect_ms": _ms(self.connect_rtt),
            "edge_rtt_ms": _ms(self.edge_rtt),  # via paths: the edge's part of the SRTT (last probe)
            "last_probe_s_ago": None if health.last_probe_at is None else round(now - health.last_probe_at, 1),
            "last_probe_ok": health.last_probe_ok,
            "inflight": self.inflight,
            "active": self.pool.active,
            "idle": self.pool.idle,
            "requests": self.requests,
            "failures": self.failures,
            "last_error": self.last_error or health.last_error,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)
