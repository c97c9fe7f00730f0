"""Running a Demo: edgeproxy's own log lines shown as demo events, everything the demo
opened closed at the end, whatever happened."""

from __future__ import annotations

import asyncio
import logging

from .results import Results
from .scenario import Demo
from .screen import Screen

__all__ = ["LogEvents", "run"]


class LogEvents(logging.Handler):
    """edgeproxy's own log lines (a path up or down, an ejection) become demo events."""

    def __init__(self, demo: Demo, level: int) -> None:
        super().__init__(level)
        self.demo = demo

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.demo.on_log(record)
        except Exception:  # a display problem must not break the proxy's logging
            self.handleError(record)


async def run(screen: Screen, scale: float) -> Results:
    demo = Demo(screen, scale)
    handlers = [(logging.getLogger("edgeproxy"), LogEvents(demo, logging.INFO))]
    handlers.append((logging.getLogger(), LogEvents(demo, logging.WARNING)))
    ep = logging.getLogger("edgeproxy")
    saved = ep.level, ep.propagate
    ep.setLevel(logging.INFO)
    ep.propagate = False
    for logger, handler in handlers:
        logger.addHandler(handler)
    try:
        await demo.run()
    except asyncio.CancelledError:
        demo.results.interrupted = True
        raise
    finally:
        try:
            await demo.stop()
        finally:
            for logger, handler in handlers:
                logger.removeHandler(handler)
            ep.setLevel(saved[0])
            ep.propagate = saved[1]
    return demo.results
