"""Who is healthy: per-path state from active probes (and, later, from real attempts).

Health says yes or no and when to look again; it never picks a path (that is ``select``).
A path that fails a probe is looked at again soon (QUICK_REPROBE, doubling up to the probe
interval) rather than after a full interval, so a line that comes back is used again quickly
and one that is really dead is confirmed dead quickly.
"""

from __future__ import annotations

import random
from typing import Final

__all__ = ["Health"]

QUICK_REPROBE: Final = 0.5  # seconds until the first re-probe after a failure
JITTER: Final = 0.1  # +-10% on the probe interval, so paths don't probe in lockstep

UNKNOWN: Final = "unknown"
UP: Final = "up"
DOWN: Final = "down"


class Health:
    """Probe-driven state of one path: unknown -> up | down."""

    __slots__ = ("consecutive_failures", "last_error", "last_probe_at", "last_probe_ok", "probes", "state")

    def __init__(self) -> None:
        self.state = UNKNOWN
        self.consecutive_failures = 0
        self.last_probe_at: float | None = None
        self.last_probe_ok: bool | None = None
        self.last_error: str | None = None
        self.probes = 0

    def __repr__(self) -> str:
        return f"<Health {self.state} fails={self.consecutive_failures}>"

    def is_healthy(self) -> bool:
        return self.state != DOWN

    def on_probe(self, ok: bool, now: float, error: str | None = None) -> bool:
        """Record a probe result; True if the state changed."""
        before = self.state
        self.probes += 1
        self.last_probe_at = now
        self.last_probe_ok = ok
        if ok:
            self.consecutive_failures = 0
            self.state = UP
        else:
            self.consecutive_failures += 1
            self.last_error = error
            self.state = DOWN
        return self.state != before

    def next_probe_in(self, interval: float, rng: random.Random | None = None) -> float:
        """Seconds until this path should be probed again."""
        if self.consecutive_failures:
            return min(interval, QUICK_REPROBE * 2 ** (self.consecutive_failures - 1))
        r = (rng or random).uniform(-JITTER, JITTER)
        return interval * (1 + r)
