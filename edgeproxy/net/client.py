"""A small HTTP/1.1 client for upstream connections: one protocol object per connection.

Why not aiohttp's ClientSession: it costs ~150 µs per request on this path (measured), more
than the whole budget of the proxy, and it hides what we need to see: when the connection was
set up and how long it took, whether any byte of the request or the response crossed, and
the moment a connection dies. httptools (llhttp, the parser Node.js uses) does the parsing.

A ``Conn`` carries one request at a time. ``Response`` is the per-request state the parser
fills in; the relay reads body chunks from it as they arrive and calls ``release()`` when done,
which returns the connection to its pool only if the whole message was read and the origin
allows keep-alive.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Final, Protocol

import httptools

from ..proto.codec import DecodeError
from ..proto.errors import UpstreamBadEncoding, UpstreamProtocolError, UpstreamReset
from .waits import Waits

if TYPE_CHECKING:
    from ..proto.codec import Decoder

__all__ = ["Conn", "ConnOwner", "Response"]

# Stop reading from the origin when this much body is buffered and unread (a slow client):
# the kernel's window then pushes back on the origin instead of our memory growing.
READ_HIGH_WATER: Final = 512 * 1024
READ_LOW_WATER: Final = 64 * 1024
# Response headers that describe a compressed body, dropped when we decode it.
_CODING_HEADERS: Final = frozenset({b"content-encoding", b"content-length"})
# Request bodies above this are written as a second buffer instead of joined to the head.
JOIN_LIMIT: Final = 64 * 1024


class ConnOwner(Protocol):
    """What a Conn needs from whoever hands it out (a Pool, structurally): a name for its repr,
    the connection back when its response is done, and word when it is lost."""

    label: str

    def release(self, conn: Conn) -> None: ...

    def on_conn_lost(self, conn: Conn) -> None: ...


class Conn(asyncio.Protocol):
    """One upstream connection. Answers questions (``is_idle``...), does no scheduling."""

    __slots__ = (
        "_drain",
        "_lost",
        "_paused",
        "closed",
        "created",
        "idle_since",
        "pool",
        "requests",
        "reusable",
        "resp",
        "transport",
    )

    def __init__(self, pool: ConnOwner) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self.closed = False
        self.created = time.monotonic()
        self.idle_since = self.created
        self.requests = 0
        self.reusable = True  # False once a request was cut short on it
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("active" if self.resp else "idle")
        return f"<Conn {self.pool.label} {state} requests={self.requests}>"

    # -- questions -------------------------------------------------------------------------
    def is_idle(self) -> bool:
        return self.resp is None and not self.closed

    def has_expired(self, now: float, keepalive: float) -> bool:
        return self.closed or now - self.idle_since > keepalive

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None or resp.parser is None:
            # Bytes while idle: the origin is closing (408) or talking nonsense. Never hand
            # this connection out again.
            self.close()
            return
        try:
            resp.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            resp.fail(UpstreamProtocolError("origin switched protocols unexpectedly"))
            self.close()
        except httptools.HttpParserError as exc:
            resp.fail(UpstreamProtocolError(f"malformed response from origin: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        # The origin is done with this connection: never hand it out again, even before
        # connection_lost arrives (a request written now would meet a closed socket).
        self.closed = True
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self._lost.done():
            self._lost.set_result(None)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(UpstreamReset("origin closed the connection", sent=True))
            self._drain.exception()
        resp = self.resp
        if resp is not None:
            resp.on_connection_lost(exc)
        self.pool.on_conn_lost(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def drain(self) -> None:
        if self.closed:
            raise UpstreamReset("origin closed the connection while we were sending", sent=True)
        if self._paused:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

    # -- one request -----------------------------------------------------------------------
    def send(self, method: str, head: bytes, body: bytes | None, on_end: Callable[[Response], None] | None) -> Response:
        """Write the request head (and a buffered body); return the Response to wait on.

        On a connection that closed meanwhile, the Response is failed at once (nothing was
        sent, so another attempt is safe).
        """
        resp = Response(self, method, on_end)
        self.resp = resp
        self.requests += 1
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            resp.fail(UpstreamReset("connection closed before the request was sent", sent=False))
            return resp
        resp.sent_at = time.monotonic()
        if body:
            if len(body) <= JOIN_LIMIT:
                transport.write(head + body)
            else:
                transport.writelines((head, body))
        else:
            transport.write(head)
        return resp

    async def send_stream(self, chunks: AsyncIterator[bytes], chunked: bool) -> None:
        """Write a streamed request body, honouring the origin's flow control."""
        transport = self.transport
        assert transport is not None
        async for chunk in chunks:
            resp = self.resp
            if resp is not None and resp.head_done:
                # The origin answered before the upload ended (a 413, a 401): stop sending;
                # its answer stands, and this connection cannot carry another request.
                self.reusable = False
                return
            if self.closed:
                raise UpstreamReset("origin closed the connection during the upload", sent=True)
            if not chunk:
                continue
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            await self.drain()
        if chunked:
            transport.write(b"0\r\n\r\n")

    def on_response_done(self, resp: Response, reusable: bool) -> None:
        """Called once per response, when its reader is finished with it."""
        if self.resp is resp:
            self.resp = None
        if reusable and self.reusable and not self.closed:
            self.idle_since = time.monotonic()
            self.pool.release(self)
        else:
            self.close()
            self.pool.release(self)


