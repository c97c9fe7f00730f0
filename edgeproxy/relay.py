"""Relay a streamed response body to the client as it arrives, in push mode.

Each chunk the parser hands over is written to the client's socket from the same callback,
so an SSE event costs one write and no task wake-up, future or timer of its own (at 1,000
streams x 50 events/s those add up to most of the CPU a naive `await read(); await write()`
loop spends). Backpressure: when the client's socket buffer passes CLIENT_HIGH_WATER, reading
from the origin pauses until aiohttp reports the client drained.

We write to the transport under aiohttp's response: after ``send_headers()`` the response
is ours to frame (chunked or raw, as aiohttp chose), and ``write_eof()`` still ends it.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from .client import Response

__all__ = ["push_body"]

# Client socket bytes buffered before we stop reading from the origin.
CLIENT_HIGH_WATER: Final = 256 * 1024


async def push_body(request: web.BaseRequest, out: web.StreamResponse, resp: Response, idle_timeout: float) -> None:
    """Stream ``resp``'s body to the client; return at its end.

    Raises ProxyError if the origin fails or falls silent for ``idle_timeout`` (the caller
    reports it in-band), ConnectionResetError if the client is gone.
    """
    writer = await out.prepare(request)
    assert writer is not None
    writer.send_headers()  # aiohttp holds headers back for the first chunk; they go now
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    write = transport.write
    buffered = transport.get_write_buffer_size

    if writer.chunked:  # type: ignore[attr-defined]  # aiohttp decided the framing in prepare()

        def sink(data: bytes) -> bool:
            write(b"%x\r\n%b\r\n" % (len(data), data))
            return buffered() <= CLIENT_HIGH_WATER

    else:

        def sink(data: bytes) -> bool:
            write(data)
            return buffered() <= CLIENT_HIGH_WATER

    resp.push_to(sink)
    while not await resp.wait_pushed(idle_timeout):
        await writer.drain()
        if transport.is_closing():
            raise ConnectionResetError("client went away")
        resp.resume_push()
    await out.write_eof()
