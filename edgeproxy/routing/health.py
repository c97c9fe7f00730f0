"""Who is healthy: a path's line (probes, local failures) and an endpoint's models (origin
outcomes of real attempts).

Health says yes or no and when to look again; it never picks a path (that is ``select``).

Two things fail apart, and are tracked apart:

- **The line** (``Health``, one per path): probes, and locally originated failures of real
  attempts (connect refused or timed out, reset). A failed probe makes the path suspect and it
  is probed again soon (QUICK_REPROBE, doubling up to DOWN_REPROBE); a second failure in a row
  marks it ``down``. One slow probe (a 1 s spike) therefore moves no traffic. An *urgent* probe
  (a real request already waits too long on the path) counts the same; its failure also has the
  requests waiting on the path sent elsewhere at once (the server does that). A probe answered
  with a 5xx fails too: the origin answers nothing useful there, whatever the model. A run of
  ``failover.ejection.local_failures`` ejects the path.
- **The origin, per model** (``OriginHealth``, one per endpoint and model, kept by the upstream
  only while something is wrong): 5xx answers, timeouts on a line that probes healthy, stalled
  streams, and 429 cool-downs. A run of ``origin_errors`` for one model ejects that model at
  that endpoint; the other models keep it. The endpoint as a whole (the entry for model None) is
  ejected when its run of errors spans two models or more (everything fails), or when the
  model is unknown.

An ejection lasts ``base_time``, doubling per ejection up to ``max_time``. When it is up, one
request is the half-open trial: a success restores at once, a failure ejects again for longer.
A probe that answers restores an ejected line, and a path that comes back up from ``down`` clears
its endpoint's origin ejections (the outage was the whole origin's). A path or model that works
for RESET_AFTER after its restore has its back-off forgotten.
"""

from __future__ import annotations

import random
from typing import Final

from ..config import EjectionConfig

__all__ = ["Health", "OriginHealth"]

QUICK_REPROBE: Final = 0.5  # seconds until the first re-probe after a failure
# A path that is down is probed at least this often: its recovery is seen within it.
DOWN_REPROBE: Final = 2.0
DOWN_AFTER: Final = 2  # failed probes in a row that mark a path down
JITTER: Final = 0.1  # +-10% on the probe interval, so paths don't probe in lockstep
# A half-open trial with no outcome this long (its client went away first) is forgotten.
TRIAL_LOST: Final = 30.0
# Working this long after a restore: the back-off starts again from base_time.
RESET_AFTER: Final = 60.0

DEFAULT_EJECTION: Final = EjectionConfig()

UNKNOWN: Final = "unknown"
UP: Final = "up"
DOWN: Final = "down"  # the last probes failed
EJECTED: Final = "ejected"  # real attempts kept failing
COOLING: Final = "cooling"  # the origin asked for a pause (429)
HALF_OPEN: Final = "half-open"  # the ejection is over: the next request is a trial


class _Ejection:
    """Ejection with a growing back-off and a half-open trial; shared by the line's health and
    the origin's."""

    __slots__ = ("ejected_at", "ejected_until", "ejections", "restored_at", "trial", "trial_at")

    def __init__(self) -> None:
        self.ejections = 0  # ejections since the back-off was last forgotten
        self.ejected_at = 0.0  # when the last ejection happened
        self.ejected_until = 0.0
        self.restored_at = 0.0
        self.trial = False  # a half-open trial request is out
        self.trial_at = 0.0

    def is_ejected(self) -> bool:
        raise NotImplementedError

    def _trial_out(self, now: float) -> bool:
        # A trial whose outcome never came (its client left first) is forgotten after a while.
        return self.trial and now - self.trial_at < TRIAL_LOST

    def may_take_trial(self, now: float) -> bool:
        """Could a request go here now (without claiming anything)?"""
        return not self.is_ejected() or (now >= self.ejected_until and not self._trial_out(now))

    def take_trial(self, now: float) -> bool:
        """May a request go here now? Once ejected and the time is up: that request is the
        half-open trial (the rest wait for its outcome)."""
        if not self.may_take_trial(now):
            return False
        if self.is_ejected():
            self.trial, self.trial_at = True, now
        return True

    def _stale(self, trial: bool, started: float | None) -> bool:
        """A failure that says nothing new: ejected and not the trial, or sent before the
        last ejection."""
        return (self.is_ejected() and not trial) or (started is not None and started < self.ejected_at)

    def _eject(self, now: float, ejection: EjectionConfig) -> None:
        if self.ejections and self.restored_at and now - self.restored_at > RESET_AFTER:
            self.ejections = 0  # it worked for long enough since the last time: start afresh
        self.ejections += 1
        self.ejected_at = now
        self.ejected_until = now + min(ejection.base_time * 2 ** (self.ejections - 1), ejection.max_time)

    def _forgive(self, now: float) -> None:
        if self.ejections and now - self.restored_at > RESET_AFTER and now - self.ejected_until > RESET_AFTER:
            self.ejections = 0


