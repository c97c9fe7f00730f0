"""One upstream answer fetched once and served to every client that asked for it at the same
moment (request coalescing; Pingora calls it a cache lock, nginx ``proxy_cache_lock``).

A filter (the cache) decides which requests share an answer: it gives each a ``Flight`` in
``ctx.flight``, the first one leading (``ctx.leads``). The engine then fetches the leader's
answer in a task of its own (``engine/sharing.py``: the attempts, the response filters, the
body into ``Flight.add``), not in the leader's handler: the leader's client going away does not
cancel it while others wait. Every sharer, the leader too, is served from the flight: the head
once it is there, then the body already in and each chunk as it comes
(for SSE, whole events: live fan-out). A failure before commit reaches every sharer as the
same error; a stream that breaks after it ends with the same in-band error for all. When the
last sharer has gone, the fetch is cancelled (the origin stops generating).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..proto.errors import LeaderGone

if TYPE_CHECKING:
    from ..proto.errors import ProxyError

__all__ = ["Flight"]


class Flight:
    """The shared answer: head, body so far, and how it ended."""

    __slots__ = (
        "_changed",
        "broken",
        "chunks",
        "done",
        "error",
        "headers",
        "joined",
        "key",
        "sharers",
        "size",
        "sse",
        "status",
        "task",
    )

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.status = 0  # 0 until the head is in
        self.headers: list[tuple[str, str]] = []  # as the client gets them, x-request-id left out
        self.sse = False
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False
        self.broken = False  # ended with an in-band error (after commit): never stored
        self.error: ProxyError | None = None  # failed before commit: every sharer's answer
        self.sharers = 0  # being served now
        self.joined = 0  # served, in all (the leader too)
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Flight {self.key.hex()[:12]} {self.status} {self.size}B sharers={self.sharers} done={self.done}>"

    # -- the producer ------------------------------------------------------------------------
    def begin(self, status: int, headers: list[tuple[str, str]], sse: bool) -> None:
        self.status, self.sse = status, sse
        self.headers = [h for h in headers if h[0].lower() != "x-request-id"]
        self._changed.set()

    def add(self, data: bytes) -> bool:
        if data:
            self.chunks.append(data)
            self.size += len(data)
            self._changed.set()
        return True  # (a sink for the relay: never asks the origin to pause)

    def finish(self, error: ProxyError | None = None, broken: bool = False) -> None:
        """The end: clean, broken after commit (its in-band error already added), or failed
        before commit (``error``)."""
        if self.done:
            return
        self.done, self.error, self.broken = True, error, broken
        self._changed.set()

    # -- the sharers -------------------------------------------------------------------------
    async def changed(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    def join(self) -> None:
        """A request shares this answer from now on (the filter that gave it the flight says so
        at once: a fetch is not cancelled while one that will wait for it is on its way)."""
        self.sharers += 1
        self.joined += 1

    def leave(self, leader: bool = False) -> None:
        """A sharer is done (served, or its client left); the last one out cancels a fetch
        still running: nobody is waiting for it. A leader leaving before its fetch began
        (gone while its body was read) fails the flight: nobody will fetch it."""
        self.sharers -= 1
        if self.done:
            return
        if self.task is None:
            if leader:
                self.finish(error=LeaderGone("the identical request this one waited for went away first", 1.0))
        elif self.sharers <= 0:
            self.task.cancel()
