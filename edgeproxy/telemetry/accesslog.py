"""The access log: one line per request, JSON or text, written to stdout.

Lines are collected and written once per event-loop iteration, so a burst of requests costs
one write(2) instead of one per request, and a line is never held back longer than that.
No secret reaches this module: callers pass the path without its query string (Gemini
clients may put the key there) and never pass headers.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import orjson

__all__ = ["AccessLog"]


class AccessLog:
    __slots__ = ("_buf", "_fd", "_scheduled", "mode")

    def __init__(self, mode: str, fd: int | None = None) -> None:
        self.mode = mode  # json | text | off
        self._fd = sys.stdout.fileno() if fd is None else fd
        self._buf: list[bytes] = []
        self._scheduled = False

    def write(self, record: dict[str, Any]) -> None:
        if self.mode == "off":
            return
        if self.mode == "json":
            line = orjson.dumps(record) + b"\n"
        else:
            line = _text(record).encode() + b"\n"
        self._buf.append(line)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except BlockingIOError:
            pass  # a stalled log reader must not stall the proxy: drop the rest of this batch
        except OSError:
            pass


def _text(r: dict[str, Any]) -> str:
    return (
        f"{r.get('time')} {r.get('request_id')} {r.get('method')} {r.get('path')} {r.get('status')}"
        f" upstream={r.get('upstream')} endpoint={r.get('endpoint')} line={r.get('line')}"
        f" attempts={r.get('attempts')} ttfb_ms={r.get('ttfb_ms')} duration_ms={r.get('duration_ms')}"
        f" in={r.get('bytes_in')} out={r.get('bytes_out')} streamed={r.get('streamed')}"
        + (f" error={r['error']}" if r.get("error") else "")
    )
