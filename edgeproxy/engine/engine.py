"""The engine: one client request through the phases, and nothing else.

accept/route -> request filters -> request body -> plan -> per attempt (upstream request
filters, send, upstream response filters) -> response filters -> relay -> end -> logging.
Each phase is a small method; per-request state lives in ``Ctx``; the attempt loop is
``attempts.Failover``. Capabilities (the edge role, the `via` hop, key pools, renames,
metering...) are filters (filter.py): the engine imports none of them; it runs the chain
the pipeline gives each request. Before the first byte goes to the client (commit) an error
becomes a response in the provider's shape; after it, only an in-band SSE error or a cut
connection is honest.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from aiohttp import web

from ..proto.codec import THREAD_MIN
from ..proto.errors import (
    BodyTimeout,
    BrowserRefused,
    Busy,
    NoRoute,
    ProxyError,
    ShuttingDown,
    Unauthorized,
    UnsafePath,
    VersionNotSupported,
)
from ..proto.models import request_model
from ..proto.providers import error_body, sse_error_event
from ..proto.target import has_unsafe_segment
from ..routing.state import release_trials
from .attempts import Failover
from .auth import AuthThrottle, ListenerAuth
from .body import BodyBudget, read_body
from .ctx import HOP_BY_HOP, Ctx, Reply, Transform
from .guard import BrowserGuard
from .relay import STATUS_CLIENT_CLOSED, one_tap, push_body
from .sharing import Sharing

if TYPE_CHECKING:
    from ..config import ListenerConfig
    from ..net.client import Response
    from ..routing.lines import Path
    from ..routing.state import Upstream
    from ..telemetry.accesslog import AccessLog
    from ..telemetry.metrics import Metrics
    from .filter import Chain, Pipeline

__all__ = ["Engine"]

log = logging.getLogger("edgeproxy")

RESPONSE_SKIP: Final = HOP_BY_HOP | {b"content-length"}
# Request ids: a random per-process prefix and a counter; unique without a uuid4 per request.
_RID_PREFIX: Final = os.urandom(6).hex()
_rid_counter = itertools.count(1)


def _set_request_id(ctx: Ctx) -> None:
    rid = ctx.request.headers.get("x-request-id")
    ok = rid is not None and len(rid) <= 200 and rid.isascii() and rid.isprintable()
    ctx.request_id = rid if ok else f"{_RID_PREFIX}{next(_rid_counter):012x}"  # type: ignore[assignment]


class Engine(Failover, Sharing):
    """Runs requests through the phases. One per listener; the pipeline is swapped on reload."""

    __slots__ = ("_inflight", "access", "auth", "bodies", "guard", "listener", "metrics", "on_slow_path", "pipeline")

    def __init__(
        self,
        pipeline: Pipeline,
        listener: ListenerConfig,
        metrics: Metrics,
        access: AccessLog,
        on_slow_path: Callable[[Path, bool], None] = lambda path, fresh: None,
        throttle: AuthThrottle | None = None,
        bodies: BodyBudget | None = None,
    ) -> None:
        self.pipeline = pipeline
        # The bodies all listeners hold (limits.buffer_memory): one budget per process.
        self.bodies = bodies or BodyBudget(pipeline.state.config.limits.buffer_memory, metrics)
        # Called when an attempt waits for headers longer than its path's RTT suggests: the
        # prober checks the line at once instead of at its next interval.
        self.on_slow_path = on_slow_path
        self.listener = listener
        self.metrics = metrics
        self.access = access
        # Wrong tokens per address: shared by every listener of the process (one guesser,
        # one budget, whichever listener it tries).
        self.auth = ListenerAuth(listener.tokens, throttle or AuthThrottle(), listener.token_classes)
        self.guard = BrowserGuard.for_listener(listener)
        # Requests in flight, with the chain each runs through once routed.
        self._inflight: dict[Ctx, Chain | None] = {}

    def reconfigure(self, pipeline: Pipeline, listener: ListenerConfig) -> None:
        """A reload: new requests see the new pipeline and this listener's new tokens."""
        self.pipeline = pipeline
        self.listener = listener
        self.auth = ListenerAuth(listener.tokens, self.auth.throttle, listener.token_classes)
        self.guard = BrowserGuard.for_listener(listener)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def requests(self) -> list[Ctx]:
        """The requests in flight now."""
        return list(self._inflight)

    def end_streams(self) -> int:
        """The drain is over: every answer still being relayed ends now, a stream with an
        in-band error in its protocol, any other body cut short; a request still waiting in a
        filter (an admission queue) is answered 503 shutting_down. How many there were."""
        ended = 0
        for ctx, chain in list(self._inflight.items()):
            reply = ctx.reply
            if reply is not None and (ctx.committed or ctx.leads) and not reply.resp.complete:
                reply.resp.fail(ShuttingDown("edgeproxy is shutting down (drain_timeout ended)"))
                ended += 1
            elif chain is not None and reply is None and not ctx.committed:
                for on_drain_end in chain.drain_end:
                    if on_drain_end(ctx):
                        ended += 1
                        break
        return ended

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp's handler: never raises but CancelledError (the client went away)."""
        pipeline = self.pipeline
        ctx = Ctx(request, pipeline.state, self.auth)
        self._inflight[ctx] = None
        response: web.StreamResponse | None = None
        try:
            response = await self._run(ctx, pipeline)
            return response
        except ProxyError as exc:
            response = self._error_response(ctx, exc.kind, exc.message, exc.retry_after)
            if isinstance(exc, BodyTimeout | Busy):
                response.force_close()  # (a body we did not read, or a client that stalled)
                if isinstance(exc, BodyTimeout):
                    self.metrics.client_limits.inc(("body_timeout",))
            elif isinstance(exc, Unauthorized):
                delay = ctx.auth.throttle.on_failure(request.remote)
                if delay:  # someone keeps guessing: make each guess slow, and reconnect
                    response.force_close()
                    await asyncio.sleep(delay)
            return response
        except asyncio.CancelledError:
            if not _delivered(ctx):
                ctx.status, ctx.error = STATUS_CLIENT_CLOSED, ctx.error or "client_disconnected"
            raise
        except Exception:
            log.exception("internal error on %s %s", ctx.method, ctx.raw_path.split("?", 1)[0])
            if ctx.committed:
                raise
            response = self._error_response(ctx, "internal", "edgeproxy internal error")
            return response
        finally:
            flight = ctx.flight
            fetch = flight.task if flight is not None and ctx.leads else None
            if flight is not None:
                flight.leave(ctx.leads)
            if fetch is not None and not fetch.done():
                # Its fetch goes on for the others sharing it: the request ends with it.
                fetch.add_done_callback(lambda _: self._finish(ctx))
            else:
                self._finish(ctx)

    def _finish(self, ctx: Ctx) -> None:
        if ctx.trials:
            release_trials(ctx.trials)
        if ctx.held:
            self.bodies.give_back(ctx)
        chain = self._inflight.pop(ctx, None)
        if chain is not None:
            self._end(ctx, chain)
        self._log(ctx, chain)

    # -- phases ----------------------------------------------------------------------------
    async def _run(self, ctx: Ctx, pipeline: Pipeline) -> web.StreamResponse:
        _set_request_id(ctx)
        if ctx.request.version.major != 1:
            raise VersionNotSupported(f"HTTP/{ctx.request.version.major} requests are not served here: use HTTP/1.1")
        if has_unsafe_segment(ctx.raw_path):
            raise UnsafePath("the request path has dot segments or encoded separators")
        guard = self.guard
        if guard is not None and (refusal := guard.refusal(ctx.raw_path, ctx.request.headers)) is not None:
            raise BrowserRefused(refusal)
        chain = self._route(ctx, pipeline)
        upstream = ctx.upstream
        assert upstream is not None
        for request_filter in chain.request:
            early = await request_filter(ctx)
            if early is not None:
                ctx.status = early.status  # (answered by a filter: an edge's probe answer)
                return early
        await read_body(ctx, self.bodies)
        for request_body_filter in chain.request_body:
            early = await request_body_filter(ctx)
            if early is not None:
                ctx.status = early.status  # (answered by a filter: a cache hit)
                return early
        body = ctx.body if ctx.body_coding is None else None
        if body is not None and len(body) >= THREAD_MIN:
            # (a body naming "model" twice is parsed whole: megabytes take tens of ms)
            ctx.model = await asyncio.to_thread(request_model, body, ctx.raw_path)
        else:
            ctx.model = request_model(body, ctx.raw_path)
        if ctx.flight is not None:
            return await self._shared(ctx, upstream, chain)
        resp = await self._attempts(ctx, upstream, chain)
        return await self._relay(ctx, upstream, chain, resp)

    def _route(self, ctx: Ctx, pipeline: Pipeline) -> Chain:
        """Origin-form targets by the longest prefix, then listener auth; any other form
        (absolute: a hop from a sidecar) is offered to the route filters."""
        if ctx.raw_path[:1] != "/":
            for router in pipeline.routers:
                chain = router.route_filter(ctx)
                if chain is not None:
                    self._inflight[ctx] = chain
                    return chain
            raise NoRoute(f"no upstream serves {ctx.raw_path.split('?', 1)[0][:200]!r}")
        upstream = ctx.state.route(ctx.raw_path)
        auth = ctx.auth
        if upstream is None:
            # Whoever shows one of our tokens, in any header a client could put it in, learns
            # that the path is unknown; anyone else only that they must authenticate.
            if auth.required and auth.identify_request(ctx.request, credential_replaced=True) is None:
                raise Unauthorized("missing or wrong x-edgeproxy-token")
            raise NoRoute(f"no upstream serves {ctx.raw_path.split('?', 1)[0]}")
        ctx.upstream = upstream
        if auth.required:
            client = auth.identify_request(ctx.request, upstream.injects_keys)
            if client is None:
                raise Unauthorized("missing or wrong edgeproxy token (send it as x-edgeproxy-token)")
            ctx.client = client
        chain = self._inflight[ctx] = pipeline.chain(upstream)
        return chain

    async def _relay(self, ctx: Ctx, upstream: Upstream, chain: Chain, resp: Response) -> web.StreamResponse:
        """The response filters, then copy the response to the client as it arrives."""
        reply = ctx.reply = self._reply(ctx, resp)
        resp.check()  # a body that does not decode: an error, before anything is sent
        if not reply.sse:
            reply.body = resp.buffered()
            if reply.body is not None:
                resp.release()  # the whole body is here (the common case for JSON answers)
        for response_filter in chain.at(ctx.path).response:
            await response_filter(ctx, reply)
        ctx.status = reply.status
        body = reply.body
        if body is not None:
            ctx.bytes_out = len(body)
            ctx.ttfb = time.monotonic() - ctx.started
            ctx.committed = True
            reply.clean = True
            if ctx.method == "HEAD":
                if reply.length is not None:
                    reply.headers.append(("Content-Length", str(reply.length)))
                return web.Response(status=reply.status, headers=reply.headers)
            return web.Response(status=reply.status, headers=reply.headers, body=body)
        return await self._stream(ctx, upstream, chain, reply)

    def _reply(self, ctx: Ctx, resp: Response) -> Reply:
        """The answer's status and headers as they go to the client (a plain list: aiohttp
        copies it into its own multidict once)."""
        headers: list[tuple[str, str]] = []
        connection_listed: tuple[bytes, ...] = ()
        length: int | None = None
        ctype = b""
        has_rid = encoded = False
        for name, value in resp.headers:
            lname = name.lower()
            if lname in RESPONSE_SKIP:
                if lname == b"content-length":
                    length = int(value)
                elif lname == b"connection":
                    connection_listed = tuple(v.strip().lower() for v in value.split(b","))
                continue
            if lname == b"content-type":
                ctype = value
            elif lname == b"content-encoding":
                encoded = True
            elif lname == b"x-request-id":
                has_rid = True
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
        if connection_listed:
            headers = [h for h in headers if h[0].lower().encode("latin-1") not in connection_listed]
        if not has_rid:
            headers.append(("x-request-id", ctx.request_id))
        return Reply(resp, headers, length, ctype, encoded)

    async def _stream(self, ctx: Ctx, upstream: Upstream, chain: Chain, reply: Reply) -> web.StreamResponse:
        out = web.StreamResponse(status=reply.status, headers=reply.headers)
        if reply.length is not None:
            out.content_length = reply.length
        if reply.sse:
            out.headers["X-Accel-Buffering"] = "no"
            ctx.streamed = True
        idle = (ctx.timeouts or upstream.timeouts(ctx.model, True)).stream_idle
        streams = self.metrics.active_streams if reply.sse else None
        stream_labels = (upstream.name,)
        outer = transform = _one_transform(reply.transforms)
        tap = one_tap(reply.taps) if reply.framed else None
        ctx.committed = True  # the first byte goes out now
        ctx.ttfb = time.monotonic() - ctx.started
        if streams is not None:
            streams.inc(stream_labels)
        relayed = 0
        try:
            while True:
                resp = reply.resp
                try:
                    await push_body(ctx.request, out, resp, idle, reply.framed, transform, tap, reply.deliver)
                    reply.clean = True
                    if reply.sse and ctx.path is not None:
                        self._answered(ctx, upstream, ctx.path, None)  # the stream ended as it should
                    return out
                except ProxyError as exc:
                    if ctx.path is not None:
                        self._stream_failed(ctx, upstream, ctx.path, exc)
                    events = await self._resume(ctx, upstream, chain, reply, exc) if chain.stream_break else None
                    if events is None:
                        return await self._broken_stream(ctx, upstream, out, exc, reply.sse, outer)
                    # A filter continues the stream from a new attempt (reply.resp is its answer):
                    # its events go out rewritten, then seen by the taps, then transformed.
                    transform, tap = _Continued(events, tap, outer), None
                finally:
                    relayed += resp.bytes_read
                    ctx.bytes_out = relayed
        except ConnectionResetError:
            # The client went away mid-response; releasing closes the upstream connection,
            # so the origin stops generating.
            if not reply.delivered:
                ctx.status, ctx.error = STATUS_CLIENT_CLOSED, "client_disconnected"
            return out
        finally:
            reply.resp.release()
            if streams is not None:
                streams.inc(stream_labels, -1)

    async def _resume(
        self, ctx: Ctx, upstream: Upstream, chain: Chain, reply: Reply, exc: ProxyError
    ) -> Transform | None:
        """A framed stream broke after commit: may a filter continue it (``on_stream_break``,
        failover.resume)? If one returns a continuation, the attempt loop runs again for the
        request it made; an answer that is a 200 event stream becomes ``reply.resp``, and its
        events' rewrite is returned. None: the break stands (the caller writes its error)."""
        if not reply.framed:
            return None
        continuation = None
        for on_stream_break in chain.stream_break:
            try:
                continuation = on_stream_break(ctx, reply, exc)
            except Exception:
                log.exception("filter %r failed on a broken stream", on_stream_break)
                continuation = None
            if continuation is not None:
                break
        else:
            return None
        broken = reply.resp
        broken.release()  # its connection closes: that origin stops generating
        path, attempt = ctx.path, ctx.attempt
        if path is not None:
            took = 0.0 if attempt is None else time.monotonic() - attempt.started
            entry = {"line": path.line.name, "endpoint": path.endpoint.host, "outcome": f"{exc.kind}_after_commit"}
            ctx.attempt_log.append({**entry, "ms": round(took * 1000, 3)})
        ctx.retrying = True
        try:
            resp = await self._attempts(ctx, upstream, chain)
        except ProxyError:
            continuation.result = "unavailable"
            return None
        if resp.status != 200 or not _is_event_stream(resp):
            resp.release()
            continuation.result = "refused"
            return None
        reply.resp = resp
        continuation.result = "ok"
        return continuation.events

    async def _broken_stream(
        self,
        ctx: Ctx,
        upstream: Upstream,
        out: web.StreamResponse,
        exc: ProxyError,
        is_sse: bool,
        transform: Transform | None,
    ) -> web.StreamResponse:
        """The origin failed after commit: tell the client honestly, never fake an end."""
        ctx.error = f"{exc.kind}_after_commit"
        self.metrics.stream_errors.inc((upstream.name, exc.kind))
        if is_sse:
            message = f"upstream stream broke: {exc.message}" if exc.source == "upstream" else exc.message
            event = sse_error_event(upstream.provider, exc.kind, message)
            if transform is not None:  # (the hop's compressed stream: the error in it, then its end)
                event = transform.process(event) + transform.finish()
            await out.write(event)
            await out.write_eof()
        else:
            # A body cut short must look cut short: close without the final chunk.
            transport = ctx.request.transport
            if transport is not None:
                transport.abort()
        return out

    # -- end, errors and logging -----------------------------------------------------------
    def _end(self, ctx: Ctx, chain: Chain) -> None:
        for on_end in chain.at(ctx.path).end:  # (usually one or none)
            try:
                on_end(ctx, ctx.reply)
            except Exception:  # a filter's bug must not cost the request its log line
                log.exception("filter %r failed at the end of a request", on_end)

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
        if ctx.shared_headers:
            headers.update(ctx.shared_headers)  # (a caching upstream's result, on its errors too)
        if retry_after is not None:
            # Whole seconds (RFC 9110), rounded up so a client that obeys is not early; the
            # exact wait too, in the header both the OpenAI and Anthropic SDKs read first.
            headers["Retry-After"] = str(max(1, math.ceil(round(retry_after, 3))))
            headers["retry-after-ms"] = str(max(0, round(retry_after * 1000)))
        return web.Response(status=status, body=body, headers=headers)

    def _log(self, ctx: Ctx, chain: Chain | None) -> None:
        now = time.monotonic()
        duration = now - ctx.started
        name = ctx.upstream.name if ctx.upstream is not None else "-"
        if ctx.metered:
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
        attempt = ctx.attempt
        record: dict[str, object] = {
            "time": time.time(),
            "request_id": ctx.request_id,
            "method": ctx.method,
            "path": ctx.raw_path.split("?", 1)[0],
            "upstream": name,
            "model": ctx.model,
            "endpoint": path.endpoint.host if path is not None else None,
            "line": path.line.name if path is not None else None,
            # the id of the credential the answer came with, never the credential itself
            "key": attempt.credential if attempt is not None and attempt.path is path else None,
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
        if ctx.client.name is not None:
            record["client"] = ctx.client.name  # (the token's name, never the token)
        if chain is not None:
            for logging_filter in chain.logging:
                logging_filter(ctx, record)
        self.access.write(record)


def _delivered(ctx: Ctx) -> bool:
    """Did the client get its whole answer before it hung up (logged with its status)?"""
    reply = ctx.reply
    return reply is not None and reply.delivered


def _one_transform(transforms: list[Transform]) -> Transform | None:
    if not transforms:
        return None
    if len(transforms) == 1:
        return transforms[0]
    return _Transforms(transforms)


class _Transforms(Transform):
    """Several stream transforms, applied in the order they were added."""

    __slots__ = ("_all",)

    def __init__(self, transforms: list[Transform]) -> None:
        self._all = transforms

    def process(self, data: bytes) -> bytes:
        for t in self._all:
            data = t.process(data)
        return data

    def finish(self) -> bytes:
        tail = b""
        for t in self._all:
            tail = t.process(tail) + t.finish() if tail else t.finish()
        return tail


class _Continued(Transform):
    """A continued stream's events on their way out: the resuming filter's rewrite, then the
    reply's taps (they see what the client gets), then its transforms (a hop's compression
    goes on in the same compressed stream)."""

    __slots__ = ("_events", "_tap", "_then")

    def __init__(self, events: Transform, tap: Callable[[bytes], None] | None, then: Transform | None) -> None:
        self._events, self._tap, self._then = events, tap, then

    def process(self, data: bytes) -> bytes:
        data = self._events.process(data)
        if data and self._tap is not None:
            self._tap(data)
        then = self._then
        return data if then is None or not data else then.process(data)

    def finish(self) -> bytes:
        tail = self._events.finish()
        if tail and self._tap is not None:
            self._tap(tail)
        then = self._then
        if then is None:
            return tail
        return then.process(tail) + then.finish() if tail else then.finish()


def _is_event_stream(resp: Response) -> bool:
    """An answer whose events can be seen (and so continue a stream): SSE, not content-coded."""
    ctype = resp.header(b"content-type")
    return ctype is not None and ctype[:17].lower() == b"text/event-stream" and resp.header(b"content-encoding") is None
