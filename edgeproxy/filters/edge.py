"""The edge role: what a peer edgeproxy does with hop requests from sidecars' `via` lines.

A hop request carries the endpoint's URL as its target (absolute form, like a request to a
forward proxy): ``POST https://api.openai.com/v1/chat/completions``, with the line's token in
``x-edgeproxy-token``. The edge serves it only if that exact origin (scheme, host, port) is one
of its own endpoints and the target lies under that endpoint's base path; the request then
goes through the usual attempt loop, restricted to that endpoint's paths. Anything else is a
403: a caller can never make an edge connect to a host of its choosing.

Probes from sidecars (``x-edgeproxy-probe``) are answered here, without touching the origin,
with the edge's own best RTT to it, so the sidecar scores the whole path.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

from aiohttp import web

from ..config import norm_host

if TYPE_CHECKING:
    from ..config import EndpointConfig
    from ..routing.state import Upstream

__all__ = [
    "BASE_HEADER",
    "ENDPOINT_HEADER",
    "ORIGIN_RTT_HEADER",
    "PROBE_HEADER",
    "AuthThrottle",
    "Bases",
    "body_hash",
    "edge_bases",
    "probe_answer",
    "split_target",
]

PROBE_HEADER: Final = "x-edgeproxy-probe"
# The sidecar's endpoint URL, so an edge with two endpoints at one origin knows which is meant.
ENDPOINT_HEADER: Final = "x-edgeproxy-endpoint"
# The edge's smoothed RTT to the origin (seconds) on its best healthy path, in a probe answer.
ORIGIN_RTT_HEADER: Final = "x-edgeproxy-origin-rtt"
PROBE_POLL: Final = 0.01


def split_target(raw: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, origin-form target) of an absolute-form request target, or None
    if it is not a plain http(s) URL (credentials, fragments, odd hosts are refused)."""
    try:
        parts = urlsplit(raw)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or parts.username is not None or parts.fragment or "#" in raw:
            return None
        host = norm_host(parts.hostname or "")
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        return None
    target = parts.path or "/"
    if any(unquote(segment) in (".", "..") for segment in target.split("/")):
        return None  # dot segments could climb out of the endpoint's base path at the origin
    if parts.query:
        target += "?" + parts.query
    return scheme, host, port, target


async def probe_answer(upstream: Upstream, endpoint: EndpointConfig, wait: float) -> web.Response:
    """How this edge reaches ``endpoint``: 200 with its best RTT, or 503 when no path to it
    is healthy (the sidecar's probe then fails, and the `via` path with it: the whole path is
    down, not just its first leg). Right after a start or reload the RTT may not be measured
    yet: the answer then waits for the first probe (up to ``wait``) rather than report none."""
    deadline = time.monotonic() + wait
    while True:
        now = time.monotonic()
        paths = [p for p in upstream.paths if p.endpoint.url == endpoint.url and p.health.is_healthy(now)]
        rtts = [p.estimator.srtt for p in paths if p.estimator.srtt is not None]
        if rtts or not paths or now >= deadline:
            break
        await asyncio.sleep(PROBE_POLL)
    if not paths:
        body = b'{"edge":"no healthy line to that origin"}'
        headers = {"x-edgeproxy-error": "path_down"}
        return web.Response(status=503, body=body, content_type="application/json", headers=headers)
    headers = {ORIGIN_RTT_HEADER: f"{min(rtts):.6f}"} if rtts else {}
    return web.Response(status=200, body=b'{"edge":"ok"}', content_type="application/json", headers=headers)


def _peer_key(peer: str | None) -> str:
    """Who is guessing: an IPv4 address, or an IPv6 /64 (one host usually has a whole /64)."""
    if not peer:
        return "local"
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if ip.version == 6 and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)


class AuthThrottle:
    """Slows down guessing: after FREE wrong tokens from one address within WINDOW seconds,
    each further refusal is delayed (doubling, up to MAX_DELAY) and its connection closed.
    Right tokens are never delayed. Memory is bounded (oldest addresses forgotten first)."""

    FREE: Final = 5
    WINDOW: Final = 60.0
    FIRST_DELAY: Final = 0.1
    MAX_DELAY: Final = 5.0
    MAX_PEERS: Final = 10_000
    MAX_COUNT: Final = 64  # far past MAX_DELAY; keeps the arithmetic small

    __slots__ = ("_fails",)

    def __init__(self) -> None:
        self._fails: dict[str, tuple[int, float]] = {}

    def on_failure(self, peer: str | None) -> float:
        """Record a wrong token from ``peer``; the delay its answer should wait (seconds)."""
        key = _peer_key(peer)
        now = time.monotonic()
        count, last = self._fails.pop(key, (0, now))
        if now - last > self.WINDOW:
            count = 0
        count = min(count + 1, self.MAX_COUNT)
        self._fails[key] = (count, now)  # re-inserted: the dict stays in last-seen order
        if len(self._fails) > self.MAX_PEERS:
            del self._fails[next(iter(self._fails))]
        if count <= self.FREE:
            return 0.0
        return float(min(self.MAX_DELAY, self.FIRST_DELAY * 2 ** (count - self.FREE - 1)))


