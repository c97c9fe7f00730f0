"""How guessable a listener token is: the placeholder we ship, and a simple strength estimate.

A listener reachable from other hosts is protected by its tokens alone, so there a token must
be a secret: not the try-out placeholder of ``conf/edge.yaml``, not one character repeated, and
worth at least ``MIN_BITS`` by the estimate below (what a random token of its length and
alphabet would hold; a token made of a short repeated unit counts as that unit). It is simple
on purpose: it catches the tokens people type by hand, and never refuses a generated one
(``openssl rand -hex 24`` is 192 bits; 16 random hex characters are exactly 64).
"""

from __future__ import annotations

import math
import string
from typing import Final

__all__ = ["MIN_BITS", "PLACEHOLDER", "estimate_bits", "weakness"]

PLACEHOLDER: Final = "local-try-out-token-change-me"  # conf/edge.yaml's default for ${EDGE_TOKEN}
_PLACEHOLDER_MARKS: Final = ("change-me", "changeme", "change_me")
MIN_BITS: Final = 64
_HEX: Final = (frozenset("0123456789abcdef-"), frozenset("0123456789ABCDEF-"))  # (uuids keep their dashes)
_CLASSES: Final = (
    (frozenset(string.digits), 10),
    (frozenset(string.ascii_lowercase), 26),
    (frozenset(string.ascii_uppercase), 26),
)
_OTHER: Final = 33  # printable ASCII punctuation, and anything else


def _alphabet(token: str) -> int:
    chars = set(token)
    if any(chars <= hexdigits for hexdigits in _HEX) and not chars <= set(string.digits + "-"):
        return 16
    size = sum(n for cls, n in _CLASSES if chars & cls)
    if any(not any(c in cls for cls, _ in _CLASSES) for c in chars):
        size += _OTHER
    return max(size, 2)


def _period(token: str) -> int:
    """The length of the shortest unit the token repeats (at least twice), else its length."""
    n = len(token)
    border = [0] * n  # KMP prefix function: the longest proper prefix that is also a suffix
    k = 0
    for i in range(1, n):
        while k and token[i] != token[k]:
            k = border[k - 1]
        if token[i] == token[k]:
            k += 1
        border[i] = k
    period = n - border[-1] if n else 0
    return period if period * 2 <= n else n


def estimate_bits(token: str) -> float:
    """What a random token of this alphabet and (unrepeated) length would hold, in bits."""
    return _period(token) * math.log2(_alphabet(token))


def weakness(token: str) -> str | None:
    """Why ``token`` is no secret for a listener other hosts can reach, or None if it is fine.
    The answer never quotes the token."""
    how = "generate one with `openssl rand -hex 24`"
    lowered = token.lower()
    if token == PLACEHOLDER or any(mark in lowered for mark in _PLACEHOLDER_MARKS):
        return (
            "this is a placeholder, not a secret; a listener reachable from other hosts needs a real"
            f" token ({how}; conf/edge.yaml takes it from EDGE_TOKEN)"
        )
    if len(set(token)) == 1:
        return f"one character repeated is no secret ({how})"
    bits = estimate_bits(token)
    if bits < MIN_BITS:
        return (
            f"token too easy to guess (about {bits:.0f} bits by a simple estimate; a listener reachable"
            f" from other hosts needs {MIN_BITS} or more, e.g. 16 random hex characters: {how})"
        )
    return None
