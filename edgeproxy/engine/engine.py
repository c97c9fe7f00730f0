"""The engine: one client request through accept, route, body, plan, attempt, relay and log.

Each phase is a small method with one job; per-request state lives in one slotted ``Ctx``.
The attempt loop (retries, hedging, health feedback) is ``failover.Failover``, which the
engine inherits. Before the first byte goes to the client (commit) an error becomes a response
in the provider's shape; after it, only an in-band SSE error or a cut connection is honest.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Final

import orjson
from aiohttp import web

from ..filters import usage
from ..filters.edge import (
    BASE_HEADER,
    ENDPOINT_HEADER,
    MIN_BASE,
    PROBE_HEADER,
    AuthThrottle,
    Bases,
    probe_answer,
    split_target,
)
from ..net.client import Response
from ..proto import codec
from ..proto.errors import (
    BadEncoding,
    BodyTooLarge,
    ClientError,
    Forbidden,
    HopBaseUnknown,
    NoRoute,
    ProxyError,
    Unauthorized,
)
from ..proto.providers import CREDENTIAL_HEADERS, client_credential, error_body, sse_error_event, token_matches
from .attempts import Failover
from .relay import push_body

if TYPE_CHECKING:
    from ..config import ListenerConfig
    from ..filters.keypool import Key
    from ..routing.lines import Path
    from ..routing.state import State, Upstream
    from ..telemetry.accesslog import AccessLog
    from ..telemetry.metrics import Metrics

__all__ = ["Ctx", "Engine"]

log = logging.getLogger("edgeproxy")

# RFC 9110 7.6.1 hop-by-hop fields, plus what we always set ourselves (host, framing) and our
# own token, which must never reach an origin.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
REQUEST_SKIP: Final = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-edgeproxy-token"}
# On either side of an edge hop we set Accept-Encoding ourselves (the hop's codings, or
# identity towards the origin); Content-Encoding too when we (de)compressed the body.
HOP_SKIP: Final = (
    REQUEST_SKIP | {b"accept-encoding"} | {h.encode() for h in (PROBE_HEADER, ENDPOINT_HEADER, BASE_HEADER)}
)
HOP_SKIP_CODED: Final = HOP_SKIP | {b"content-encoding"}
# Bodies smaller than this cross the hop as they are: compressing them gains nothing.
MIN_COMPRESS: Final = 256
BASE_HEADER_BYTES: Final = BASE_HEADER.encode()
# Whole bodies from this size on are (de)compressed in a thread, not on the event loop.
THREAD_MIN: Final = 1 << 20
# Response decoding at the sidecar: the bomb guard looks at the ratio only past this much
# output (a stream may be long and repetitive; memory stays bounded per step anyway).
RESPONSE_RATIO_FLOOR: Final = 8 << 20
# Request bodies of these types are compressed already (or nearly random): sent as they are.
_INCOMPRESSIBLE: Final = ("image/", "audio/", "video/", "application/zip", "application/gzip", "application/x-gzip")
RESPONSE_SKIP: Final = HOP_BY_HOP | {b"content-length"}
# Methods whose requests carry a body even when empty (we always send Content-Length for them).
BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
STATUS_CLIENT_CLOSED: Final = 499  # nginx's convention for "client went away first"
# Request ids: a random per-process prefix and a counter; unique without a uuid4 per request.
_RID_PREFIX: Final = os.urandom(6).hex()
_rid_counter = itertools.count(1)


class Ctx:
    """Everything about one request in flight, and what the access log records."""

    __slots__ = (
        "attempt_log",
        "base",
        "coding",
        "decoded",
        "encoder",
        "hop_accept",
        "packed",
        "pin",
        "target",
        "waited",
        "whole",
        "body",
        "body_stream",
        "bytes_in",
        "bytes_out",
        "committed",
        "error",
        "method",
        "path",
        "raw_path",
        "request",
        "request_id",
        "started",
        "state",
        "status",
        "streamed",
        "tried",
        "ttfb",
        "upstream",
        "keys",
        "key_retries",
        "counted",
        "disabled_key",
        "queued",
    )

    def __init__(self, request: web.BaseRequest, state: State) -> None:
        self.request = request
        self.state = state
        self.upstream: Upstream | None = None
        self.started = time.monotonic()
        self.request_id = ""
        self.method = request.method
        self.raw_path = request.raw_path
        self.body: bytes | None = None
        self.body_stream: AsyncIterator[bytes] | None = None
        self.tried: list[Path] = []
        self.path: Path | None = None
        self.status = 0
        self.ttfb: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.streamed = False
        self.committed = False
        self.error: str | None = None
        self.attempt_log: list[dict[str, object]] = []
        self.waited = False  # a 429's short Retry-After was waited out already
        # Edge role (a hop request from a sidecar): the endpoint it names, its origin-form
        # target, the codings the sidecar takes back, and whether we decoded its body.
        self.pin: str | None = None
        self.target: str | None = None
        self.hop_accept: list[str] | None = None
        self.decoded = False
        self.encoder: codec.Encoder | None = None
        # Sidecar role (a `via` path): the coding this attempt's body was sent in, and the
        # last compressed body (kept for a retry on another `via` path).
        self.coding: str | None = None
        self.packed: tuple[bytes, str, bytes, tuple[str, int, int] | None] | None = None
        # ... and the delta it was sent as (hash of the base, shared prefix and suffix), unless the edge
        # did not have the base (then ``whole``: sent whole from now on).
        self.base: tuple[str, int, int] | None = None
        self.whole = False
        self.keys: dict[Path, Key] | None = None  # the key injected on each path tried
        self.key_retries = 0  # attempts sent again with another key (429, 401, 403)
        self.disabled_key: Key | None = None  # the key a 401/403 disabled during this request
        self.counted = False  # the answer's rate-limit headers already counted its tokens
        self.queued = False  # waited for a rate-limited key to free up

    def stream_length(self) -> int | None:
        """The Content-Length of a streamed body as we send it (None: chunked)."""
        return None if self.coding is not None or self.decoded else self.request.content_length


def _incompressible(ctype: str | None) -> bool:
    return ctype is not None and ctype.lower().startswith(_INCOMPRESSIBLE)


def _set_request_id(ctx: Ctx) -> None:
    rid = ctx.request.headers.get("x-request-id")
    ok = rid is not None and len(rid) <= 200 and rid.isascii() and rid.isprintable()
    ctx.request_id = rid if ok else f"{_RID_PREFIX}{next(_rid_counter):012x}"  # type: ignore[assignment]


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


async def _encoded_stream(
    chunks: AsyncIterator[bytes], encoder: codec.Encoder, engine: Engine, line: str
) -> AsyncIterator[bytes]:
    """A streamed request body, compressed for a `via` hop."""
    async for chunk in chunks:
        packed = encoder.process(chunk)
        if packed:
            yield packed
    yield encoder.finish()
    engine.metrics.count_hop("sidecar", line, "up", encoder.raw, encoder.wire)


class Engine(Failover):
    """Runs requests through the phases. One per listener; the State is swapped on reload."""

    __slots__ = (
        "_inflight",
        "_throttle",
        "_tokens",
        "access",
        "bases",
        "listener",
        "metrics",
        "on_slow_path",
        "state",
    )

    def __init__(
        self,
        state: State,
        listener: ListenerConfig,
        metrics: Metrics,
        access: AccessLog,
        bases: Bases,
        on_slow_path: Callable[[Path], None] = lambda path: None,
    ) -> None:
        self.state = state
        # Called when an attempt waits for headers longer than its path's RTT suggests: the
        # prober checks the line at once instead of at its next interval.
        self.on_slow_path = on_slow_path
        self.listener = listener
        self.metrics = metrics
        self.access = access
        self._tokens = [t.encode() for t in listener.tokens]
        self._throttle = AuthThrottle()
        # Edge role: recent hop bodies, the bases of sidecars' deltas (shared by listeners).
        self.bases = bases
        self._inflight: set[Ctx] = set()

    def reconfigure(self, state: State, listener: ListenerConfig) -> None:
        """A reload: new requests see the new state and this listener's new tokens."""
        self.state = state
        self.listener = listener
        self._tokens = [t.encode() for t in listener.tokens]

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp's handler: never raises but CancelledError (the client went away)."""
        ctx = Ctx(request, self.state)
        self._inflight.add(ctx)
        response: web.StreamResponse | None = None
        try:
            response = await self._run(ctx)
            return response
        except ProxyError as exc:
            response = self._error_response(ctx, exc.kind, exc.message, exc.retry_after)
            if isinstance(exc, Unauthorized):
                delay = self._throttle.on_failure(request.remote)
                if delay:  # someone keeps guessing: make each guess slow, and reconnect
                    response.force_close()
                    await asyncio.sleep(delay)
            return response
        except asyncio.CancelledError:
            ctx.status, ctx.error = STATUS_CLIENT_CLOSED, ctx.error or "client_disconnected"
            raise
        except Exception:
            log.exception("internal error on %s %s", ctx.method, ctx.raw_path.split("?", 1)[0])
            if ctx.committed:
                raise
            response = self._error_response(ctx, "internal", "edgeproxy internal error")
            return response
        finally:
            self._inflight.discard(ctx)
            self._log(ctx)

    # -- phases ----------------------------------------------------------------------------
    async def _run(self, ctx: Ctx) -> web.StreamResponse:
        if ctx.raw_path[:1] == "/":
            upstream = self._route(ctx)
            self._accept(ctx, upstream)
        else:  # absolute form: a hop request from a sidecar's `via` line
            upstream = self._route_hop(ctx)
            if PROBE_HEADER in ctx.request.headers:
                assert ctx.pin is not None
                return await probe_answer(upstream, upstream.endpoint(ctx.pin), ctx.state.config.probe.timeout)
        await self._read_body(ctx)
        resp = await self._attempts(ctx, upstream)
        return await self._relay(ctx, upstream, resp)

    def _route(self, ctx: Ctx) -> Upstream:
        upstream = ctx.state.route(ctx.raw_path)
        if upstream is None:
            if self._tokens and not token_matches(ctx.request.headers.get("x-edgeproxy-token"), self._tokens):
                raise Unauthorized("missing or wrong x-edgeproxy-token")
            raise NoRoute(f"no upstream serves {ctx.raw_path.split('?', 1)[0]}")
        ctx.upstream = upstream
        _set_request_id(ctx)
        return upstream

    def _route_hop(self, ctx: Ctx) -> Upstream:
        """Edge role: check the sidecar's token, then that the target is one of our own
        endpoints (exact origin, under its base path). Never an origin the caller chose."""
        headers = ctx.request.headers
        _set_request_id(ctx)
        if not self._tokens:
            raise Forbidden("hop requests (absolute-form targets) need a listener with tokens (the edge role)")
        if not token_matches(headers.get("x-edgeproxy-token"), self._tokens):
            raise Unauthorized("missing or wrong x-edgeproxy-token")
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
        ctx.hop_accept = codec.accepted(headers.get("accept-encoding"))
        return upstream

    def _accept(self, ctx: Ctx, upstream: Upstream) -> None:
        if not self._tokens:
            return
        headers = ctx.request.headers
        token = headers.get("x-edgeproxy-token")
        if token is None and upstream.injects_keys:
            # The client's own credential header is free to carry our token: it will be
            # replaced by the endpoint's key. SDKs differ in which one they use (the Anthropic
            # SDK sends Authorization: Bearer as well as x-api-key), so any of them counts.
            for name in ("authorization", "x-api-key", "x-goog-api-key"):
                cred = headers.get(name)
                if cred is not None:
                    token = client_credential(cred)
                    break
        if not token_matches(token, self._tokens):
            raise Unauthorized("missing or wrong edgeproxy token (send it as x-edgeproxy-token)")

    async def _read_body(self, ctx: Ctx) -> None:
        request = ctx.request
        limits = ctx.state.config.limits
        length = request.content_length
        if length is not None and length > limits.max_body:
            raise BodyTooLarge(f"request body of {length} bytes is over the limit of {limits.max_body} bytes")
        if request.headers.get("expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        content = request.content
        coding = request.headers.get("content-encoding") if ctx.pin is not None else None
        if coding is not None:
            coding = coding.strip().lower()
            if coding in codec.DECODABLE:
                ctx.decoded = True  # the sidecar compressed it for the hop: the origin gets it plain
        try:
            if length is not None and length <= limits.replay_body:
                ctx.body = await content.readexactly(length) if length else b""
                ctx.bytes_in = length
                if ctx.pin is not None:
                    ctx.body = await self._hop_request_body(ctx, coding, ctx.body, limits.max_body)
                return
            if length is None and not request.body_exists:
                ctx.body = b"" if ctx.method in BODY_METHODS else None
                return
            # Unknown length, or too big to hold for a retry: buffer up to replay_body, then
            # stream the rest through.
            parts: list[bytes] = []
            size = 0
            while size <= limits.replay_body:
                chunk = await content.readany()
                if not chunk:
                    ctx.body = b"".join(parts)
                    ctx.bytes_in = size
                    if ctx.pin is not None:
                        ctx.body = await self._hop_request_body(ctx, coding, ctx.body, limits.max_body)
                    return
                parts.append(chunk)
                size += len(chunk)
                if size > limits.max_body:
                    raise BodyTooLarge(f"request body is over the limit of {limits.max_body} bytes")
        except asyncio.IncompleteReadError:
            raise ClientError("request body ended before its Content-Length") from None
        except ProxyError:
            raise
        except Exception as exc:  # aiohttp's payload errors: bad chunked framing and such
            raise ClientError(f"cannot read request body: {exc}") from None
        ctx.body_stream = self._stream_body(ctx, parts, size, limits.max_body)
        if ctx.decoded and coding is not None:
            ctx.body_stream = _decoded_stream(ctx.body_stream, codec.decoder(coding, limits.max_body))

    async def _hop_request_body(self, ctx: Ctx, coding: str | None, body: bytes, limit: int) -> bytes:
        """Edge role: a hop request's body as the origin gets it: decoded, put back together
        from a delta, and kept as a base for the next turn of the same conversation."""
        if ctx.decoded and coding is not None:
            body = await self._decode_body(coding, body, limit)
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
        return body

    async def _decode_body(self, coding: str, body: bytes, limit: int) -> bytes:
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

    async def _stream_body(self, ctx: Ctx, first: list[bytes], size: int, limit: int) -> AsyncIterator[bytes]:
        ctx.bytes_in = size
        for chunk in first:
            yield chunk
        first.clear()
        content = ctx.request.content
        while True:
            try:
                chunk = await content.readany()
            except Exception as exc:
                raise ClientError(f"cannot read request body: {exc}") from None
            if not chunk:
                return
            ctx.bytes_in += len(chunk)
            if ctx.bytes_in > limit:
                raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
            yield chunk

    def _body_for(self, ctx: Ctx, path: Path) -> bytes | None:
        """The request body for this path: the client's, or with the model renamed when the
        endpoint has a `models` map that names it. Only then is the body parsed (JSON)."""
        body = ctx.body
        renames = path.endpoint.models
        if not renames or not body or (ctx.request.headers.get("content-encoding") and not ctx.decoded):
            return body
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body  # not JSON: not ours to touch; the origin will say what is wrong
        if not isinstance(doc, dict) or not isinstance(doc.get("model"), str):
            return body
        new = path.endpoint.model_map().get(doc["model"])
        if new is None:
            return body
        doc["model"] = new
        return orjson.dumps(doc)

    async def _hop_body(self, ctx: Ctx, path: Path, body: bytes | None) -> bytes | None:
        """Sidecar role: the body as it crosses a `via` hop. A delta when a body sent to that
        edge lately shares a long prefix with it (the same conversation, a turn earlier: see
        edge.py); compressed unless that gains nothing (small, already compressed by the
        client or by nature, or so repetitive the edge's bomb guard would refuse it). Big
        bodies are compressed off the event loop."""
        ctx.coding = None
        ctx.base = None
        hop = path.hop
        assert hop is not None
        coding = hop.compress
        headers = ctx.request.headers
        if coding is None or "content-encoding" in headers or _incompressible(headers.get("content-type")):
            return body
        if ctx.body_stream is not None:
            ctx.coding = coding
            ctx.body_stream = _encoded_stream(ctx.body_stream, codec.encoder(coding), self, path.line.name)
            return body
        if body is None or len(body) < MIN_COMPRESS:
            return body
        packed = ctx.packed
        if packed is None or packed[0] is not body or packed[1] != coding or ctx.whole:
            base = None if ctx.whole else hop.bases.best(body)
            rest = body if base is None else body[base[1] : len(body) - base[2]]
            if len(rest) < THREAD_MIN:
                wire = codec.encode(coding, rest)
            else:
                wire = await asyncio.to_thread(codec.encode, coding, rest)
            packed = ctx.packed = (body, coding, wire, base)
            hop.bases.add(body)
        wire, base = packed[2], packed[3]
        rest_len = len(body) - (base[1] + base[2] if base is not None else 0)
        if len(wire) > rest_len * 0.9 or rest_len > len(wire) * codec.safe_ratio(coding):
            if base is None:
                return body
            wire = body[base[1] : len(body) - base[2]]  # the rest as it is: not worth compressing
        else:
            ctx.coding = coding
        ctx.base = base
        self.metrics.count_hop("sidecar", path.line.name, "up", len(body), len(wire))
        return wire

    def _request_head(self, ctx: Ctx, upstream: Upstream, path: Path, body: bytes | None) -> bytes:
        endpoint = path.endpoint
        target = ctx.target
        if target is None:
            rest = ctx.raw_path[len(upstream.prefix) :]
            target = endpoint.base_path + rest if rest[:1] != "?" else endpoint.base_path + "/" + rest
            if not target or target[0] != "/":
                target = "/" + target
        host = path.host_header
        key = ctx.keys.get(path) if ctx.keys is not None else None  # taken as planned: failover._take_key
        hop = path.hop
        # A `via` path names the endpoint in the target (absolute form) for the edge.
        out = [f"{ctx.method} {path.hop_origin}{target} HTTP/1.1\r\nHost: {host}\r\n".encode("latin-1")]
        skip = REQUEST_SKIP
        if hop is not None or ctx.pin is not None:
            skip = HOP_SKIP_CODED if ctx.coding is not None or ctx.decoded else HOP_SKIP
        connection_listed: set[bytes] = set()
        for name, value in ctx.request.raw_headers:
            lname = name.lower()
            if lname in skip:
                if lname == b"connection":
                    connection_listed.update(v.strip().lower() for v in value.split(b","))
                continue
            if key is not None and lname in CREDENTIAL_HEADERS:
                continue
            if lname == b"x-request-id":
                continue  # ours goes out below: the client's when it was sane, else a new one
            out.append(name + b": " + value + b"\r\n")
        if connection_listed:
            out = [out[0]] + [h for h in out[1:] if h.split(b":", 1)[0].lower() not in connection_listed]
        out.append(b"x-request-id: " + ctx.request_id.encode() + b"\r\n")
        if key is not None:
            out.append(upstream.auth_header + b": " + key.value + b"\r\n")
        if hop is not None:
            out.append(path.hop_headers)  # our token for the edge, and the endpoint meant
            out.append(hop.accept(ctx.request.headers.get("accept-encoding")))
            if ctx.base is not None:
                digest, n, m = ctx.base
                out.append(b"%s: %s:%d:%d\r\n" % (BASE_HEADER_BYTES, digest.encode(), n, m))
            if ctx.coding is not None:
                out.append(b"Content-Encoding: " + ctx.coding.encode() + b"\r\n")
        elif ctx.pin is not None:
            out.append(b"Accept-Encoding: identity\r\n")  # we compress for the hop ourselves
        if ctx.body_stream is not None:
            length = ctx.stream_length()
            out.append(b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n")
        elif body is not None and (body or ctx.method in BODY_METHODS):
            out.append(b"Content-Length: %d\r\n" % len(body))
        out.append(b"\r\n")
        return b"".join(out)

    def _decider(self, ctx: Ctx, path: Path) -> Callable[[list[tuple[bytes, bytes]]], codec.Decoder | None]:
        """Sidecar role: how a `via` response's body is handed to the client. A coding the
        client asked for passes through (not for SSE: events must be seen, to relay them
        whole and report a break in-band); any other is decoded here, bounded."""
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

    async def _relay(self, ctx: Ctx, upstream: Upstream, resp: Response) -> web.StreamResponse:
        """Copy the response to the client as it arrives."""
        request = ctx.request
        ctx.status = resp.status
        # A plain list: aiohttp copies the headers into its own multidict once.
        headers: list[tuple[str, str]] = []
        connection_listed: tuple[bytes, ...] = ()
        length: int | None = None
        is_sse = has_rid = is_json = encoded = False
        for name, value in resp.headers:
            lname = name.lower()
            if lname in RESPONSE_SKIP:
                if lname == b"content-length":
                    length = int(value)
                elif lname == b"connection":
                    connection_listed = tuple(v.strip().lower() for v in value.split(b","))
                continue
            if lname == b"content-type":
                is_sse = value[:17].lower() == b"text/event-stream"
                is_json = value[:16].lower() == b"application/json"
            elif lname == b"content-encoding":
                encoded = True  # (usage in a compressed body cannot be seen)
            elif lname == b"x-request-id":
                has_rid = True
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
        if connection_listed:
            headers = [h for h in headers if h[0].lower().encode("latin-1") not in connection_listed]
        if not has_rid:
            headers.append(("x-request-id", ctx.request_id))

        resp.check()  # a via response that does not decode: an error, before anything is sent
        coding = None
        if ctx.hop_accept and ctx.method != "HEAD" and resp.status not in (204, 304):
            if resp.header(b"content-encoding") is None:
                coding = ctx.hop_accept[0]  # edge role: compress for the hop, as the sidecar asked
        body = None if is_sse else resp.buffered()
        if body is not None:
            # The whole body is already here (the common case for JSON answers): one write.
            resp.release()
            if resp.decoder is not None:
                self._count_hop(ctx, resp)
            if coding is not None and len(body) >= MIN_COMPRESS:
                if len(body) < THREAD_MIN:
                    wire = codec.encode(coding, body)
                else:
                    wire = await asyncio.to_thread(codec.encode, coding, body)
                if len(body) <= len(wire) * codec.safe_ratio(coding):  # (else the sidecar's guard would refuse it)
                    self.metrics.count_hop("edge", "", "down", len(body), len(wire))
                    body = wire
                    headers.append(("Content-Encoding", coding))
            ctx.bytes_out = len(body)
            ctx.ttfb = time.monotonic() - ctx.started
            ctx.committed = True
            if is_json and resp.status == 200 and not encoded:
                self._meter(ctx, upstream, usage.from_body(body))
            if ctx.method == "HEAD":
                if length is not None:
                    headers.append(("Content-Length", str(length)))
                return web.Response(status=resp.status, headers=headers)
            return web.Response(status=resp.status, headers=headers, body=body)

        if coding is not None:
            ctx.encoder = codec.encoder(coding)
            headers.append(("Content-Encoding", coding))
            length = None
        out = web.StreamResponse(status=resp.status, headers=headers)
        if length is not None:
            out.content_length = length
        if is_sse:
            out.headers["X-Accel-Buffering"] = "no"
            ctx.streamed = True
        idle = upstream.config.failover.stream_idle_timeout
        streams = self.metrics.active_streams if is_sse else None
        stream_labels = (upstream.name,)
        ctx.committed = True  # the first byte goes out now
        ctx.ttfb = time.monotonic() - ctx.started
        if streams is not None:
            streams.inc(stream_labels)
        try:
            try:
                # Events are relayed whole only when we can see them (not compressed).
                framed = is_sse and resp.header(b"content-encoding") is None
                tap = usage.StreamTap() if framed and resp.status == 200 else None
                await push_body(request, out, resp, idle, framed, ctx.encoder, tap)
                if tap is not None:
                    self._meter(ctx, upstream, usage.from_stream(tap))
            except ProxyError as exc:
                return await self._broken_stream(ctx, upstream, out, exc, is_sse)
            finally:
                ctx.bytes_out = resp.bytes_read
            return out
        except ConnectionResetError:
            # The client went away mid-response; releasing closes the upstream connection,
            # so the origin stops generating.
            ctx.status, ctx.error = STATUS_CLIENT_CLOSED, "client_disconnected"
            return out
        finally:
            resp.release()
            if streams is not None:
                streams.inc(stream_labels, -1)
            self._count_hop(ctx, resp)

    def _count_hop(self, ctx: Ctx, resp: Response) -> None:
        """Bytes before and after the hop's compression of a streamed response."""
        if ctx.encoder is not None:
            self.metrics.count_hop("edge", "", "down", ctx.encoder.raw, ctx.encoder.wire)
        if resp.decoder is not None and ctx.path is not None:
            self.metrics.count_hop("sidecar", ctx.path.line.name, "down", resp.decoder.raw, resp.decoder.wire)

    async def _broken_stream(
        self, ctx: Ctx, upstream: Upstream, out: web.StreamResponse, exc: ProxyError, is_sse: bool
    ) -> web.StreamResponse:
        """The origin failed after commit: tell the client honestly, never fake an end."""
        ctx.error = f"{exc.kind}_after_commit"
        self.metrics.stream_errors.inc((upstream.name, exc.kind))
        if ctx.path is not None:
            ctx.path.on_failure(exc)
        if is_sse:
            event = sse_error_event(upstream.provider, exc.kind, f"upstream stream broke: {exc.message}")
            encoder = ctx.encoder
            if encoder is not None:  # the hop's compressed stream: the error in it, then its end
                event = encoder.process(event) + encoder.finish()
            await out.write(event)
            await out.write_eof()
        else:
            # A body cut short must look cut short: close without the final chunk.
            transport = ctx.request.transport
            if transport is not None:
                transport.abort()
        return out

    def _meter(self, ctx: Ctx, upstream: Upstream, used: usage.Usage | None) -> None:
        """Count the tokens a response used, per model and key; they also drain the key's
        token buckets (its local `tpm`, and our estimate of the origin's)."""
        if used is None:
            return
        key = ctx.keys.get(ctx.path) if ctx.keys is not None and ctx.path is not None else None
        labels = (upstream.name, used.model or "-", "client" if key is None else key.id)
        tokens = self.metrics.tokens
        if used.input:
            tokens.inc((*labels, "input"), used.input)
        if used.output:
            tokens.inc((*labels, "output"), used.output)
        if key is not None:
            key.on_tokens(used.input + used.output, time.monotonic(), ctx.counted)

    # -- errors and logging ----------------------------------------------------------------
    def _error_response(self, ctx: Ctx, kind: str, message: str, retry_after: float | None = None) -> web.Response:
        provider = ctx.upstream.provider if ctx.upstream is not None else "openai"
        status, body = error_body(provider, kind, message)
        ctx.status = status
        ctx.error = ctx.error or kind
        ctx.ttfb = time.monotonic() - ctx.started
        ctx.bytes_out = len(body)
        headers = {"x-edgeproxy-error": kind, "Content-Type": "application/json"}
        if ctx.request_id:
            headers["x-request-id"] = ctx.request_id
        if kind == "unauthorized":
            headers["WWW-Authenticate"] = 'Bearer realm="edgeproxy"'
        if retry_after is not None:
            # Whole seconds (RFC 9110), rounded up so a client that obeys is not early; the
            # exact wait too, in the header both the OpenAI and Anthropic SDKs read first.
            headers["Retry-After"] = str(max(1, math.ceil(round(retry_after, 3))))
            headers["retry-after-ms"] = str(max(0, round(retry_after * 1000)))
        return web.Response(status=status, body=body, headers=headers)

    def _log(self, ctx: Ctx) -> None:
        now = time.monotonic()
        duration = now - ctx.started
        name = ctx.upstream.name if ctx.upstream is not None else "-"
        m = self.metrics
        labels = (name,)
        m.requests.inc((name, str(ctx.status)))
        m.duration.observe(labels, duration)
        if ctx.ttfb is not None:
            m.ttfb.observe(labels, ctx.ttfb)
        if ctx.bytes_in:
            m.bytes.inc((name, "in"), ctx.bytes_in)
        if ctx.bytes_out:
            m.bytes.inc((name, "out"), ctx.bytes_out)
        if self.access.mode == "off":
            return
        path = ctx.path
        key = ctx.keys.get(path) if ctx.keys is not None and path is not None else None
        self.access.write(
            {
                "time": time.time(),
                "request_id": ctx.request_id,
                "method": ctx.method,
                "path": ctx.raw_path.split("?", 1)[0],
                "upstream": name,
                "endpoint": path.endpoint.host if path is not None else None,
                "line": path.line.name if path is not None else None,
                "key": key.id if key is not None else None,  # its id: the key itself never
                "status": ctx.status,
                "attempts": len(ctx.attempt_log),
                "attempt_log": ctx.attempt_log if len(ctx.attempt_log) > 1 else None,
                "ttfb_ms": None if ctx.ttfb is None else round(ctx.ttfb * 1000, 3),
                "duration_ms": round(duration * 1000, 3),
                "bytes_in": ctx.bytes_in,
                "bytes_out": ctx.bytes_out,
                "streamed": ctx.streamed,
                "error": ctx.error,
            }
        )