# -- conversation deltas -------------------------------------------------------------------
#
# A chat request re-sends the whole conversation every turn: turn N's body is turn N-1's with
# a few messages more. So a sidecar that sent body B over a `via` line may send the next one as
# "the first n bytes of B (named by its hash), then this compressed suffix", and the edge, which
# kept B, puts it back together. If the edge no longer has B it answers 409 `hop_base_unknown`
# and the sidecar sends the whole body at once, on the same path: nothing for the client to see.

BASE_HEADER: Final = "x-edgeproxy-base"  # "<hash>:<prefix length>:<suffix length>"
BASE_MISSING: Final = "hop_base_unknown"
MIN_BASE: Final = 4096  # bodies smaller than this are not kept (nor worth a delta)
MIN_PREFIX: Final = 2048  # a shared prefix shorter than this is not worth naming
# Bodies an edge keeps as bases, for all sidecars: at most this many, this many bytes in all.
EDGE_BASES: Final = 256
EDGE_BASE_BYTES: Final = 64 << 20


def body_hash(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def edge_bases() -> Bases:
    """The store an edge keeps its bases in (one per process, shared by its listeners)."""
    return Bases(EDGE_BASES, EDGE_BASE_BYTES, EDGE_BASE_BYTES // 4)


class Bases:
    """Recent bodies by hash, least recently used dropped first, bounded in count and bytes.
    The sidecar keeps one per `via` line (what it sent that edge); the edge one for all."""

    __slots__ = ("_bodies", "_bytes", "max_body", "max_bytes", "max_count")

    def __init__(self, max_count: int, max_bytes: int, max_body: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.max_body = max_body
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._bodies)

    def add(self, body: bytes, digest: str | None = None) -> str | None:
        """Keep ``body`` (if its size is worth it); its hash, or None if not kept."""
        if not MIN_BASE <= len(body) <= self.max_body:
            return None
        digest = digest or body_hash(body)
        old = self._bodies.pop(digest, None)
        if old is not None:
            self._bytes -= len(old)
        self._bodies[digest] = body
        self._bytes += len(body)
        while len(self._bodies) > self.max_count or self._bytes > self.max_bytes:
            _, dropped = self._bodies.popitem(last=False)
            self._bytes -= len(dropped)
        return digest

    def get(self, digest: str) -> bytes | None:
        body = self._bodies.get(digest)
        if body is not None:
            self._bodies.move_to_end(digest)
        return body

    def best(self, body: bytes) -> tuple[str, int, int] | None:
        """The kept body sharing the longest prefix with ``body`` (at least MIN_PREFIX bytes):
        its hash, the prefix length, and the length of the suffix they also share after it
        (the tools and settings a request carries after its messages). Most recent first; a
        cheap first-bytes check skips the rest, so this costs a few memcmp calls a candidate."""
        if len(body) < MIN_BASE:
            return None
        head = body[:64]
        found: tuple[str, int] | None = None
        for digest in reversed(self._bodies):
            base = self._bodies[digest]
            if base[:64] != head:
                continue
            n = _common_prefix(base, body)
            if n >= MIN_PREFIX and (found is None or n > found[1]):
                found = (digest, n)
        if found is None:
            return None
        digest, n = found
        return digest, n, _common_suffix(self._bodies[digest], body, n)


def _common_suffix(a: bytes, b: bytes, skip: int) -> int:
    """How many bytes ``a`` and ``b`` share at their ends, not counting their first ``skip``."""
    end = min(len(a), len(b)) - skip
    if end <= 0:
        return 0
    ma, mb = memoryview(a)[::-1], memoryview(b)[::-1]
    return _common_prefix_views(ma[:end], mb[:end])


def _common_prefix(a: bytes, b: bytes) -> int:
    return _common_prefix_views(memoryview(a), memoryview(b))


def _common_prefix_views(ma: memoryview, mb: memoryview) -> int:
    end = min(len(ma), len(mb))
    block = 4096
    i = 0
    while i < end and ma[i : i + block] == mb[i : i + block]:
        i += block
    if i >= end:
        return end
    lo, hi = i, min(i + block, end)  # the first difference is in [lo, hi)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ma[lo:mid] == mb[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
