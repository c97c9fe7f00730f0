"""The body phase: read a client's request body, bounded, kept whole for a replay up to
`limits.replay_body`, streamed through beyond that (no retry then)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import HttpVersion11

from ..proto.errors import BodyTooLarge, ClientError, ProxyError
from .head import BODY_METHODS

if TYPE_CHECKING:
    from .ctx import Ctx

__all__ = ["read_body"]


async def read_body(ctx: Ctx) -> None:
    """Fill ``ctx.body`` (whole) or ``ctx.body_stream`` (too big to keep, or of unknown
    length past replay_body); ``ctx.body_coding`` and ``ctx.body_length`` say how it is."""
    request = ctx.request
    limits = ctx.state.config.limits
    length = request.content_length
    if length is not None and length > limits.max_body:
        raise BodyTooLarge(f"request body of {length} bytes is over the limit of {limits.max_body} bytes")
    if request.version == HttpVersion11 and request.headers.get("expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    ctx.body_coding = request.headers.get("content-encoding")
    ctx.body_length = length
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
    ctx.body_stream = _stream_body(ctx, parts, size, limits.max_body)


async def _stream_body(ctx: Ctx, first: list[bytes], size: int, limit: int) -> AsyncIterator[bytes]:
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
