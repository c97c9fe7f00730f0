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

from . import usage
from .client import Response
from .errors import (
    BodyTooLarge,
    ClientError,
    NoRoute,
    ProxyError,
    Unauthorized,
)
from .failover import Failover
from .providers import CREDENTIAL_HEADERS, client_credential, error_body, sse_error_event, token_matches
from .relay import push_body

if TYPE_CHECKING:
    from .accesslog import AccessLog
    from .config import ListenerConfig
    from .keys import Key
    from .lines import Path
    from .metrics import Metrics
    from .state import State, Upstream

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
        "waited",
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
        "key_disabled",
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
        self.keys: dict[Path, Key] | None = None  # the key injected on each path tried
        self.key_retries = 0  # attempts sent again with another key (429, 401, 403)
        self.key_disabled = False  # a refusal (401/403) disabled a key during this request
        self.queued = False  # waited for a rate-limited key to free up


class Engine(Failover):
    """Runs requests through the phases. One per listener; the State is swapped on reload."""

    __slots__ = ("_inflight", "_tokens", "access", "listener", "metrics", "on_slow_path", "state")

    def __init__(
        self,
        state: State,
        listener: ListenerConfig,
        metrics: Metrics,
        access: AccessLog,
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
        upstream = self._route(ctx)
        self._accept(ctx, upstream)
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
        rid = ctx.request.headers.get("x-request-id")
        ok = rid is not None and len(rid) <= 200 and rid.isascii() and rid.isprintable()
        ctx.request_id = rid if ok else f"{_RID_PREFIX}{next(_rid_counter):012x}"  # type: ignore[assignment]
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
        try:
            if length is not None and length <= limits.replay_body:
                ctx.body = await content.readexactly(length) if length else b""
                ctx.bytes_in = length
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
        if not renames or not body or ctx.request.headers.get("content-encoding"):
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

    def _request_head(self, ctx: Ctx, upstream: Upstream, path: Path, body: bytes | None) -> bytes:
        endpoint = path.endpoint
        rest = ctx.raw_path[len(upstream.prefix) :]
        target = endpoint.base_path + rest if rest[:1] != "?" else endpoint.base_path + "/" + rest
        if not target or target[0] != "/":
            target = "/" + target
        host = path.host_header
        key = upstream.pick_key(endpoint)
        if key is not None:
            if ctx.keys is None:
                ctx.keys = {}
            ctx.keys[path] = key
            self.metrics.key_requests.inc((upstream.name, endpoint.url, key.id))
        out = [f"{ctx.method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode("latin-1")]
        connection_listed: set[bytes] = set()
        for name, value in ctx.request.raw_headers:
            lname = name.lower()
            if lname in REQUEST_SKIP:
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
        if ctx.body_stream is not None:
            length = ctx.request.content_length
            out.append(b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n")
        elif body is not None and (body or ctx.method in BODY_METHODS):
            out.append(b"Content-Length: %d\r\n" % len(body))
        out.append(b"\r\n")
        return b"".join(out)

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

        body = None if is_sse else resp.buffered()
        if body is not None:
            # The whole body is already here (the common case for JSON answers): one write.
            resp.release()
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
                await push_body(request, out, resp, idle, framed, tap)
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

    async def _broken_stream(
        self, ctx: Ctx, upstream: Upstream, out: web.StreamResponse, exc: ProxyError, is_sse: bool
    ) -> web.StreamResponse:
        """The origin failed after commit: tell the client honestly, never fake an end."""
        ctx.error = f"{exc.kind}_after_commit"
        self.metrics.stream_errors.inc((upstream.name, exc.kind))
        if ctx.path is not None:
            ctx.path.on_failure(exc)
        if is_sse:
            await out.write(sse_error_event(upstream.provider, exc.kind, f"upstream stream broke: {exc.message}"))
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
            key.on_tokens(used.input + used.output, time.monotonic())

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
