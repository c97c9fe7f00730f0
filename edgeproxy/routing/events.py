"""Ejections and restores, logged and counted the same way wherever they happen (an attempt's
outcome in the engine, a probe in the server).

Labels: a line's event has model "*"; an origin's (one model at an endpoint, or "*": every
model) has line "*".
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..telemetry.metrics import Metrics
    from .lines import Path
    from .state import Upstream

__all__ = ["report_line", "report_origin"]

log = logging.getLogger("edgeproxy")


def report_line(metrics: Metrics, upstream: Upstream, path: Path, event: str, why: str) -> None:
    """``path``'s line was "ejected" or "restored"."""
    labels = (upstream.name, path.endpoint.url, path.line.name, "*")
    if event == "ejected":
        metrics.ejections.inc(labels)
        until = path.health.ejected_until - time.monotonic()
        log.warning("ejected %s after %s (for %.1fs)", path.label, why, until)
    else:
        metrics.restores.inc(labels)
        log.info("restored %s: %s", path.label, why)


def report_origin(metrics: Metrics, upstream: Upstream, path: Path, model: str | None, event: str, why: str) -> None:
    """``model`` (None: every model) at ``path``'s endpoint was "ejected" or "restored"."""
    host = path.endpoint.host
    labels = (upstream.name, path.endpoint.url, "*", model or "*")
    what = f"model {model}" if model is not None else "every model"
    if event == "ejected":
        metrics.ejections.inc(labels)
        entry = upstream.origins.get((path.endpoint.url, model))
        until = entry.ejected_until - time.monotonic() if entry is not None else 0.0
        log.warning("ejected %s at %s:%s after %s (for %.1fs)", what, upstream.name, host, why, until)
    else:
        metrics.restores.inc(labels)
        log.info("restored %s at %s:%s: %s", what, upstream.name, host, why)
