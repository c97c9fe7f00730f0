"""Where cached answers live: in this process (``MemoryStore``, least recently used first out,
bounded in bytes) or in Redis (``RedisStore`` in redisstore.py, shared across processes and
hosts). Both hold ``Entry`` objects under a key made by ``filters.cache`` (a digest: never a
secret, never a prompt).

A store never raises to its caller and never makes a client wait long: a failure is a miss
(``get`` returns None) or a dropped write, counted in ``errors``.
"""

from __future__ import annotations

import collections
import struct
import time
from dataclasses import dataclass
from typing import Final, Protocol

import orjson

__all__ = ["Entry", "MemoryStore", "Store", "decode", "encode"]

# Entry wire format: magic, header length (4 bytes, big endian), the header (JSON), the body.
MAGIC: Final = b"EPC1"


@dataclass(frozen=True, slots=True)
class Entry:
    """A complete 200 answer as the client got it: its headers (hop-by-hop ones and
    ``x-request-id`` left out), its body (an SSE stream's bytes, ended as its protocol ends
    it), and the tokens it used (what a hit saves)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    sse: bool
    tokens: int = 0
    stored_at: float = 0.0  # wall clock

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 64


def encode(entry: Entry) -> bytes:
    head = orjson.dumps(
        {"s": entry.status, "h": entry.headers, "e": entry.sse, "t": entry.tokens, "at": entry.stored_at}
    )
    return MAGIC + struct.pack(">I", len(head)) + head + entry.body


def decode(data: bytes) -> Entry | None:
    """The entry, or None for anything that is not one (another program's value, a torn write)."""
    if len(data) < 8 or data[:4] != MAGIC:
        return None
    (n,) = struct.unpack(">I", data[4:8])
    if 8 + n > len(data):
        return None
    try:
        head = orjson.loads(data[8 : 8 + n])
        headers = tuple((str(k), str(v)) for k, v in head["h"])
        return Entry(int(head["s"]), headers, data[8 + n :], bool(head["e"]), int(head["t"]), float(head["at"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class Store(Protocol):
    """What the cache filter needs of a store. Never raises (but CancelledError)."""

    name: str
    entries: int
    stored_bytes: int
    evictions: int
    errors: int

    async def get(self, key: bytes) -> Entry | None: ...

    async def put(self, key: bytes, entry: Entry, ttl: float) -> None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """Entries in this process, at most ``max_memory`` bytes in all; the least recently used
    go first, expired ones when they are found."""

    __slots__ = ("_items", "entries", "errors", "evictions", "max_memory", "name", "stored_bytes")

    def __init__(self, max_memory: int) -> None:
        self.name = "memory"
        self.max_memory = max_memory
        self._items: collections.OrderedDict[bytes, tuple[Entry, float]] = collections.OrderedDict()
        self.entries = self.stored_bytes = self.evictions = self.errors = 0

    async def get(self, key: bytes) -> Entry | None:
        item = self._items.get(key)
        if item is None:
            return None
        entry, expires = item
        if time.monotonic() >= expires:
            self._drop(key, entry)
            return None
        self._items.move_to_end(key)
        return entry

    async def put(self, key: bytes, entry: Entry, ttl: float) -> None:
        size = entry.size
        if size > self.max_memory:
            return
        old = self._items.get(key)
        if old is not None:
            self._drop(key, old[0])
        while self._items and self.stored_bytes + size > self.max_memory:
            oldest, (gone, _) = next(iter(self._items.items()))
            self._drop(oldest, gone)
            self.evictions += 1
        self._items[key] = (entry, time.monotonic() + ttl)
        self.entries += 1
        self.stored_bytes += size

    def _drop(self, key: bytes, entry: Entry) -> None:
        del self._items[key]
        self.entries -= 1
        self.stored_bytes -= entry.size

    async def close(self) -> None:
        self._items.clear()
        self.entries = self.stored_bytes = 0
