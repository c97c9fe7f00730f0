"""Client connections: per-address caps and the header timeout, under aiohttp's server.

aiohttp's low-level server bounds an idle connection (``keepalive_timeout``) but not one that
sends a request head a byte at a time (slowloris), and it cannot count connections per client
address. ``GuardedServer`` hands out ``GuardedHandler``s, aiohttp's own request handler with
both: a connection past ``limits.max_connections_per_address`` (an IPv6 /64 counts as one
address) is closed as it opens, and a head that is not whole ``limits.header_timeout`` after
its first byte closes the connection. The request body's own timeout is the engine's
(engine/body.py): it reads the body.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from ..engine.auth import peer_key
from ..proto.providers import error_body

if TYPE_CHECKING:
    from ..config import LimitsConfig
    from ..telemetry.metrics import Metrics

__all__ = ["ConnectionGuard", "GuardedServer"]

log = logging.getLogger("edgeproxy")


class ConnectionGuard:
    """One listener's connections per client address, and the limits they are held to
    (swapped on reload: connections already open keep counting against the new caps)."""

    __slots__ = ("by_address", "limits", "metrics")

    def __init__(self, limits: LimitsConfig, metrics: Metrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.by_address: dict[str, int] = {}

    def admit(self, peer: str | None) -> str | None:
        """Count a new connection from ``peer``; its address key, or None if over the cap."""
        key = peer_key(peer)
        n = self.by_address.get(key, 0)
        if n >= self.limits.max_connections_per_address:
            self.metrics.client_limits.inc(("max_connections_per_address",))
            return None
        self.by_address[key] = n + 1
        return key

    def release(self, key: str) -> None:
        n = self.by_address.get(key, 0) - 1
        if n > 0:
            self.by_address[key] = n
        else:
            self.by_address.pop(key, None)


class GuardedHandler(RequestHandler):  # type: ignore[misc]
    """aiohttp's request handler, held to the per-address cap and the header timeout."""

    __slots__ = ("_address", "_body", "_guard", "_head_timer")

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager.guard
        self._address: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: Any = None  # the last request's body stream, until it ends

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        # (a unix socket's peers have no address: its clients are local, not one "address")
        ip = peer[0] if isinstance(peer, tuple) and peer else None
        address = self._guard.admit(ip) if ip else ""
        if address is None:
            cast(asyncio.Transport, transport).abort()  # over the cap: nothing read, nothing answered
            return
        self._address = address
        # (A connection that sends nothing is aiohttp's: it closes it after keepalive_timeout.
        # Not header_timeout: a sidecar's warm connections to an edge wait idle on purpose.)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._address is None:
            return  # refused in connection_made: aiohttp never saw it
        if self._address:
            self._guard.release(self._address)
        self._address = None
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._address is None:
            return
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:
            self._body = self._messages[-1][1]  # (bytes that follow may be this body's)
        # A head is being read when no whole request is queued, none is being served, and the
        # last one's body has ended (bytes of a body an early answer left unread are read and
        # dropped by aiohttp: not a head): from its first byte it has header_timeout.
        if self._messages or self._request_in_progress:
            if self._head_timer is not None:
                self._stop_head_timer()
        elif self._head_timer is None and not self._force_close and (self._body is None or self._body.is_eof()):
            self._head_timer = self._loop.call_later(self._guard.limits.header_timeout, self._head_too_slow)

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """A request aiohttp could not parse (a bad request line or header): answered as JSON
        in the shape API clients read (OpenAI's: the parse failed before any route was known),
        never aiohttp's text page; the connection closes. Anything else that reaches here
        (our handler never raises; a bug would) is logged and answered as an internal error."""
        if request.writer.output_size > 0:
            raise ConnectionError("the answer was under way: no error page can follow")
        if isinstance(exc, HttpProcessingError):
            kind, text = "bad_request", f"malformed HTTP request: {message or exc.message}"
        else:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            kind, text = "internal", "edgeproxy internal error"
        _, body = error_body("openai", kind, text)
        resp = web.Response(
            status=status if kind == "bad_request" else 500,
            body=body,
            headers={"Content-Type": "application/json", "x-edgeproxy-error": kind},
        )
        resp.force_close()
        return resp

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not (self._messages or self._request_in_progress):
            self._guard.metrics.client_limits.inc(("header_timeout",))
            self.force_close()


class GuardedServer(web.Server):  # type: ignore[misc]
    """aiohttp's low-level server whose connections are ``GuardedHandler``s."""

    def __init__(self, handler: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.guard = guard

    def __call__(self) -> RequestHandler:
        # (the idle timeout as the config says now: a reload applies to new connections)
        kwargs = {**self._kwargs, "keepalive_timeout": self.guard.limits.keepalive_timeout}
        return GuardedHandler(self, loop=self._loop, **kwargs)