class Response(Waits):
    """An upstream response as the parser sees it; the relay reads it chunk by chunk (the
    awaits, ``wait_head``, ``read``, ``wait_pushed``..., are in waits.py)."""

    __slots__ = (  # and those of Waits
        "_framed",
        "_on_end",
        "_reading_paused",
        "_released",
        "_sink",
        "conn",
        "decide",
        "decoder",
        "headers",
        "keep_alive",
        "method",
        "parser",
        "sent_at",
        "status",
    )

    def __init__(self, conn: Conn, method: str, on_end: Callable[[Response], None] | None) -> None:
        self.conn = conn
        self.method = method
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.bytes_read = 0
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None
        self._released = False
        self._on_end = on_end
        self._reading_paused = False
        self._sink: Callable[[bytes], bool] | None = None
        self._sink_blocked = False
        self.last_data_at = 0.0
        self.sent_at = 0.0
        # Set by the sender when the body may come compressed for us (a `via` hop): called
        # with the headers, it returns the Decoder to undo the coding, or None to pass it on.
        self.decide: Callable[[list[tuple[bytes, bytes]]], Decoder | None] | None = None
        self.decoder: Decoder | None = None
        self._framed: bool | None = None

    def __repr__(self) -> str:
        return f"<Response {self.status} complete={self.complete} read={self.bytes_read}>"

    # -- parser callbacks (httptools calls these by name) ----------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            self._after_end()
            return
        self.headers.append((name, value))

    def _after_end(self) -> None:
        # Bytes after the end of the response: a second message nobody asked for (a buggy
        # or hostile origin). It must not touch this response; the connection is retired.
        self.conn.close()

    def on_headers_complete(self) -> None:
        if self.complete:
            self._after_end()
            return
        parser = self.parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200:
            # 1xx interim (we never send Expect; an origin may still send 103): drop it and
            # wait for the final response on a fresh parser state.
            self.headers = []
            return
        self.status = status
        self.head_done = True
        if self.method == "HEAD":
            # llhttp cannot be told this response has no body; finish here ourselves and
            # retire the connection so no body bytes can confuse the next response.
            self.complete = True
            self.parser = None
            self.conn.close()
        elif self.decide is not None and status not in (204, 304):
            decoder = self.decide(self.headers)
            if decoder is not None:
                # From here on the body is seen decoded, by everyone: the framing was the
                # compressed one, so its headers go (the relay re-frames the plain bytes).
                self._framed = self._has_framing()
                self.decoder = decoder
                self.headers = [h for h in self.headers if h[0].lower() not in _CODING_HEADERS]
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self._after_end()
            return
        self.last_data_at = time.monotonic()
        if self.decoder is not None:
            try:
                body = self.decoder.feed(body)
            except DecodeError as exc:
                self._bad_encoding(exc)
                return
            if not body:
                return
        sink = self._sink
        if sink is not None:
            # Push mode: straight to the client, no task wake-up per chunk.
            self.bytes_read += len(body)
            if not sink(body):
                self._block_on_sink()
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_WATER and not self._reading_paused:
            self._pause_reading()
        self._wake()

    def _pause_reading(self) -> None:
        self._reading_paused = True
        transport = self.conn.transport
        if transport is not None and not self.conn.closed:
            transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            transport = self.conn.transport
            if transport is not None and not self.conn.closed:
                transport.resume_reading()

    def _block_on_sink(self) -> None:
        # The client is not keeping up: stop reading from the origin (TCP pushes back on it)
        # until the relay has drained the client side.
        if not self._reading_paused:
            self._pause_reading()
        self._sink_blocked = True
        self._wake()

    def _bad_encoding(self, exc: DecodeError) -> None:
        self.fail(UpstreamBadEncoding(f"compressed response body: {exc}"))
        self.conn.close()  # nothing more of it is worth reading

    def _decoded_to_end(self) -> bool:
        """The body ended: was the compressed stream whole? (False: failed.)"""
        if self.decoder is not None:
            try:
                self.decoder.finish()
            except DecodeError as exc:
                self._bad_encoding(exc)
                return False
        return True

    def on_message_complete(self) -> None:
        if self.head_done and self._decoded_to_end():
            # Ask now: llhttp forgets the message's keep-alive state once it resets.
            self.keep_alive = self.parser is not None and self.parser.should_keep_alive()
            self.complete = True
            self._wake()

    # -- events from the connection --------------------------------------------------------
    def on_connection_lost(self, exc: Exception | None) -> None:
        if self.complete:
            return
        if exc is None and self.head_done and self.parser is not None and not self._has_framing():
            # A body delimited by connection close (no Content-Length, not chunked): a clean
            # EOF is its normal end (a reset is not).
            if not self._decoded_to_end():
                return
            self.complete = True
            self._wake()
            return
        where = "while sending the body" if self.head_done else "before response headers"
        detail = f": {exc}" if exc else ""
        self.fail(UpstreamReset(f"origin closed the connection {where}{detail}", sent=True))

    def fail(self, exc: BaseException) -> None:
        if self._exc is None and not self.complete:
            self._exc = exc
        self._wake()

    def _has_framing(self) -> bool:
        if self._framed is not None:
            return self._framed
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value.lower()):
                return True
        return False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- for the relay ---------------------------------------------------------------------
    def buffered(self) -> bytes | None:
        """Everything that already arrived, if that is the whole body (the fast path)."""
        if self.complete and self._exc is None:
            data = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
            self._chunks.clear()
            self.bytes_read += len(data)
            self._buffered = 0
            return data
        return None

    # -- push mode (streams) ---------------------------------------------------------------
    def push_to(self, sink: Callable[[bytes], bool]) -> None:
        """From now on hand each body chunk to ``sink`` as it arrives (what already arrived
        first). ``sink`` returns False when the client is full: reading then pauses and
        ``wait_pushed`` returns False so the relay can drain the client."""
        self._sink = sink
        while self._chunks:
            data = self._chunks.popleft()
            self.bytes_read += len(data)
            if not sink(data):
                self._block_on_sink()
        self._buffered = 0
        if not self._sink_blocked:
            self._resume_reading()  # reading may have paused while it all piled up

    def resume_push(self) -> None:
        """The client drained: read from the origin again."""
        self._resume_reading()

    def check(self) -> None:
        """Raise the failure already known (a body that does not decode), if any."""
        if self._exc is not None:
            raise self._exc

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def release(self) -> None:
        """Done with this response: keep the connection if the body was read to its end."""
        if self._released:
            return
        self._released = True
        reusable = self.complete and self.keep_alive and self._exc is None
        if reusable and self._reading_paused:
            self._resume_reading()  # never pool a connection that does not read
        self.parser = None
        if self._on_end is not None:
            self._on_end(self)
        self.conn.on_response_done(self, reusable)
