"""The edge role: what a peer edgeproxy does with hop requests from sidecars' `via` lines.

A hop request carries the endpoint's URL as its target (absolute form, like a request to a
forward proxy): ``POST https://api.openai.com/v1/chat/completions``, with the line's token in
``x-edgeproxy-token``. The edge serves it only if that exact origin (scheme, host, port) is one
of its own endpoints and the target lies under that endpoint's base path; the request then
goes through the usual attempt loop, restricted to that endpoint's paths. Anything else is a
403: a caller can never make an edge connect to a host of its choosing.

Probes from sidecars (``x-edgeproxy-probe``) are answered here, without touching the origin,
with the edge's own best RTT to it, so the sidecar scores the whole path.

``EdgeRole`` is a route filter of every listener (the engine offers it every request whose
target is not in origin form) and the first filter of the chains it routes hop requests to:
it decodes the sidecar's compressed body (bounded), rebuilds conversation deltas (deltas.py),
asks the origin for identity and compresses the answer for the hop, flushing per write.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from aiohttp import web

from ..config import norm_host
from ..engine import Filter, Transform
from ..proto import codec
from ..proto.errors import BadEncoding, BodyTooLarge, Forbidden, HopBaseUnknown, Unauthorized, UnsupportedEncoding
from ..proto.hop import BASE_HEADER, ENDPOINT_HEADER, ORIGIN_RTT_HEADER, PROBE_HEADER, TOKEN_HEADER
from ..proto.target import has_unsafe_segment
from .deltas import MIN_BASE, Bases

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ..config import EndpointConfig
    from ..engine import Attempt, Chain, Ctx, Reply
    from ..routing.state import Upstream
    from ..telemetry.metrics import Metrics

__all__ = ["HOP_SKIP", "HOP_SKIP_CODED", "EdgeRole", "probe_answer", "split_target"]

PROBE_POLL: Final = 0.01
# Client headers not passed on over a hop, beyond every request's (the hop's own x-edgeproxy-*
# headers go by their prefix, head.py): Accept-Encoding, which each side sets itself (the
# sidecar the hop's codings, the edge identity), and Content-Encoding when a side (de)coded
# the body.
HOP_SKIP: Final = frozenset({b"accept-encoding"})
HOP_SKIP_CODED: Final = HOP_SKIP | {b"content-encoding"}
IDENTITY: Final = b"Accept-Encoding: identity\r\n"
# Bodies smaller than this cross the hop as they are: compressing them gains nothing.
MIN_COMPRESS: Final = 256
# Whole bodies from this size on are decompressed in a thread, not on the event loop.
THREAD_MIN: Final = codec.THREAD_MIN


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
    if has_unsafe_segment(target):
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


class _Hop:
    """What the edge knows about one hop request."""

    __slots__ = ("accept", "compressor", "decoded")

    def __init__(self, accept: list[str]) -> None:
        self.accept = accept  # the codings the sidecar takes answers in, its order
        self.decoded = False  # its body came compressed and the origin gets it plain
        self.compressor: _Compressor | None = None


class _Compressor(Transform):
    """The hop's compression of a streamed answer, flushed per write (an event is decodable
    at the sidecar as soon as it arrives)."""

    __slots__ = ("encoder",)

    def __init__(self, coding: str) -> None:
        self.encoder = codec.encoder(coding)

    def process(self, data: bytes) -> bytes:
        return self.encoder.process(data) + self.encoder.flush()

    def finish(self) -> bytes:
        return self.encoder.finish()


class EdgeRole(Filter):
    """The edge role (see the module docstring). One per pipeline; ``chains`` maps each
    upstream to the chain its hop requests run through (this filter first)."""

    __slots__ = ("bases", "chains", "metrics")

    def __init__(self, metrics: Metrics, bases: Bases) -> None:
        self.metrics = metrics
        self.bases = bases  # recent hop bodies: the bases of sidecars' deltas (kept across reloads)
        self.chains: dict[str, Chain] = {}

    # -- route -----------------------------------------------------------------------------
    def route_filter(self, ctx: Ctx) -> Chain | None:
        """Check the sidecar's token, then that the target is one of our own endpoints
        (exact origin, under its base path). Never an origin the caller chose."""
        headers = ctx.request.headers
        auth = ctx.auth
        if not auth.required:
            raise Forbidden("hop requests (absolute-form targets) need a listener with tokens (the edge role)")
        client = auth.identify(headers.get(TOKEN_HEADER))
        if client is None:
            raise Unauthorized("missing or wrong x-edgeproxy-token")
        ctx.client = client
        split = split_target(ctx.raw_path)
        found = ctx.state.hop_route(*split, headers.get(ENDPOINT_HEADER)) if split is not None else None
        if found is None:
            shown = ctx.raw_path.split("?", 1)[0][:200]
            raise Forbidden(f"this edge does not serve {shown!r} (not one of its endpoints)")
        upstream, endpoint = found
        assert split is not None
        ctx.upstream = upstream
        ctx.pin = endpoint.url
        ctx.target = split[3]
        ctx.keep(self, _Hop(codec.accepted(headers.get("accept-encoding"))))
        return self.chains[upstream.name]

    async def request_filter(self, ctx: Ctx) -> web.StreamResponse | None:
        if PROBE_HEADER in ctx.request.headers:
            assert ctx.upstream is not None and ctx.pin is not None
            ctx.metered = False  # a sidecar's probe: logged, not counted as traffic
            return await probe_answer(ctx.upstream, ctx.upstream.endpoint(ctx.pin), ctx.state.config.probe.timeout)
        return None

    # -- request body ----------------------------------------------------------------------
    async def request_body_filter(self, ctx: Ctx) -> None:
        """The body as the origin gets it: decoded, put back together from a delta, and kept
        as a base for the next turn of the same conversation."""
        hop: _Hop = ctx.local(self)
        coding = ctx.body_coding
        limit = ctx.state.config.limits.max_body
        if coding is not None:
            coding = coding.strip().lower()
            if coding in codec.DECODABLE:
                hop.decoded = True  # the sidecar compressed it for the hop: the origin gets it plain
                ctx.body_coding = None
            elif coding == "zstd":  # a hop coding this edge cannot undo: never forwarded as it is
                raise UnsupportedEncoding(
                    "this edge cannot decode zstd request bodies (pip install 'edgeproxy[zstd]' on the edge,"
                    " or compress: br on the sidecar's line)"
                )
        if ctx.body_stream is not None:
            if hop.decoded:
                assert coding is not None
                ctx.body_stream = _decoded_stream(ctx.body_stream, codec.decoder(coding, limit))
                ctx.body_length = None
            return
        body = ctx.body
        if body is None:
            return
        if hop.decoded:
            assert coding is not None
            body = await self._decode(coding, body, limit)
        delta = ctx.request.headers.get(BASE_HEADER)
        if delta is not None:
            digest, _, spans = delta.partition(":")
            head, _, tail = spans.partition(":")
            base = self.bases.get(digest)
            tail = tail or "0"
            if base is None or not (head.isdigit() and tail.isdigit()) or int(head) + int(tail) > len(base):
                raise HopBaseUnknown("this edge does not keep that base body (any more): send it whole")
            n, m = int(head), int(tail)
            if n + len(body) + m > limit:
                raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
            body = b"".join((base[:n], body, base[len(base) - m :] if m else b""))
        if len(body) >= MIN_BASE:
            self.bases.add(body)
        ctx.body = body

    async def _decode(self, coding: str, body: bytes, limit: int) -> bytes:
        decoder = codec.decoder(coding, limit)
        try:
            if len(body) < THREAD_MIN // 8:
                plain = decoder.feed(body)
            else:  # a big body: decoded off the event loop (the codecs release the GIL)
                plain = await asyncio.to_thread(decoder.feed, body)
            decoder.finish()
        except codec.TooLarge as exc:
            raise BodyTooLarge(f"request body {exc}") from None
        except codec.DecodeError as exc:
            raise BadEncoding(f"request body: {exc}") from None
        self.metrics.count_hop("edge", "", "up", len(plain), len(body))
        return plain

    # -- towards the origin ----------------------------------------------------------------
    async def upstream_request_filter(self, ctx: Ctx, attempt: Attempt) -> None:
        hop: _Hop = ctx.local(self)
        attempt.drop(HOP_SKIP_CODED if hop.decoded else HOP_SKIP)
        if attempt.path.hop is None:  # (on to a further edge, that hop's filter says what we take)
            attempt.lines.append(IDENTITY)  # we compress for the hop ourselves

    # -- back to the sidecar ---------------------------------------------------------------
    async def response_filter(self, ctx: Ctx, reply: Reply) -> None:
        """Compress the answer for the hop, as the sidecar asked (its first coding)."""
        hop: _Hop = ctx.local(self)
        if not hop.accept or ctx.method == "HEAD" or reply.status in (204, 304) or reply.encoded:
            return
        coding = hop.accept[0]
        body = reply.body
        if body is None:
            hop.compressor = _Compressor(coding)
            reply.transforms.append(hop.compressor)
            reply.headers.append(("Content-Encoding", coding))
            reply.length = None
            return
        if len(body) < MIN_COMPRESS:
            return
        wire = await codec.encode_whole(coding, body)
        if len(body) <= len(wire) * codec.safe_ratio(coding):  # (else the sidecar's guard would refuse it)
            self.metrics.count_hop("edge", "", "down", len(body), len(wire))
            reply.body = wire
            reply.headers.append(("Content-Encoding", coding))

    def on_end(self, ctx: Ctx, reply: Reply | None) -> None:
        hop: _Hop | None = ctx.local(self)
        if hop is not None and hop.compressor is not None:
            enc = hop.compressor.encoder
            self.metrics.count_hop("edge", "", "down", enc.raw, enc.wire)


async def _decoded_stream(chunks: AsyncIterator[bytes], decoder: codec.Decoder) -> AsyncIterator[bytes]:
    """A streamed hop body, decompressed on the way (bounded like any other)."""
    try:
        async for chunk in chunks:
            plain = decoder.feed(chunk)
            if plain:
                yield plain
        decoder.finish()
    except codec.TooLarge as exc:
        raise BodyTooLarge(f"request body {exc}") from None
    except codec.DecodeError as exc:
        raise BadEncoding(f"request body: {exc}") from None
