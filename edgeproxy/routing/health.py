"""Who is healthy: per-path state from active probes and from real attempts.

Health says yes or no and when to look again; it never picks a path (that is ``select``).

Probes: a failed probe makes the path suspect and it is probed again soon (QUICK_REPROBE,
doubling up to the probe interval); a second failure in a row marks it ``down``. One slow
probe (a 1 s spike) therefore moves no traffic. An *urgent* probe (sent because a real
request already waits too long on the path) counts the same; its failure also has the
requests waiting on the path sent elsewhere at once (the server does that), and the next
urgent probe follows within a quarter second, so a dead line is down within about a second.

Attempts (passive outlier detection, as Envoy does it): locally originated failures
(connect refused or timed out, reset, no response headers in time) and origin errors (5xx)
are counted apart, each in a run of consecutive failures. A run of EJECT_AFTER_LOCAL, or of
EJECT_AFTER_5XX, ejects the path for a time that doubles with each ejection. It comes back
through a successful probe, or when the time is up, through one trial request (half-open): a
success restores it, a failure ejects it again for longer.
"""

from __future__ import annotations

import random
from typing import Final

__all__ = ["Health"]

QUICK_REPROBE: Final = 0.5  # seconds until the first re-probe after a failure
DOWN_AFTER: Final = 2  # failed probes in a row that mark a path down
JITTER: Final = 0.1  # +-10% on the probe interval, so paths don't probe in lockstep
EJECT_AFTER_LOCAL: Final = 3
EJECT_AFTER_5XX: Final = 5
BASE_EJECTION: Final = 2.0  # seconds; doubles per ejection
MAX_EJECTION: Final = 120.0
# A path that has worked this long after its last ejection has one ejection forgiven.
DECAY_AFTER: Final = 60.0

UNKNOWN: Final = "unknown"
UP: Final = "up"
DOWN: Final = "down"  # the last probe failed
EJECTED: Final = "ejected"  # real attempts kept failing


class Health:
    """State of one path: unknown -> up | down | ejected."""

    __slots__ = (
        "consecutive_failures",
        "ejected_at",
        "ejected_until",
        "ejections",
        "last_error",
        "last_probe_at",
        "last_probe_ok",
        "local_failures",
        "origin_failures",
        "probes",
        "state",
        "trial",
    )

    def __init__(self) -> None:
        self.state = UNKNOWN
        self.consecutive_failures = 0  # failed probes in a row
        self.local_failures = 0  # locally originated attempt failures in a row
        self.origin_failures = 0  # 5xx answers in a row
        self.ejections = 0
        self.ejected_until = 0.0
        self.ejected_at = 0.0  # when the last ejection happened
        self.trial = False  # a half-open trial request is out
        self.last_probe_at: float | None = None
        self.last_probe_ok: bool | None = None
        self.last_error: str | None = None
        self.probes = 0

    def __repr__(self) -> str:
        return f"<Health {self.state} probe_fails={self.consecutive_failures} local={self.local_failures}>"

    def is_healthy(self, now: float) -> bool:
        if self.state == DOWN:
            return False
        if self.state == EJECTED:
            return now >= self.ejected_until and not self.trial  # half-open: one trial may go
        return True

    def may_take_trial(self, now: float) -> bool:
        """Could a request go to this path now (without claiming anything)?"""
        return self.state != EJECTED or (now >= self.ejected_until and not self.trial)

    def take_trial(self, now: float) -> bool:
        """May a request go to this path now? For an ejected path whose time is up, once:
        that request is the half-open trial (the rest wait for its outcome)."""
        if not self.may_take_trial(now):
            return False
        if self.state == EJECTED:
            self.trial = True
        return True

    def badness(self) -> int:
        """For ranking when nothing is healthy: failures in a row, of any kind."""
        return self.consecutive_failures + self.local_failures + self.origin_failures

    def on_probe(self, ok: bool, now: float, error: str | None = None) -> bool:
        """Record a probe result; True if the state changed."""
        before = self.state
        self.probes += 1
        self.last_probe_at = now
        self.last_probe_ok = ok
        if ok:
            self.consecutive_failures = 0
            if self.state != EJECTED or now >= self.ejected_until or self.local_failures:
                # A probe proves the line works; an ejection for 5xx (the origin misbehaving
                # on real requests while answering probes) serves out its time.
                self.state = UP
                self.local_failures = 0
        else:
            self.consecutive_failures += 1
            self.last_error = error
            if self.consecutive_failures >= DOWN_AFTER:
                self.state = DOWN
        return self.state != before

    def on_attempt(self, outcome: str, now: float, started: float | None = None) -> bool:
        """Record a real attempt: "ok", "local" (connect/reset/timeout) or "5xx".

        True if the path was ejected (or restored) by it.
        """
        before = self.state
        trial, self.trial = self.trial, False
        if outcome == "ok":
            self.local_failures = self.origin_failures = 0
            if self.ejections and now - self.ejected_until > DECAY_AFTER:
                self.ejections -= 1
            if self.state == EJECTED:
                self.state = UP
            return self.state != before
        if (self.state == EJECTED and not trial) or (started is not None and started < self.ejected_at):
            return False  # a request sent before the last ejection: it says nothing new
        if outcome == "local":
            self.local_failures += 1
            run, limit = self.local_failures, EJECT_AFTER_LOCAL
        else:
            self.origin_failures += 1
            run, limit = self.origin_failures, EJECT_AFTER_5XX
        if run >= limit or trial:  # a failed half-open trial ejects again, for longer
            self.ejections += 1
            self.ejected_at = now
            self.ejected_until = now + min(BASE_EJECTION * 2 ** (self.ejections - 1), MAX_EJECTION)
            if self.state != DOWN:
                self.state = EJECTED
            return True
        return False

    def next_probe_in(self, interval: float, rng: random.Random | None = None) -> float:
        """Seconds until this path should be probed again."""
        if self.consecutive_failures:
            return min(interval, QUICK_REPROBE * 2 ** (self.consecutive_failures - 1))
        r = (rng or random).uniform(-JITTER, JITTER)
        return interval * (1 + r)
