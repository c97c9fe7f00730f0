"""The demo's terminal: blocks of styled lines, redrawn in place on a terminal, one after
another otherwise (a pipe, a test)."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from typing import Final, TextIO

__all__ = ["REFRESH", "STYLES", "Screen", "Segment", "keep_drawn", "state_style"]

REFRESH: Final = 0.5  # seconds between redraws of a scene's live block

# ANSI styles: bold, dim, red, green, yellow, cyan
STYLES: Final = {"b": "1", "d": "2", "r": "31", "g": "32", "y": "33", "c": "36", "rb": "1;31", "gb": "1;32"}
Segment = tuple[str, str]  # (text, style key or "")


def state_style(state: str) -> str:
    """A path's state in a table: green up, red down or ejected, yellow anything between."""
    return "g" if state == "up" else "r" if state in ("down", "ejected") else "y"


class Screen:
    """Draws blocks of lines: redrawn in place on a terminal, one after another otherwise."""

    def __init__(self, out: TextIO, color: bool, live: bool) -> None:
        self.out, self.color, self.live = out, color, live
        self._drawn = 0

    def _fmt(self, line: list[Segment], width: int | None) -> str:
        parts, used = [], 0
        for text, style in line:
            if width is not None:
                text = text[: max(0, width - used)]
            used += len(text)
            code = STYLES.get(style) if self.color else None
            parts.append(f"\x1b[{code}m{text}\x1b[0m" if code and text else text)
        return "".join(parts)

    def draw(self, block: list[list[Segment]]) -> None:
        if self.live:
            width = shutil.get_terminal_size((100, 30)).columns - 1
            # up to the first line drawn last time, erase to the end; the first time, hide the cursor
            head = f"\r\x1b[{self._drawn}A\x1b[J" if self._drawn else "\x1b[?25l"
            self.out.write(head + "".join(self._fmt(ln, width) + "\n" for ln in block))
            self._drawn = len(block)
        else:
            self.out.write("".join(self._fmt(ln, None) + "\n" for ln in block) + "\n")
        self.out.flush()

    def print(self, lines: list[list[Segment]]) -> None:
        """Lines that stay (not redrawn)."""
        self._drawn = 0
        self.out.write("".join(self._fmt(ln, None) + "\n" for ln in lines))
        self.out.flush()

    def close(self) -> None:
        if self.live:
            self.out.write("\x1b[?25h")
            self.out.flush()


async def keep_drawn(
    screen: Screen, look: Callable[[], None], block: Callable[[], list[list[Segment]]], tick: float
) -> None:
    """A scene's display, until cancelled: ``look`` at its state every ``tick`` seconds, redraw
    its live ``block`` every REFRESH."""
    next_draw = 0.0
    while True:
        look()
        if time.monotonic() >= next_draw:
            screen.draw(block())
            next_draw = time.monotonic() + REFRESH
        await asyncio.sleep(tick)
