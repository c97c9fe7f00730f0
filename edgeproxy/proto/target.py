"""Request-target hygiene: what a path must not contain before a key is put on it."""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote

__all__ = ["has_unsafe_segment"]

# Segments a client could use to climb out of an endpoint's base path at the origin, once
# decoded; and separators hidden inside a segment (an origin or a middlebox may decode them).
_DOT_SEGMENTS: Final = frozenset({".", ".."})


def has_unsafe_segment(target: str) -> bool:
    """Does the path of ``target`` (a request target; its query is not looked at) hold a dot
    segment (``.``, ``..``, also percent-encoded) or an encoded slash or backslash inside a
    segment? A clean target without dots or escapes costs two ``in`` tests."""
    if "." not in target and "%" not in target and "\\" not in target:
        return False
    path = target.partition("?")[0]
    if "\\" in path:
        return True  # some origins and URL parsers (WHATWG's, Node's) read it as a slash
    for segment in path.split("/"):
        if "%" in segment:
            segment = unquote(segment)
            if "/" in segment or "\\" in segment or "\x00" in segment:
                return True
        if segment in _DOT_SEGMENTS or segment.startswith(("..;", ".;")):  # (Tomcat reads ..;x as ..)
            return True
    return False
