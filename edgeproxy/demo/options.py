"""The demo's command-line options, for ``edgeproxy demo`` and ``python -m edgeproxy.demo``.

Light on purpose (argparse only): the cli imports it to build its parser for every command.
"""

from __future__ import annotations

import argparse

__all__ = ["add_demo_arguments"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, for ``edgeproxy demo`` and ``python -m edgeproxy.demo``."""
    parser.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="ANSI colours (auto: on a terminal)"
    )
    parser.add_argument(
        "--scene",
        choices=("all", "lines", "edge"),
        default="all",
        help="lines: two lines, a degrade and a failover (30 s); edge: a sidecar and an edge across a"
        " simulated border, the bytes saved, a black hole (15 s); all: both (default)",
    )
    parser.add_argument(
        "--duration-scale", type=float, default=1.0, help="stretch or shrink the scripts (0.25: about 8 s + 10 s)"
    )