class Health(_Ejection):
    """The line of one path: unknown -> up | down | ejected."""

    __slots__ = (
        "connect_failures",
        "consecutive_failures",
        "last_error",
        "last_probe_at",
        "last_probe_ok",
        "local_failures",
        "probes",
        "previous",
        "state",
        "suspect",
    )

    def __init__(self) -> None:
        super().__init__()
        self.suspect = False  # an urgent probe failed; the re-probe's verdict is pending
        self.state = UNKNOWN
        self.consecutive_failures = 0  # failed probes in a row
        self.local_failures = 0  # locally originated attempt failures in a row
        self.connect_failures = 0  # real requests that could not connect, in a row
        self.last_probe_at: float | None = None
        self.last_probe_ok: bool | None = None
        self.last_error: str | None = None
        self.probes = 0
        self.previous = UNKNOWN  # the state before the last probe

    def __repr__(self) -> str:
        return f"<Health {self.state} probe_fails={self.consecutive_failures} local={self.local_failures}>"

    def is_ejected(self) -> bool:
        return self.state == EJECTED

    def is_healthy(self, now: float) -> bool:
        if self.state == DOWN:
            return False
        if self.state == EJECTED:
            return now >= self.ejected_until and not self._trial_out(now)  # half-open: one trial may go
        return True

    def answers(self) -> bool:
        """Does the line answer probes right now (up, its last probe ok)? A timeout on it is
        then the origin's silence, not the line's."""
        return self.state == UP and self.last_probe_ok is True

    def badness(self) -> int:
        """For ranking when nothing is healthy: failures in a row, of any kind."""
        return self.consecutive_failures + self.local_failures

    def on_probe(self, ok: bool, now: float, error: str | None = None, urgent: bool = False) -> str | None:
        """Record a probe result; the new state if it changed ("up" after "down" or
        "ejected": restored), else None. Two failures in a row mark the path down; a failed
        ``urgent`` probe (sent because a real request already went wrong) makes it ``suspect``
        meanwhile: passed over by new requests, its route preference kept."""
        before = self.state
        self.probes += 1
        self.last_probe_at = now
        self.last_probe_ok = ok
        if ok:
            self.consecutive_failures = 0
            self.local_failures = self.connect_failures = 0
            self.suspect = False
            if self.state == EJECTED:
                self.restored_at = now  # the line answers: what ejected it is gone
            self.state = UP
        else:
            self.consecutive_failures += 1
            self.last_error = error
            if self.consecutive_failures >= DOWN_AFTER:
                self.state = DOWN
            elif urgent:
                # Something real already went wrong there: no new request goes to it until a
                # re-probe (sent at once) says whether the line is dead or that was a blip.
                self.suspect = True
        self.previous = before
        return self.state if self.state != before else None

    def on_attempt(
        self, outcome: str, now: float, started: float | None = None, ejection: EjectionConfig = DEFAULT_EJECTION
    ) -> str | None:
        """Record a real attempt: "ok", "connect" (could not connect) or "local" (reset, a
        rescue). "ejected", "restored" or "down" (two requests in a row could not connect: no
        need to wait for a probe) if that changed the state, else None."""
        if outcome == "ok" and started is not None and started < self.ejected_at:
            return None  # sent before the last ejection: says nothing new
        trial, self.trial = self.trial, False
        if outcome == "ok":
            self.local_failures = self.connect_failures = 0
            self._forgive(now)
            if self.state == EJECTED:
                self.state = UP
                self.restored_at = now
                return "restored"
            return None
        if self._stale(trial, started):
            return None
        if outcome == "connect":
            self.connect_failures += 1
            if self.connect_failures >= DOWN_AFTER and self.state not in (DOWN, EJECTED):
                self.state = DOWN
                self.consecutive_failures = max(self.consecutive_failures, 1)  # (probed again soon)
                self.local_failures += 1
                return "down"
        self.local_failures += 1
        if self.local_failures >= ejection.local_failures or trial:  # a failed trial ejects again
            self._eject(now, ejection)
            if self.state != DOWN:
                self.state = EJECTED
            return "ejected"
        return None

    def next_probe_in(self, interval: float, rng: random.Random | None = None) -> float:
        """Seconds until this path should be probed again."""
        if self.consecutive_failures:
            return min(interval, DOWN_REPROBE, QUICK_REPROBE * 2 ** (self.consecutive_failures - 1))
        r = (rng or random).uniform(-JITTER, JITTER)
        return interval * (1 + r)


