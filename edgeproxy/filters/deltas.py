"""Conversation deltas: a body that extends one sent lately crosses the hop as the rest only.

A chat request re-sends the whole conversation every turn: turn N's body is turn N-1's with
a few messages more. So a sidecar that sent body B over a `via` line may send the next one as
"the first n bytes of B (named by its hash), then this compressed suffix", and the edge, which
kept B, puts it back together. If the edge no longer has B it answers 409 `hop_base_unknown`
and the sidecar sends the whole body at once, on the same path: nothing for the client to see.
Both sides keep recent bodies in a ``Bases`` store: the sidecar one per `via` line (what it
sent that edge), the edge one for all sidecars.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Final

__all__ = ["EDGE_BASES", "EDGE_BASE_BYTES", "MIN_BASE", "Bases", "body_hash", "edge_bases"]

MIN_BASE: Final = 4096  # bodies smaller than this are not kept (nor worth a delta)
MIN_PREFIX: Final = 2048  # a shared prefix shorter than this is not worth naming
# Bodies an edge keeps as bases, for all sidecars: at most this many, this many bytes in all.
EDGE_BASES: Final = 256
EDGE_BASE_BYTES: Final = 64 << 20


def body_hash(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def edge_bases() -> Bases:
    """The store an edge keeps its bases in (one per process, shared by its listeners)."""
    return Bases(EDGE_BASES, EDGE_BASE_BYTES, EDGE_BASE_BYTES // 4)


class Bases:
    """Recent bodies by hash, least recently used dropped first, bounded in count and bytes.
    The sidecar keeps one per `via` line (what it sent that edge); the edge one for all."""

    __slots__ = ("_bodies", "_bytes", "max_body", "max_bytes", "max_count")

    def __init__(self, max_count: int, max_bytes: int, max_body: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.max_body = max_body
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._bodies)

    def add(self, body: bytes, digest: str | None = None) -> str | None:
        """Keep ``body`` (if its size is worth it); its hash, or None if not kept."""
        if not MIN_BASE <= len(body) <= self.max_body:
            return None
        digest = digest or body_hash(body)
        old = self._bodies.pop(digest, None)
        if old is not None:
            self._bytes -= len(old)
        self._bodies[digest] = body
        self._bytes += len(body)
        while len(self._bodies) > self.max_count or self._bytes > self.max_bytes:
            _, dropped = self._bodies.popitem(last=False)
            self._bytes -= len(dropped)
        return digest

    def get(self, digest: str) -> bytes | None:
        body = self._bodies.get(digest)
        if body is not None:
            self._bodies.move_to_end(digest)
        return body

    def best(self, body: bytes) -> tuple[str, int, int] | None:
        """The kept body sharing the longest prefix with ``body`` (at least MIN_PREFIX bytes):
        its hash, the prefix length, and the length of the suffix they also share after it
        (the tools and settings a request carries after its messages). Most recent first; a
        cheap first-bytes check skips the rest, so this costs a few memcmp calls a candidate."""
        if len(body) < MIN_BASE:
            return None
        head = body[:64]
        found: tuple[str, int] | None = None
        for digest in reversed(self._bodies):
            base = self._bodies[digest]
            if base[:64] != head:
                continue
            n = _common_prefix(base, body)
            if n >= MIN_PREFIX and (found is None or n > found[1]):
                found = (digest, n)
        if found is None:
            return None
        digest, n = found
        return digest, n, _common_suffix(self._bodies[digest], body, n)


def _common_suffix(a: bytes, b: bytes, skip: int) -> int:
    """How many bytes ``a`` and ``b`` share at their ends, not counting their first ``skip``."""
    end = min(len(a), len(b)) - skip
    if end <= 0:
        return 0
    ma, mb = memoryview(a)[::-1], memoryview(b)[::-1]
    return _common_prefix_views(ma[:end], mb[:end])


def _common_prefix(a: bytes, b: bytes) -> int:
    return _common_prefix_views(memoryview(a), memoryview(b))


def _common_prefix_views(ma: memoryview, mb: memoryview) -> int:
    end = min(len(ma), len(mb))
    block = 4096
    i = 0
    while i < end and ma[i : i + block] == mb[i : i + block]:
        i += block
    if i >= end:
        return end
    lo, hi = i, min(i + block, end)  # the first difference is in [lo, hi)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ma[lo:mid] == mb[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
