"""The relay's waits on an upstream ``Response``: its head, a first SSE event, a body chunk,
the end of a pushed body. Each await arms one timer, whose callback fails the response.

A base of ``client.Response``, split from it to keep the parser side (the loop callbacks that
fill the response in) apart from the awaiting side. The slots the waits read are declared
here; Response sets them up and fills them in.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING, Final

from ..proto.errors import FirstEventTimeout, UpstreamTimeout
from ..proto.sse import last_event_end

__all__ = ["Waits"]

# Waiting for an SSE stream's first event, we buffer up to this much of it.
MAX_FIRST_EVENT: Final = 1024 * 1024


class Waits:
    """The awaits of a Response."""

    # The state the waits read (Response's __init__ sets it, its parser callbacks fill it in).
    __slots__ = (
        "_buffered",
        "_chunks",
        "_exc",
        "_sink_blocked",
        "_waiter",
        "bytes_read",
        "complete",
        "head_done",
        "last_data_at",
    )
    _buffered: int
    _chunks: collections.deque[bytes]
    _exc: BaseException | None
    _sink_blocked: bool
    _waiter: asyncio.Future[None] | None
    bytes_read: int
    complete: bool
    head_done: bool
    last_data_at: float

    if TYPE_CHECKING:

        def fail(self, exc: BaseException) -> None: ...

        def _resume_reading(self) -> None: ...

    async def wait_head(self, timeout: float) -> None:
        """Wait for the status line and headers; raises UpstreamTimeout/UpstreamReset."""
        if not self.head_done and self._exc is None:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, self._on_timeout, waiter, timeout)
            try:
                while not self.head_done and self._exc is None:
                    await waiter
                    if not self.head_done and self._exc is None:
                        self._waiter = waiter = loop.create_future()
            finally:
                timer.cancel()
                self._waiter = None
        if self._exc is not None and not self.head_done:
            raise self._exc

    async def wait_event(self, timeout: float) -> None:
        """Wait until one whole SSE block (an event, or a comment) has arrived, or the body
        ended. Raises FirstEventTimeout after ``timeout`` seconds, or the origin's failure.

        Any complete block counts: an origin that sends keep-alive comments is alive.
        """
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout, self._on_event_timeout, timeout)
        try:
            while True:
                if self._exc is not None:
                    raise self._exc
                if self.complete or self._has_block():
                    return
                if self._buffered > MAX_FIRST_EVENT:
                    return  # a first "event" this big is not one we can frame: go on as bytes
                self._resume_reading()  # a first event may be larger than READ_HIGH_WATER
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            timer.cancel()

    async def wait_body(self, limit: int, timeout: float) -> bytes | None:
        """Wait for the whole body and return it, left in place: ``read``, ``buffered`` and
        ``push_to`` still see all of it (a filter reads an error answer before the engine
        decides what to do with it). None when it is more than ``limit`` bytes, has not
        ended within ``timeout`` seconds, or broke: nothing is failed here, the relay goes
        on with its own timeouts and reports what broke."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._exc is not None or self._buffered > limit:
                return None
            if self.complete:
                chunks = self._chunks
                if len(chunks) > 1:
                    joined = b"".join(chunks)
                    chunks.clear()
                    chunks.append(joined)
                return chunks[0] if chunks else b""
            left = deadline - loop.time()
            if left <= 0:
                return None
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(left, _wake_up, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None

    def _has_block(self) -> bool:
        chunks = self._chunks
        if not chunks:
            return False
        if len(chunks) > 1:
            joined = b"".join(chunks)
            chunks.clear()
            chunks.append(joined)
        return last_event_end(chunks[0]) >= 0

    def _on_event_timeout(self, timeout: float) -> None:
        if not self.complete and not self._has_block():
            self.fail(FirstEventTimeout(f"no SSE event from origin within {timeout:g}s of its headers"))

    def _on_timeout(self, waiter: asyncio.Future[None], timeout: float) -> None:
        if self.head_done:
            return
        self.fail(UpstreamTimeout(f"no response headers from origin within {timeout:g}s"))

    async def read(self, idle_timeout: float | None = None) -> bytes:
        """Next body chunk as it arrived; b"" at the end of the body.

        Raises UpstreamReset if the origin cut the body short, UpstreamTimeout if no byte
        came for ``idle_timeout`` seconds.
        """
        while True:
            if self._chunks:
                if len(self._chunks) == 1:
                    data = self._chunks.popleft()
                else:
                    data = b"".join(self._chunks)
                    self._chunks.clear()
                self._buffered = 0
                self.bytes_read += len(data)
                self._resume_reading()
                return data
            if self._exc is not None:
                raise self._exc
            if self.complete:
                return b""
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = None
            if idle_timeout is not None:
                timer = loop.call_later(idle_timeout, self._on_idle, waiter, idle_timeout)
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                self._waiter = None

    def _on_idle(self, waiter: asyncio.Future[None], timeout: float) -> None:
        if not waiter.done():
            self.fail(UpstreamTimeout(f"origin sent nothing for {timeout:g}s mid-response"))

    async def wait_pushed(self, idle_timeout: float) -> bool:
        """True when the whole body was pushed; False when the sink is blocked.

        Raises UpstreamReset if the origin cut the body short, UpstreamTimeout if it sent
        nothing for ``idle_timeout`` seconds. One timer per wait, not per chunk.
        """
        loop = asyncio.get_running_loop()
        if not self.last_data_at:
            self.last_data_at = time.monotonic()
        while True:
            if self._exc is not None:
                raise self._exc
            if self.complete:
                return True
            if self._sink_blocked:
                self._sink_blocked = False
                return False
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(idle_timeout, self._on_push_idle, waiter, idle_timeout)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None

    def _on_push_idle(self, waiter: asyncio.Future[None], timeout: float) -> None:
        if waiter.done():
            return
        quiet = time.monotonic() - self.last_data_at
        if quiet >= timeout:
            self.fail(UpstreamTimeout(f"origin sent nothing for {timeout:g}s mid-response"))
        else:  # data came meanwhile: look again when the silence could first reach the limit
            asyncio.get_running_loop().call_later(timeout - quiet, self._on_push_idle, waiter, timeout)


def _wake_up(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
