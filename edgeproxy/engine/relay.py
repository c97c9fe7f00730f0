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

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from ..net.client import Response
from ..proto.errors import ProxyError
from ..proto.sse import ends_stream, last_event_end
from .ctx import Transform

__all__ = ["STATUS_CLIENT_CLOSED", "EventFramer", "one_tap", "push_body", "push_to"]

STATUS_CLIENT_CLOSED: Final = 499  # nginx's convention for "client went away first"
# Client socket bytes buffered before we stop reading from the origin.
CLIENT_HIGH_WATER: Final = 256 * 1024
# An "event" longer than this without a blank line is not SSE we can frame: pass it on.
MAX_HELD_EVENT: Final = 1024 * 1024


async def push_body(
    request: web.BaseRequest,
    out: web.StreamResponse,
    resp: Response,
    idle_timeout: float,
    sse: bool,
    transform: Transform | None = None,
    tap: Callable[[bytes], None] | None = None,
    delivered: Callable[[], None] | None = None,
) -> None:
    """Stream ``resp``'s body to the client; return at its end.

    For SSE (``sse``) only whole events go out: a partial event is held until its blank line
    arrives (no delay: a client cannot use half an event), so that if the origin breaks off,
    the in-band error that follows starts on an event boundary instead of gluing itself to
    half a JSON line. At a clean end, whatever is held goes out as it is. ``tap``, if given,
    sees every run of whole events that goes out (filters' SSE taps: usage metering...).

    With a ``transform`` (an edge compressing for the hop) every write goes through it, and
    it says what is decodable at once (a compressor flushes per write: each event is usable
    as soon as it arrives; its window still spans events, which is what makes a stream
    shrink); at the end its last bytes go out.

    ``delivered`` is called once everything the client needs has been written: the stream's
    own end event, or the whole body (a client that hangs up after that, before the last empty
    chunk, got its answer: it is not logged as gone).

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

        def emit(data: bytes) -> bool:
            write(b"%x\r\n%b\r\n" % (len(data), data))
            return buffered() <= CLIENT_HIGH_WATER

    else:

        def emit(data: bytes) -> bool:
            write(data)
            return buffered() <= CLIENT_HIGH_WATER

    send = emit if transform is None else _transforming(emit, transform)

    async def drained() -> None:
        try:
            # A client that stops reading must not hold an upstream connection for ever.
            async with asyncio.timeout(idle_timeout):
                await writer.drain()
        except TimeoutError:
            transport.abort()
            raise ConnectionResetError(f"client read nothing for {idle_timeout:g}s") from None
        if transport.is_closing():
            raise ConnectionResetError("client went away")

    framer = EventFramer(send, tap, delivered) if sse else None
    # (a cut or stall after the stream's own end marker went out loses nothing: finish cleanly
    # instead of appending an error after the end)
    if await _pump(resp, send, framer, idle_timeout, drained) and delivered is not None:
        delivered()
    await _end(out, write, transform, writer.chunked)  # type: ignore[attr-defined]


async def push_to(
    resp: Response, add: Callable[[bytes], bool], idle_timeout: float, sse: bool, tap: Callable[[bytes], None] | None
) -> None:
    """``push_body`` for an answer that goes to a sink (``add``: a shared flight), not to one
    client: whole events for SSE, seen by ``tap``. Raises ProxyError if the origin fails or
    falls silent for ``idle_timeout`` before the stream's own end."""
    await _pump(resp, add, EventFramer(add, tap) if sse else None, idle_timeout, None)


async def _pump(
    resp: Response,
    sink: Callable[[bytes], bool],
    framer: EventFramer | None,
    idle_timeout: float,
    drained: Callable[[], Awaitable[None]] | None,
) -> bool:
    """Push ``resp``'s body into ``sink`` (through ``framer``, for SSE) until its end: True.
    False: the origin broke off after the stream's own end event went on (nothing lost).
    ``drained``: awaited whenever the sink asks to pause, before reading on."""
    resp.push_to(framer.push if framer is not None else sink)
    while True:
        try:
            if await resp.wait_pushed(idle_timeout):
                break
        except ProxyError:
            if framer is not None and ends_stream(framer.last):
                return False
            raise
        if drained is not None:
            await drained()
        resp.resume_push()
    if framer is not None:
        framer.flush()
    return True


class EventFramer:
    """An SSE sink that passes on whole events only: a partial event is held until its blank
    line arrives (no delay: a client cannot use half an event), so that if the origin breaks
    off, an in-band error that follows starts on an event boundary. ``tap`` sees every run of
    whole events passed on; ``delivered`` is called once the stream's own end has been."""

    __slots__ = ("delivered", "held", "last", "send", "tap")

    def __init__(
        self,
        send: Callable[[bytes], bool],
        tap: Callable[[bytes], None] | None = None,
        delivered: Callable[[], None] | None = None,
    ) -> None:
        self.send, self.tap, self.delivered = send, tap, delivered
        self.held = self.last = b""

    def push(self, data: bytes) -> bool:
        if self.held:
            data, self.held = self.held + data, b""
        if data[-2:] != b"\n\n":  # the common case: a chunk that ends an event
            end = last_event_end(data)
            if end < 0 and len(data) <= MAX_HELD_EVENT:
                self.held = data
                return True
            if 0 <= end < len(data):
                data, self.held = data[:end], data[end:]
        self.last = data
        if self.tap is not None:
            self.tap(data)
        more = self.send(data)
        if self.delivered is not None and ends_stream(data):
            self.delivered()
        return more

    def flush(self) -> None:
        """At a clean end: a last event without its blank line goes on as the origin sent it."""
        if self.held:
            self.send(self.held)
            self.held = b""


def _transforming(emit: Callable[[bytes], bool], transform: Transform) -> Callable[[bytes], bool]:
    # Each write goes out transformed at once (a hop's compression flushes per write): an SSE
    # event is decodable at the other end as soon as it arrives.
    def transformed(data: bytes) -> bool:
        data = transform.process(data)
        return emit(data) if data else True  # (nothing to send: never an empty chunk, it ends the body)

    return transformed


async def _end(
    out: web.StreamResponse, write: Callable[[bytes], None], transform: Transform | None, chunked: bool
) -> None:
    if transform is not None:
        tail = transform.finish()
        if tail:
            write(b"%x\r\n%b\r\n" % (len(tail), tail) if chunked else tail)
    await out.write_eof()


def one_tap(taps: list[Callable[[bytes], None]]) -> Callable[[bytes], None] | None:
    """A reply's taps as one callable (None when there are none)."""
    if not taps:
        return None
    if len(taps) == 1:
        return taps[0]

    def every(data: bytes) -> None:
        for tap in taps:
            tap(data)

    return every
