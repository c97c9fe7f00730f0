"""The body phase: read a client's request body, bounded, kept whole for a replay up to
`limits.replay_body`, streamed through beyond that (no retry then).

Bounded three ways: its size (`limits.max_body`), its pace (a body that sends nothing for
`limits.body_timeout` is refused 408), and what all held bodies take together
(`limits.buffer_memory`, a ``BodyBudget`` shared by the listeners: past it, 503 with
Retry-After instead of a growing process).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

from aiohttp import HttpVersion11

from ..proto.errors import BodyTimeout, BodyTooLarge, Busy, ClientError, ProxyError
from .head import BODY_METHODS

if TYPE_CHECKING:
    from aiohttp import StreamReader

    from ..telemetry.metrics import Metrics
    from .ctx import Ctx

# A body refused for lack of buffer memory: try again after this long (seconds).
BUSY_RETRY: Final = 1.0

__all__ = ["BodyBudget", "read_body"]


class BodyBudget:
    """The bytes of request bodies held in memory by all listeners (``limits.buffer_memory``)."""

    __slots__ = ("held", "limit", "metrics")

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit  # swapped on reload
        self.metrics = metrics
        self.held = 0

    def check(self, n: int) -> None:
        """Refuse (503) a body of ``n`` bytes that could not be held now."""
        if self.held + n > self.limit:
            self.metrics.client_limits.inc(("buffer_memory",))
            raise Busy(
                f"edgeproxy holds too many request bodies right now (limits.buffer_memory {self.limit} bytes);"
                " retry shortly",
                BUSY_RETRY,
            )

    def take(self, ctx: Ctx, n: int) -> None:
        """Hold ``n`` more bytes for ``ctx`` (given back at its end), or refuse it (503)."""
        self.check(n)
        self.held += n
        ctx.held += n

    def give_back(self, ctx: Ctx) -> None:
        self.held -= ctx.held
        ctx.held = 0


async def read_body(ctx: Ctx, budget: BodyBudget) -> None:
    """Fill ``ctx.body`` (whole) or ``ctx.body_stream`` (too big to keep, or of unknown
    length past replay_body); ``ctx.body_coding`` and ``ctx.body_length`` say how it is."""
    request = ctx.request
    limits = ctx.state.config.limits
    length = request.content_length
    if length is not None and length > limits.max_body:
        raise BodyTooLarge(f"request body of {length} bytes is over the limit of {limits.max_body} bytes")
    ctx.body_coding = request.headers.get("content-encoding")
    ctx.body_length = length
    if length is None and not request.body_exists:
        ctx.body = b"" if ctx.method in BODY_METHODS else None
        return
    if length is not None and length <= limits.replay_body:
        budget.check(length)  # (before the 100 Continue: a body refused now is never sent)
    if request.version == HttpVersion11 and request.headers.get("expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    content = request.content
    idle = limits.body_timeout
    try:
        if length is not None and length <= limits.replay_body:
            ctx.body = await _read_exactly(content, length, idle, ctx, budget)
            ctx.bytes_in = length
            return
        # Unknown length, or too big to hold for a retry: buffer up to replay_body, then
        # stream the rest through.
        parts: list[bytes] = []
        size = 0
        while size <= limits.replay_body:
            chunk = await _read_some(content, idle)
            if not chunk:
                ctx.body = b"".join(parts)
                ctx.bytes_in = size
                return
            budget.take(ctx, len(chunk))
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
    ctx.body_stream = _stream_body(ctx, parts, size, limits.max_body, idle)


async def _read_exactly(content: StreamReader, n: int, idle: float, ctx: Ctx, budget: BodyBudget) -> bytes:
    """``n`` bytes, held against the budget as they arrive (a stalled upload holds what it
    sent, not what it announced); the common small body is in the buffer already."""
    if not n:
        return b""
    head = content.read_nowait(n)
    budget.take(ctx, len(head))
    if len(head) == n:
        return head
    parts = [head]
    left = n - len(head)
    while left:
        chunk = await _read_some(content, idle, left)
        if not chunk:
            raise asyncio.IncompleteReadError(b"".join(parts), n)
        budget.take(ctx, len(chunk))
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


async def _read_some(content: StreamReader, idle: float, n: int = -1) -> bytes:
    """What the client sent next (b"" at its end), waiting at most ``idle`` for it."""
    try:
        async with asyncio.timeout(idle):
            return await content.read(n) if n > 0 else await content.readany()
    except TimeoutError:
        raise BodyTimeout(f"the request body sent nothing for {idle:g}s (limits.body_timeout)") from None


async def _stream_body(ctx: Ctx, first: list[bytes], size: int, limit: int, idle: float) -> AsyncIterator[bytes]:
    ctx.bytes_in = size
    for chunk in first:
        yield chunk
    first.clear()
    content = ctx.request.content
    while True:
        try:
            chunk = await _read_some(content, idle)
        except ProxyError:
            raise
        except Exception as exc:
            raise ClientError(f"cannot read request body: {exc}") from None
        if not chunk:
            return
        ctx.bytes_in += len(chunk)
        if ctx.bytes_in > limit:
            raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
        yield chunk
