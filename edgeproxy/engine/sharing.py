"""Answers shared by requests asking the same at the same moment (see flight.py): the fetch,
in a task of its own, and each sharer's answer from it. A mixin of ``Engine``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from ..proto.errors import ProxyError
from ..proto.providers import sse_error_event
from .relay import STATUS_CLIENT_CLOSED, one_tap, push_to

if TYPE_CHECKING:
    from ..net.client import Response
    from ..routing.lines import Path
    from ..routing.state import Upstream
    from ..telemetry.metrics import Metrics
    from .ctx import Ctx, Reply
    from .filter import Chain
    from .flight import Flight

__all__ = ["Sharing"]

log = logging.getLogger("edgeproxy")


class Sharing:
    """Mixin for ``Engine``: a request with a ``ctx.flight``."""

    __slots__ = ()

    metrics: Metrics
    _attempts: Callable[..., asyncio.Future[Response]]
    _reply: Callable[[Ctx, Response], Reply]
    _answered: Callable[[Ctx, Upstream, Path, Response | None], None]
    _stream_failed: Callable[[Ctx, Upstream, Path, ProxyError], None]

    async def _shared(self, ctx: Ctx, upstream: Upstream, chain: Chain) -> web.StreamResponse:
        flight = ctx.flight
        assert flight is not None
        if ctx.leads:
            flight.task = asyncio.get_running_loop().create_task(
                self._produce(ctx, upstream, chain, flight), name=f"shared fetch {ctx.request_id}"
            )
        return await self._serve(ctx, flight)

    async def _produce(self, ctx: Ctx, upstream: Upstream, chain: Chain, flight: Flight) -> None:
        """The leader's fetch: the attempts, the response filters, the body into the flight.
        Runs on if the leader's client leaves; cancelled when no sharer is left."""
        reply = None
        try:
            resp = await self._attempts(ctx, upstream, chain)
            reply = ctx.reply = self._reply(ctx, resp)
            resp.check()
            if not reply.sse:
                reply.body = resp.buffered()
            for response_filter in chain.at(ctx.path).response:
                await response_filter(ctx, reply)
            ctx.ttfb = time.monotonic() - ctx.started
            flight.begin(reply.status, reply.headers, reply.sse)
            if reply.body is not None:
                flight.add(reply.body)
            else:
                idle = (ctx.timeouts or upstream.timeouts(ctx.model, True)).stream_idle
                await push_to(resp, flight.add, idle, reply.framed, one_tap(reply.taps) if reply.framed else None)
                if reply.sse and ctx.path is not None:
                    self._answered(ctx, upstream, ctx.path, None)  # the stream ended as it should
            reply.clean = True
            flight.finish()
        except ProxyError as exc:
            if flight.status == 0:
                flight.finish(error=exc)  # before commit: every sharer's answer is this error
                return
            if ctx.path is not None:
                self._stream_failed(ctx, upstream, ctx.path, exc)
            self.metrics.stream_errors.inc((upstream.name, exc.kind))
            ctx.error = f"{exc.kind}_after_commit"
            if flight.sse:
                message = f"upstream stream broke: {exc.message}" if exc.source == "upstream" else exc.message
                flight.add(sse_error_event(upstream.provider, exc.kind, message))
            flight.finish(broken=True)
        except asyncio.CancelledError:
            flight.finish(error=ProxyError("every client asking for this answer went away"), broken=True)
            raise
        except Exception:
            log.exception("internal error fetching a shared answer for %s", ctx.raw_path.split("?", 1)[0])
            flight.finish(error=ProxyError("edgeproxy internal error"), broken=flight.status != 0)
        finally:
            if reply is not None:
                reply.resp.release()

    async def _serve(self, ctx: Ctx, flight: Flight) -> web.StreamResponse:
        """Answer ``ctx``'s client from ``flight``: its head once it is there, then the body
        already in and each chunk as it comes. Raises the flight's error if it failed before
        commit."""
        while flight.status == 0 and not flight.done:
            await flight.changed()
        if flight.error is not None and flight.status == 0:
            raise flight.error
        ctx.status = flight.status
        headers = [*flight.headers, ("x-request-id", ctx.request_id), *(ctx.shared_headers or ())]
        if not flight.sse:
            while not flight.done:
                await flight.changed()
            if flight.broken:  # a body cut short must look cut short
                ctx.error = ctx.error or "shared_answer_broke"
                transport = ctx.request.transport
                if transport is not None:
                    transport.abort()
                return web.StreamResponse(status=flight.status, headers=headers)
            body = b"".join(flight.chunks)
            ctx.bytes_out, ctx.committed = len(body), True
            ctx.ttfb = time.monotonic() - ctx.started
            return web.Response(status=flight.status, headers=headers, body=body)
        out = web.StreamResponse(status=flight.status, headers=headers)
        out.headers["X-Accel-Buffering"] = "no"
        ctx.streamed = ctx.committed = True
        ctx.ttfb = time.monotonic() - ctx.started
        await out.prepare(ctx.request)
        streams, labels = self.metrics.active_streams, (ctx.upstream.name if ctx.upstream else "-",)
        streams.inc(labels)
        try:
            await self._send(ctx, out, flight)
        except ConnectionResetError:
            ctx.status, ctx.error = STATUS_CLIENT_CLOSED, "client_disconnected"
        finally:
            streams.inc(labels, -1)
        return out

    async def _send(self, ctx: Ctx, out: web.StreamResponse, flight: Flight) -> None:
        """A shared stream to one client: what is in, then each chunk as it comes. Raises
        ConnectionResetError if the client goes away or stops reading."""
        upstream = ctx.upstream
        idle = (ctx.timeouts or upstream.timeouts(ctx.model, True)).stream_idle if upstream else 300.0
        sent = 0
        while True:
            while sent < len(flight.chunks):
                data = flight.chunks[sent]
                sent += 1
                ctx.bytes_out += len(data)
                try:
                    # A client that stops reading must not hold the shared answer for ever.
                    async with asyncio.timeout(idle):
                        await out.write(data)
                except TimeoutError:
                    if ctx.request.transport is not None:
                        ctx.request.transport.abort()
                    raise ConnectionResetError(f"client read nothing for {idle:g}s") from None
            if flight.done:
                break
            await flight.changed()
        await out.write_eof()
