"""Server-Sent Events framing, the little of it a proxy needs: where an event ends.

An event ends at a blank line, and SSE lines may end in CRLF, LF or CR (the HTML standard's
event-stream grammar), so a blank line is any two line ends in a row.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ends_stream", "last_event_end"]

# Two line ends in a row, in every spelling a server may use (longest first where one is a
# prefix of another, so the end index is the whole separator).
_BLANK_LINES: Final = (b"\r\n\r\n", b"\n\r\n", b"\r\n\n", b"\r\r\n", b"\n\n", b"\r\r")


def last_event_end(data: bytes) -> int:
    """Index just past the last complete event in ``data``; -1 if none ended."""
    end = -1
    for sep in _BLANK_LINES:
        i = data.rfind(sep)
        if i >= 0 and i + len(sep) > end:
            end = i + len(sep)
    return end


# The last event of a stream, as each provider that has one sends it (Gemini's streams just end).
END_MARKERS: Final = (b"data: [DONE]", b"event: message_stop")


def ends_stream(events: bytes) -> bool:
    """Do these (whole) events include the stream's own end?"""
    return any(marker in events for marker in END_MARKERS)
