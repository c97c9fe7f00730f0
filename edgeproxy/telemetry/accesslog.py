"""The access log: one line per request, JSON or text, written to stdout.

Lines are collected and handed to the sink once per event-loop iteration, so a burst of
requests costs one write(2) instead of one per request, and a line is never held back longer
than that. The sink never blocks: a reader that falls behind by more than ``log.buffer`` loses
whole lines, counted in ``dropped`` (edgeproxy_log_dropped_total{log="access"}) and said once
in the process log. No secret reaches this module: callers pass the path without its query
string (Gemini clients may put the key there) and never pass headers.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Final

import orjson

from .sink import LineSink

__all__ = ["DEFAULT_BUFFER", "AccessLog"]

DEFAULT_BUFFER: Final = 4 << 20  # log.buffer's default

log = logging.getLogger("edgeproxy")


class AccessLog:
    __slots__ = ("_buf", "_fd", "_scheduled", "_sink", "_told", "limit", "mode")

    def __init__(self, mode: str, fd: int | None = None, limit: int = DEFAULT_BUFFER) -> None:
        self.mode = mode  # json | text | off
        self.limit = limit  # bytes held for a reader that is behind (log.buffer)
        self._fd = sys.stdout.fileno() if fd is None else fd
        self._buf: list[bytes] = []
        self._scheduled = False
        self._sink: LineSink | None = None  # opened at the first line: "off" opens nothing
        self._told = False

    @property
    def dropped(self) -> int:
        return 0 if self._sink is None else self._sink.dropped

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
        sink = self._sink
        if sink is None or sink.fd != self._fd:  # (tests point _fd at a pipe of theirs)
            if sink is not None:
                sink.close()
            sink = self._sink = LineSink(self._fd, self.limit)
        sink.limit = self.limit
        lines, self._buf = self._buf, []
        sink.write(lines)
        if sink.dropped and not self._told:
            self._told = True
            log.warning(
                "access log: its reader (stdout) is behind by more than log.buffer (%d bytes), or gone;"
                " dropping records until it catches up, counted in"
                ' edgeproxy_log_dropped_total{log="access"} (said once)',
                sink.limit,
            )

    async def close(self, timeout: float = 1.0) -> None:
        """At stop: give the reader up to ``timeout`` s without progress to take the rest."""
        self.flush()
        if self._sink is not None:
            await self._sink.drain(timeout)
            self._sink.close()


def _text(r: dict[str, Any]) -> str:
    return (
        f"{r.get('time')} {r.get('request_id')} {r.get('method')} {r.get('path')} {r.get('status')}"
        f" upstream={r.get('upstream')} endpoint={r.get('endpoint')} line={r.get('line')}"
        f" attempts={r.get('attempts')} ttfb_ms={r.get('ttfb_ms')} duration_ms={r.get('duration_ms')}"
        f" in={r.get('bytes_in')} out={r.get('bytes_out')} streamed={r.get('streamed')}"
        + (f" error={r['error']}" if r.get("error") else "")
    )
