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
        "--duration-scale", type=float, default=1.0, help="stretch or shrink the script (0.25: about 8 s)"
    )
