"""The process log (Python logging) to stderr, through a ``LineSink``: it never blocks.

logging's own StreamHandler writes with a blocking write(2) from whichever thread logs, the
event loop's mostly: a stderr nobody reads (a stuck log shipper, `2>&1 | slow-reader`) would
freeze the proxy at its next log line. This handler formats a record into one line (a
traceback stays in its record), hands it to the sink and returns. A reader behind by more than
``log.buffer`` loses whole records, counted (edgeproxy_log_dropped_total{log="process"}); the
first loss is said once, by a notice put in the stream where the records went missing.
"""

from __future__ import annotations

import logging
import sys

from .sink import LineSink

__all__ = ["ProcessLogHandler", "install", "process_log_dropped", "set_limit"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ProcessLogHandler(logging.Handler):
    def __init__(self, fd: int, limit: int) -> None:
        super().__init__()
        self.sink = LineSink(fd, limit)
        self._told = False
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return
        self.sink.write([line])
        if self.sink.dropped and not self._told:
            self._told = True
            notice = logging.LogRecord(
                "edgeproxy",
                logging.WARNING,
                __file__,
                0,
                "process log: its reader (stderr) is behind by more than log.buffer (%d bytes), or gone;"
                " dropping records until it catches up, counted in"
                ' edgeproxy_log_dropped_total{log="process"} (said once)',
                (self.sink.limit,),
                None,
            )
            self.sink.write([(self.format(notice) + "\n").encode()], force=True)

    def flush(self) -> None:
        self.sink.flush()

    def close(self, timeout: float = 1.0) -> None:
        """At exit: the reader gets up to ``timeout`` s without progress to take the rest."""
        self.sink.close(timeout)
        super().close()


def install(level: str, limit: int) -> ProcessLogHandler:
    """The root logger's one handler: stderr, never blocking."""
    handler = ProcessLogHandler(sys.stderr.fileno(), limit)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return handler


def process_log_dropped() -> int:
    """Records the process log dropped (0 when it is not ours: embedded, tests)."""
    return sum(h.sink.dropped for h in logging.getLogger().handlers if isinstance(h, ProcessLogHandler))


def set_limit(limit: int) -> None:
    """log.buffer changed on a reload."""
    for h in logging.getLogger().handlers:
        if isinstance(h, ProcessLogHandler):
            h.sink.limit = limit
