"""One exception family for everything that can go wrong while proxying a request.

Each error records where it came from (``downstream``: the client, ``upstream``: the origin or
the line to it, ``internal``: us) and whether another attempt is safe (``retry``). The engine
asks the error, never the exception type, whether to try again (Pingora's ``set_retry``).
``ERRORS`` maps each kind to the HTTP status and the wording a client sees.
"""

from __future__ import annotations

import asyncio
from typing import Final

__all__ = [
    "ERRORS",
    "BadEncoding",
    "BodyTimeout",
    "BodyTooLarge",
    "BrowserRefused",
    "Busy",
    "ClientError",
    "ConnectError",
    "ConnectTimeout",
    "FirstEventTimeout",
    "Forbidden",
    "HopBaseUnknown",
    "KeysRefused",
    "NoRoute",
    "Overloaded",
    "PathDown",
    "PoolExhausted",
    "ProxyError",
    "RateLimited",
    "ShuttingDown",
    "Unauthorized",
    "UnsafePath",
    "UnsupportedEncoding",
    "UpstreamBadEncoding",
    "UpstreamProtocolError",
    "UpstreamReset",
    "UpstreamTimeout",
    "VersionNotSupported",
    "ViaRefused",
]


class ProxyError(Exception):
    """Base of every error edgeproxy raises on the request path.

    ``kind`` keys into ``ERRORS``; ``retry`` says whether another attempt on another path may
    succeed without the client noticing (only ever true before commit); ``sent`` says whether
    any of the request may have reached the origin.
    """

    kind: str = "internal"
    source: str = "internal"
    retry: bool = False
    sent: bool = False
    # The `failover.retry_on` class this outcome belongs to ("" = never configurable).
    outcome: str = ""
    # Whether the failure counts against the path's health (False: it says nothing about it).
    blames_line: bool = True
    # Seconds the client should wait before trying again (a Retry-After header), if known.
    retry_after: float | None = None

    def __init__(self, message: str, *, retry: bool | None = None, sent: bool | None = None) -> None:
        super().__init__(message)
        if retry is not None:
            self.retry = retry
        if sent is not None:
            self.sent = sent

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.kind


class ConnectError(ProxyError, ConnectionError):
    """The connection to the origin (or its line) could not be set up; nothing was sent."""

    kind = "connect"
    source = "upstream"
    retry = True
    outcome = "connect"


class ConnectTimeout(ConnectError, asyncio.TimeoutError):
    kind = "connect_timeout"


class UpstreamReset(ProxyError, ConnectionResetError):
    """The origin closed or reset the connection before a complete response."""

    kind = "reset"
    source = "upstream"
    retry = True
    outcome = "reset"


class UpstreamTimeout(ProxyError, asyncio.TimeoutError):
    """No response headers (or no next bytes) within the configured time."""

    kind = "timeout"
    source = "upstream"
    retry = True
    sent = True
    outcome = "timeout"


class FirstEventTimeout(UpstreamTimeout):
    """SSE headers came, but no first event within `first_event_timeout` (before commit)."""

    kind = "first_event_timeout"


class PathDown(UpstreamReset):
    """The prober declared this attempt's path dead while the attempt waited for an answer."""

    kind = "path_down"
    sent = True  # the request may have reached the origin: no invisible same-path resend
    blames_line = False  # the prober counted it: once per rescue, however many requests it moved


class ConnectAbandoned(ConnectError):
    """The prober declared this attempt's path dead while it was still connecting: nothing
    was sent, it goes elsewhere at once."""

    kind = "path_down"
    blames_line = False  # (counted once per rescue, as PathDown)


class PoolExhausted(ConnectTimeout):
    """Every connection of the path's pool stayed busy: the path is full, not broken."""

    kind = "pool_exhausted"
    blames_line = False


class UpstreamProtocolError(ProxyError):
    """The origin answered something that is not valid HTTP/1.1."""

    kind = "protocol"
    source = "upstream"
    retry = True
    sent = True
    outcome = "reset"


class UpstreamBadEncoding(UpstreamProtocolError):
    """The response's compressed body is broken, cut short, or a decompression bomb."""

    kind = "bad_encoding_upstream"


class ViaRefused(ConnectError):
    """A peer edge refused our hop (wrong token, or it does not serve that origin): the
    `via` line cannot carry this request; another path may."""

    kind = "via_refused"


