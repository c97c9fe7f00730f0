"""Priority classes of requests (the admission queue's, filters/fairqueue.py), and how one
request's class is decided: what it asks for in ``x-edgeproxy-priority``, lowered to its
listener token's ``max_priority``, else its token's ``priority``."""

from __future__ import annotations

from typing import Final

__all__ = ["HEADER", "PRIORITIES", "RANK", "request_class"]

HEADER: Final = "x-edgeproxy-priority"
PRIORITIES: Final = ("high", "normal", "low")  # best first
RANK: Final = {c: i for i, c in enumerate(PRIORITIES)}


def request_class(asked: str | None, default: str, cap: str) -> str | None:
    """The class of a request that asked for ``asked`` (None: nothing) with a token whose class
    is ``default`` and whose ``max_priority`` is ``cap``; None if ``asked`` is not a class."""
    if asked is None:
        return default
    asked = asked.strip().lower()
    rank = RANK.get(asked)
    if rank is None:
        return None
    return asked if rank >= RANK[cap] else cap