class OriginHealth(_Ejection):
    """One model at one endpoint (or, for model None, the whole endpoint): origin errors in a
    row, ejection, and the pause a 429 asked for."""

    __slots__ = ("cooldown_until", "errors", "models", "state", "wide")

    def __init__(self, wide: bool) -> None:
        super().__init__()
        self.wide = wide  # the whole endpoint's entry
        self.state = UP
        self.errors = 0  # origin errors in a row
        self.models: set[str] = set()  # (the endpoint's entry) the models the run spans, up to 2
        self.cooldown_until = 0.0  # monotonic

    def __repr__(self) -> str:
        return f"<OriginHealth {self.state} errors={self.errors} ejections={self.ejections}>"

    def is_ejected(self) -> bool:
        return self.state == EJECTED

    def usable(self, now: float) -> bool:
        """Would a request go here now, trials aside?"""
        return self.cooldown_until <= now and self.may_take_trial(now)

    def idle(self, now: float) -> bool:
        """Nothing to remember: the upstream may drop this entry."""
        return self.state == UP and not self.errors and not self.ejections and self.cooldown_until <= now

    def on_ok(self, now: float, started: float | None = None) -> bool:
        """A good answer; True if it restored an ejection. One to a request sent before the
        last ejection says nothing new (a stream that began before the outage, ending now)."""
        if started is not None and started < self.ejected_at:
            return False
        self.trial = False
        self.errors = 0
        self.models.clear()
        self._forgive(now)
        if self.state == EJECTED:
            self.state = UP
            self.restored_at = now
            return True
        return False

    def on_error(
        self, now: float, started: float | None, ejection: EjectionConfig, model: str | None, decisive: bool = False
    ) -> bool:
        """An origin error for ``model``; True if it ejected. On the endpoint's own entry
        (``model`` is then who failed), a run ejects only if it spans two models or more,
        or a model that could not be told. A ``decisive`` one ejects at once: silence (a
        timeout on a line that answers probes, a stalled stream) took its client tens of
        seconds to see; the next request should not pay that again."""
        trial, self.trial = self.trial, False
        if self._stale(trial, started):
            return False
        self.errors += 1
        if self.wide and len(self.models) < 2:
            self.models.add(model or "")
        everything = not self.wide or len(self.models) > 1 or "" in self.models
        if trial or decisive or (self.errors >= ejection.origin_errors and everything):
            self._eject(now, ejection)
            self.state = EJECTED
            return True
        return False

    def restore(self, now: float) -> bool:
        """The origin answers again (a probe after an outage): lift the ejection now."""
        self.errors = 0
        self.models.clear()
        self.trial = False
        if self.state == EJECTED:
            self.state = UP
            self.restored_at = now
            return True
        return False

    def status(self, now: float) -> str:
        if self.state == EJECTED:
            return EJECTED if now < self.ejected_until else HALF_OPEN
        if self.cooldown_until > now:
            return COOLING
        return self.state
