"""Egress lines and paths.

A ``Line`` knows how to open a TCP (+TLS) connection out of this host its way. A ``Path`` is
one (endpoint, line) pair: it owns its connection pool and its counters. Paths are keyed by
``(upstream, endpoint url, line)`` so a config reload can keep the unchanged ones (and their
warm pools) and build or drain only what changed.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .client import Conn
from .dns import Resolver
from .pool import Pool

if TYPE_CHECKING:
    from .config import EndpointConfig, LineConfig, PoolConfig, UpstreamConfig

__all__ = ["Line", "Path", "PathKey", "tls_context"]

PathKey = tuple[str, str, str]  # (upstream name, endpoint url, line name)


def tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """Client TLS: verify certificates and host names; ALPN pinned to HTTP/1.1."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class Line:
    """An egress line. Only ``direct`` (optionally bound to a source address) for now."""

    __slots__ = ("bind", "config", "kind", "name")

    def __init__(self, config: LineConfig) -> None:
        if config.kind != "direct":
            raise ValueError(
                f"lines.{config.name}: '{config.kind}' lines are not supported by this build yet; use a direct line"
            )
        self.name = config.name
        self.kind = config.kind
        self.bind = config.bind
        self.config = config

    def __repr__(self) -> str:
        return f"<Line {self.name} {self.kind}{' bind=' + self.bind if self.bind else ''}>"

    async def connect(
        self,
        factory: Callable[[], Conn],
        resolver: Resolver,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        timeout: float,
    ) -> Conn:
        """Open one connection to host:port; try each address until one answers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with asyncio.timeout_at(deadline):
            addrs = await resolver.resolve(host)
        if self.bind is not None:
            want = int(socket.AF_INET6 if ":" in self.bind else socket.AF_INET)
            addrs = [a for a in addrs if a[0] == want] or addrs
        last: BaseException | None = None
        for family, ip in addrs:
            try:
                async with asyncio.timeout_at(deadline):
                    _, proto = await loop.create_connection(
                        factory,
                        ip,
                        port,
                        ssl=tls,
                        server_hostname=host if tls is not None else None,
                        family=family,
                        local_addr=(self.bind, 0) if self.bind else None,
                    )
                return proto
            except TimeoutError:
                raise
            except OSError as exc:
                last = exc
        assert last is not None
        raise last


class Path:
    """One (endpoint, line) pair with its own pool and counters."""

    __slots__ = (
        "_tls",
        "connect_rtt",
        "endpoint",
        "failures",
        "inflight",
        "key",
        "last_error",
        "last_error_at",
        "line",
        "pool",
        "requests",
        "upstream",
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
        self.endpoint = endpoint
        self.line = line
        self._tls = tls_context() if endpoint.scheme == "https" else None
        host, port, tls = endpoint.host, endpoint.port, self._tls

        async def connector(factory: Callable[[], Conn], timeout: float) -> Conn:
            return await line.connect(factory, resolver, host, port, tls, timeout)

        self.pool = Pool(
            f"{endpoint.host}:{endpoint.port} via {line.name}",
            connector,
            max_size=pool_config.max_per_path,
            keepalive=pool_config.keepalive,
            warm=pool_config.warm,
            connect_timeout=pool_config.connect_timeout,
        )
        self.pool.on_connect = self._on_connect
        self.requests = 0
        self.failures = 0
        self.inflight = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.connect_rtt: float | None = None

    def __repr__(self) -> str:
        return f"<Path {self.upstream} {self.endpoint.host} via {self.line.name} {self.pool!r}>"

    def _on_connect(self, seconds: float) -> None:
        self.connect_rtt = seconds

    def on_response_end(self, resp: object) -> None:
        self.inflight -= 1

    def on_failure(self, error: BaseException) -> None:
        self.failures += 1
        self.last_error = str(error)
        self.last_error_at = time.time()

    def status(self) -> dict[str, object]:
        """What /-/status shows for this path (no secrets: URLs here carry none)."""
        return {
            "upstream": self.upstream,
            "endpoint": self.endpoint.url,
            "line": self.line.name,
            "priority": self.endpoint.priority,
            "connect_ms": None if self.connect_rtt is None else round(self.connect_rtt * 1000, 2),
            "inflight": self.inflight,
            "active": self.pool.active,
            "idle": self.pool.idle,
            "requests": self.requests,
            "failures": self.failures,
            "last_error": self.last_error,
        }