class ComeBackLater(ProxyError):
    """An error whose answer says when to try again (a Retry-After header)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(ComeBackLater):
    """Every key that could serve the request is rate-limited (or out of local headroom) for
    longer than `failover.queue_timeout`: the client gets a 429 with ``retry_after``."""

    kind = "rate_limited"


class Overloaded(ComeBackLater):
    """The upstream's admission queue is full, or the request waited in it for
    `admission.queue_timeout`: the client gets a 503 with ``retry_after``."""

    kind = "overloaded"


class KeysRefused(ProxyError):
    """The origin refused every key we could inject (401/403): they stay disabled until the
    next reload, so the request is not sent with any of them."""

    kind = "keys_refused"


class ClientError(ProxyError):
    """The client sent something we refuse (malformed, truncated body...)."""

    kind = "bad_request"
    source = "downstream"


class BodyTooLarge(ClientError):
    kind = "too_large"


class Unauthorized(ClientError):
    kind = "unauthorized"


class NoRoute(ClientError):
    kind = "no_route"


class Forbidden(ClientError):
    """An edge refuses a hop to an origin it does not serve (no open relay)."""

    kind = "forbidden"


class BrowserRefused(ClientError):
    """A request from a web page the listener does not serve: a Host that is not one of its
    names (DNS rebinding), an Origin not allowed, or a cross-site request (engine/guard.py)."""

    kind = "browser_refused"


class HopBaseUnknown(ClientError):
    """A hop request's delta names a body this edge does not keep (any more): the sidecar
    sends the body whole instead."""

    kind = "hop_base_unknown"


class BodyTimeout(ClientError):
    """The client stopped sending its request body (``limits.body_timeout``)."""

    kind = "body_timeout"


class LeaderGone(ComeBackLater):
    """The identical request this one was to share an answer with went away before it was
    sent (engine/flight.py): nothing was fetched; sending again fetches it."""

    kind = "shared_request_gone"


class Busy(ComeBackLater):
    """We hold as many request bodies as ``limits.buffer_memory`` allows: come back shortly."""

    kind = "busy"


class ShuttingDown(ProxyError):
    """The drain ended with this answer still being relayed (``drain_timeout``)."""

    kind = "shutting_down"
    blames_line = False  # says nothing about the path


class UnsupportedEncoding(ClientError):
    """A request body in a content coding we cannot decode where we must (a hop's zstd at an
    edge without the zstandard module)."""

    kind = "unsupported_encoding"


class UnsafePath(ClientError):
    """A request path with dot segments or encoded separators: never sent on with a key."""

    kind = "unsafe_path"


class VersionNotSupported(ClientError):
    """Not an HTTP/1.x request (an HTTP/2 request line over HTTP/1 framing)."""

    kind = "http_version"


class BadEncoding(ClientError):
    """The request body's Content-Encoding does not decode (broken or cut-short data)."""

    kind = "bad_encoding"


# kind -> (status, error type as the client sees it, short code). One table, used by
# providers.error_response() to shape the body in the client's own protocol.
ERRORS: Final[dict[str, tuple[int, str, str]]] = {
    "bad_request": (400, "invalid_request_error", "bad_request"),
    "unauthorized": (401, "authentication_error", "invalid_edgeproxy_token"),
    "forbidden": (403, "permission_error", "hop_target_not_served"),
    "browser_refused": (403, "permission_error", "browser_request_refused"),
    "bad_encoding": (400, "invalid_request_error", "bad_content_encoding"),
    "unsafe_path": (400, "invalid_request_error", "unsafe_path"),
    "unsupported_encoding": (415, "invalid_request_error", "unsupported_content_encoding"),
    "body_timeout": (408, "invalid_request_error", "request_body_timeout"),
    "busy": (503, "api_error", "buffer_memory_full"),
    "shared_request_gone": (503, "api_error", "shared_request_gone"),
    "shutting_down": (503, "api_error", "edgeproxy_shutting_down"),
    "http_version": (505, "invalid_request_error", "http_version_not_supported"),
    "hop_base_unknown": (409, "invalid_request_error", "hop_base_unknown"),
    "no_route": (404, "not_found_error", "no_route"),
    "too_large": (413, "request_too_large", "body_too_large"),
    "connect": (502, "api_error", "upstream_unreachable"),
    "connect_timeout": (504, "api_error", "upstream_connect_timeout"),
    "reset": (502, "api_error", "upstream_reset"),
    "protocol": (502, "api_error", "upstream_protocol_error"),
    "bad_encoding_upstream": (502, "api_error", "upstream_bad_encoding"),
    "via_refused": (502, "api_error", "edge_refused_hop"),
    "timeout": (504, "api_error", "upstream_timeout"),
    "first_event_timeout": (504, "api_error", "upstream_first_event_timeout"),
    "path_down": (502, "api_error", "upstream_path_down"),
    "pool_exhausted": (503, "api_error", "upstream_pool_exhausted"),
    "overloaded": (503, "overloaded_error", "overloaded"),
    "rate_limited": (429, "rate_limit_error", "rate_limit_exceeded"),
    "keys_refused": (401, "authentication_error", "upstream_keys_refused"),
    "internal": (500, "api_error", "internal_error"),
}
