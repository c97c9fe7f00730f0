"""``edgeproxy demo``: route choice, failover and the edge hop, live, on this machine alone.

No network, no API key, under a minute; two scenes, in one (uv)loop, in-process.

**lines** (about 30 s):

* a tiny fake OpenAI origin (``FakeOrigin``) on 127.0.0.1;
* two simulated lines (``Line``), TCP relays in front of the origin that add a one-way delay
  to each direction, or turn into a black hole (accept, forward nothing);
* edgeproxy itself (``Proxy``) with one ``openai`` upstream of two endpoints, one per line,
  probing every second.

A little traffic (10 completions a second, a stream now and then) goes through edgeproxy
while a script degrades, restores and then kills line A; the terminal shows each line's RTT as
edgeproxy measures it, which line carries the traffic, and what happened.

**edge** (about 15 s): an app and its API on two sides of a simulated border (90 ms and
1 Mbit/s each way); an edge edgeproxy next to the fake origin, a sidecar edgeproxy next to the
app with two `via` lines to it over two ways across. One multi-turn conversation goes both
straight across and through the sidecar, at once: time to first token and bytes across the
border, each way. Then the line carrying the sidecar's traffic becomes a black hole while
requests go on, and the demo shows, measured, how long edgeproxy took to leave it.

Everything a scene started is closed at its end, on Ctrl-C too.

One limit the scripts step around rather than hide: a stream whose first event already
reached the client cannot move to another line when its line dies (the client has part of the
answer); edgeproxy ends it with an in-band error after ``failover.stream_idle_timeout``. The
demo starts no stream in the moment before a line dies, so that every request in flight then
is one that can still fail over.

Run: ``edgeproxy demo`` or ``python -m edgeproxy.demo [--scene all|lines|edge] [--color
auto|always|never]``.

Modules: ``world`` (the fake origin, the lines, edgeproxy over them: the lines scene's proxy,
an edge, a sidecar), ``scenario`` (the lines scene's ``Demo``: its client traffic, what it
watches, the script), ``edge`` (the edge scene's ``EdgeDemo``), ``conversation`` (the edge
scene's made-up conversations), ``run`` (the scenes run with edgeproxy's log shown as events),
``screen`` (the terminal), ``results`` (what they saw and the summaries), ``options`` (the
command-line options). ``main`` here; importing the package loads none of the server stack
(``main`` does).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from .options import add_demo_arguments
from .results import EdgeResults, Results
from .screen import Screen

__all__ = ["Screen", "add_demo_arguments", "main"]


def main(
    args: argparse.Namespace | None = None,
    *,
    duration_scale: float = 1.0,
    out: TextIO = sys.stdout,
    color: bool | None = None,
    scene: str | None = None,
) -> int:
    """Run the demo. 0: edgeproxy did what the scripts expect; 1: it did not (the summaries
    say what); 130: interrupted. ``args`` may carry ``color`` (auto/always/never),
    ``duration_scale`` and ``scene`` (all/lines/edge); the keyword arguments win when given."""
    # The server stack loads here, not when the package is imported: the cli imports it for
    # the demo's options, and ``edgeproxy check`` must run on a bare python.
    import uvloop

    from .run import run

    if color is None and args is not None and getattr(args, "color", "auto") in ("always", "never"):
        color = args.color == "always"
    if duration_scale == 1.0 and args is not None and getattr(args, "duration_scale", None):
        duration_scale = float(args.duration_scale)
    if scene is None:
        scene = getattr(args, "scene", None) or "all"
    scenes = ("lines", "edge") if scene == "all" else (scene,)
    is_tty = bool(getattr(out, "isatty", lambda: False)())
    if color is None:
        color = is_tty and os.environ.get("NO_COLOR", "") == "" and os.environ.get("TERM") != "dumb"
    screen = Screen(out, color, live=is_tty)
    results: list[Results | EdgeResults] | None = None
    try:
        results = uvloop.run(run(screen, duration_scale, scenes))
    except KeyboardInterrupt:
        results = None
    except OSError as exc:  # cannot bind on 127.0.0.1, out of file descriptors...
        out.write(f"\nedgeproxy demo: cannot run: {exc}\n")
        return 1
    finally:
        screen.close()
    if results is None:
        out.write("\ninterrupted: everything the demo started is closed\n")
        out.flush()
        return 130
    return 0 if all(r.passed() for r in results) else 1
