"""The `via` hop, sidecar side: what a request looks like on a path through a peer edgeproxy.

On a `via` path the target goes in absolute form (the endpoint's URL) with the line's token
and the endpoint's URL; the body crosses compressed (``compress``), or as a conversation
delta when a body sent to that edge lately shares a long prefix with it (deltas.py); the
answer comes back compressed and is decoded here, bounded, unless the client takes that
coding itself (not for SSE: events must be seen, to relay them whole and report a break
in-band). The edge's own refusals of the hop (our token, an origin it does not serve) fail
the path, not the request; a delta whose base the edge lost is sent again whole, on the same
path, unseen by the client. The request's priority class goes along (``x-edgeproxy-priority``:
the edge's admission queue caps it by the line's token there). One ``ViaHop`` per `via` line,
on the chains of its paths only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Final

from ..engine import Filter, SendAgain
from ..proto import codec
from ..proto.errors import ViaRefused
from ..proto.hop import BASE_HEADER, BASE_MISSING
from ..proto.priority import HEADER as PRIORITY_HEADER
from ..proto.priority import PRIORITIES, request_class
from .deltas import Bases
from .edge import HOP_SKIP, HOP_SKIP_CODED, MIN_COMPRESS

if TYPE_CHECKING:
    from ..engine import Attempt, Ctx, Reply
    from ..net.client import Response
    from ..routing.lines import Line
    from ..telemetry.metrics import Metrics

__all__ = ["SIDECAR_BASES", "SIDECAR_BASE_BYTES", "ViaHop", "sidecar_bases"]

# Recent bodies a `via` line keeps for deltas: at most this many, this many bytes in all.
SIDECAR_BASES: Final = 16
SIDECAR_BASE_BYTES: Final = 16 << 20
BASE_HEADER_BYTES: Final = BASE_HEADER.encode()
BASE_MISSING_BYTES: Final = BASE_MISSING.encode()
_PRIORITY_LINES: Final = {c: f"{PRIORITY_HEADER}: {c}\r\n".encode() for c in PRIORITIES}
# The edge's own refusals of the hop itself (our token, a target it does not serve, a delta
# base it lacks); its other errors (keys_refused, rate_limited...) are answers to pass on.
HOP_REFUSALS: Final = frozenset({b"unauthorized", b"forbidden", BASE_MISSING_BYTES})
# Response decoding: the bomb guard looks at the ratio only past this much output (a stream
# may be long and repetitive; memory stays bounded per step anyway).
RESPONSE_RATIO_FLOOR: Final = 8 << 20
# Request bodies of these types are compressed already (or nearly random): sent as they are.
_INCOMPRESSIBLE: Final = ("image/", "audio/", "video/", "application/zip", "application/gzip", "application/x-gzip")


def sidecar_bases() -> Bases:
    """The store of what a `via` line sent its edge lately (one per line)."""
    return Bases(SIDECAR_BASES, SIDECAR_BASE_BYTES, SIDECAR_BASE_BYTES // 4)


class _Sent:
    """What one request sent over `via` paths: the last compressed body (reused by a retry
    on another `via` path), and whether to send whole from now on (the edge lost a base)."""

    __slots__ = ("packed", "whole")

    def __init__(self) -> None:
        self.packed: tuple[bytes, str, bytes, tuple[str, int, int] | None] | None = None
        self.whole = False


class ViaHop(Filter):
    """The hop on the paths of one `via` line (see the module docstring)."""

    __slots__ = ("bases", "line", "metrics", "via_url")

    def __init__(self, line: Line, metrics: Metrics, bases: Bases) -> None:
        assert line.via is not None
        self.via_url = line.via.url  # the edge: a reload keeps ``bases`` while it stays the same
        self.line = line.name
        self.metrics = metrics
        self.bases = bases  # what we sent this edge lately

    async def upstream_request_filter(self, ctx: Ctx, attempt: Attempt) -> None:
        path = attempt.path
        hop = path.hop
        assert hop is not None
        attempt.origin = path.hop_origin  # absolute form: the edge knows which origin is meant
        coding, base = await self._body(ctx, attempt, hop.compress)
        attempt.drop(HOP_SKIP_CODED if coding is not None else HOP_SKIP)
        lines = attempt.lines
        lines.append(path.hop_headers)  # our token for the edge, and the endpoint meant
        lines.append(hop.accept(ctx.request.headers.get("accept-encoding")))
        priority = _priority(ctx)
        if priority is not None:
            lines.append(_PRIORITY_LINES[priority])
        if base is not None:
            digest, n, m = base
            lines.append(b"%s: %s:%d:%d\r\n" % (BASE_HEADER_BYTES, digest.encode(), n, m))
        if coding is not None:
            lines.append(b"Content-Encoding: " + coding.encode() + b"\r\n")
        attempt.decide = _decider(ctx)

    async def _body(
        self, ctx: Ctx, attempt: Attempt, coding: str | None
    ) -> tuple[str | None, tuple[str, int, int] | None]:
        """The body as it crosses: a delta when a body sent to that edge lately shares a long
        prefix with it; compressed unless that gains nothing (small, already compressed by
        the client or by nature, or so repetitive the edge's bomb guard would refuse it). Big
        bodies are compressed off the event loop. Returns the coding and delta it went as."""
        headers = ctx.request.headers
        if coding is None or "content-encoding" in headers or _incompressible(headers.get("content-type")):
            return None, None
        if ctx.body_stream is not None:
            ctx.body_stream = _encoded_stream(ctx.body_stream, codec.encoder(coding), self.metrics, self.line)
            ctx.body_length = None
            return coding, None
        body = attempt.body
        if body is None or len(body) < MIN_COMPRESS:
            return None, None
        sent: _Sent | None = ctx.local(self)
        if sent is None:
            sent = ctx.keep(self, _Sent())
        packed = sent.packed
        if packed is None or packed[0] is not body or packed[1] != coding or sent.whole:
            base = None if sent.whole else self.bases.best(body)
            rest = body if base is None else body[base[1] : len(body) - base[2]]
            wire = await codec.encode_whole(coding, rest)
            packed = sent.packed = (body, coding, wire, base)
            self.bases.add(body)
        wire, base = packed[2], packed[3]
        rest_len = len(body) - (base[1] + base[2] if base is not None else 0)
        sent_coding: str | None = coding
        if len(wire) > rest_len * 0.9 or rest_len > len(wire) * codec.safe_ratio(coding):
            if base is None:
                return None, None
            wire = body[base[1] : len(body) - base[2]]  # the rest as it is: not worth compressing
            sent_coding = None
        attempt.body = wire
        self.metrics.count_hop("sidecar", self.line, "up", len(body), len(wire))
        return sent_coding, base

    def upstream_response_filter(self, ctx: Ctx, attempt: Attempt, resp: Response) -> None:
        """The edge's own refusal (our token, or an origin it does not serve) says the line
        cannot carry this request, not that the origin said no; a body that already failed
        to decode is the path's failure, retried like a reset."""
        status = resp.status
        if status in (401, 403, 409) and (kind := resp.header(b"x-edgeproxy-error")) in HOP_REFUSALS:
            assert kind is not None
            if kind == BASE_MISSING_BYTES:
                # The edge no longer has the body our delta named: send it whole, same path.
                sent: _Sent | None = ctx.local(self)
                if sent is not None:
                    sent.whole = True
                raise SendAgain
            resp.release()
            raise ViaRefused(f"edge {self.line} refused the hop: {status} {kind.decode('latin-1')}")
        resp.check()

    def on_end(self, ctx: Ctx, reply: Reply | None) -> None:
        """Bytes before and after the hop's compression of the answer we decoded."""
        decoder = reply.resp.decoder if reply is not None else None
        if decoder is not None:
            self.metrics.count_hop("sidecar", self.line, "down", decoder.raw, decoder.wire)


def _incompressible(ctype: str | None) -> bool:
    return ctype is not None and ctype.lower().startswith(_INCOMPRESSIBLE)


def _decider(ctx: Ctx) -> Callable[[list[tuple[bytes, bytes]]], codec.Decoder | None]:
    """How a `via` response's body is handed to the client. A coding the client asked for
    passes through (not for SSE: events must be seen, to relay them whole and report a
    break in-band); any other is decoded here, bounded."""
    limit = ctx.state.config.limits.max_body
    wanted = ctx.request.headers.get("accept-encoding")

    def decide(headers: list[tuple[bytes, bytes]]) -> codec.Decoder | None:
        coding = None
        sse = False
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-encoding":
                coding = value.decode("latin-1").strip().lower()
            elif lname == b"content-type":
                sse = value[:17].lower() == b"text/event-stream"
        if coding is None or coding not in codec.DECODABLE:
            return None
        if not sse and codec.accepts(wanted, coding):
            return None
        return codec.decoder(coding, limit, RESPONSE_RATIO_FLOOR)

    return decide


async def _encoded_stream(
    chunks: AsyncIterator[bytes], encoder: codec.Encoder, metrics: Metrics, line: str
) -> AsyncIterator[bytes]:
    """A streamed request body, compressed for a `via` hop."""
    async for chunk in chunks:
        packed = encoder.process(chunk)
        if packed:
            yield packed
    yield encoder.finish()
    metrics.count_hop("sidecar", line, "up", encoder.raw, encoder.wire)


def _priority(ctx: Ctx) -> str | None:
    """The class the edge should queue this request in (it caps it by its own token): what the
    client asked for, capped by its token here, or its token's class if that is not the default."""
    client = ctx.client
    asked = ctx.request.headers.get(PRIORITY_HEADER)
    if asked is None:
        return client.priority if client.priority != "normal" else None
    return request_class(asked, client.priority, client.max_priority)
