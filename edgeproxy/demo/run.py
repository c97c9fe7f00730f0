"""Running the demo's scenes one after another: edgeproxy's own log lines shown as each
scene's events, everything a scene opened closed at its end, whatever happened."""

from __future__ import annotations

import asyncio
import logging
from typing import Final, Protocol

from .edge import EdgeDemo
from .results import EdgeResults, Results
from .scenario import Demo
from .screen import Screen, Segment

__all__ = ["SCENES", "LogEvents", "Scene", "run"]

SCENES: Final = ("lines", "edge")


class Scene(Protocol):
    @property
    def results(self) -> Results | EdgeResults: ...

    def on_log(self, record: logging.LogRecord) -> None: ...

    async def run(self) -> None: ...

    async def stop(self) -> None: ...

    def summary(self) -> list[list[Segment]]: ...


class LogEvents(logging.Handler):
    """edgeproxy's own log lines (a path up or down, an ejection) become demo events."""

    def __init__(self, scene: Scene, level: int) -> None:
        super().__init__(level)
        self.scene = scene

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.scene.on_log(record)
        except Exception:  # a display problem must not break the proxy's logging
            self.handleError(record)


async def run(screen: Screen, scale: float, scenes: tuple[str, ...] = SCENES) -> list[Results | EdgeResults]:
    """Run ``scenes`` in order, each with its summary printed at its end; their results."""
    done: list[Results | EdgeResults] = []
    for i, name in enumerate(scenes):
        if i:
            screen.print([[], []])
        scene: Scene = Demo(screen, scale) if name == "lines" else EdgeDemo(screen, scale)
        done.append(scene.results)
        await run_scene(scene)
        screen.print(scene.summary())
    return done


async def run_scene(scene: Scene) -> None:
    handlers = [(logging.getLogger("edgeproxy"), LogEvents(scene, logging.INFO))]
    handlers.append((logging.getLogger(), LogEvents(scene, logging.WARNING)))
    ep = logging.getLogger("edgeproxy")
    saved = ep.level, ep.propagate
    ep.setLevel(logging.INFO)
    ep.propagate = False
    for logger, handler in handlers:
        logger.addHandler(handler)
    try:
        await scene.run()
    except asyncio.CancelledError:
        scene.results.interrupted = True
        raise
    finally:
        try:
            await scene.stop()
        finally:
            for logger, handler in handlers:
                logger.removeHandler(handler)
            ep.setLevel(saved[0])
            ep.propagate = saved[1]
