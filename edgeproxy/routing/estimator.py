"""Round-trip time estimation per path, and the one score formula selection uses.

Samples come from probes: a cheap timed HTTP request over the path's warm pool, about one
round trip to the origin itself. (Connection set-up times are recorded on the path for
display but not fed here: a middlebox that terminates TCP near the host answers the
handshake at once whatever lies behind it.)

Smoothing follows RFC 6298 (SRTT/RTTVAR, gains 1/8 and 1/4), with two changes for routing,
where a wrong answer moves real traffic:

* a median-of-three filter in front: one outlier sample (a 1 s spike) never reaches SRTT;
* level-shift detection: when the filtered sample sits outside SRTT +- max(4*RTTVAR,
  SHIFT_FLOOR), two of the last three samples agree the line really changed (a reroute, a
  congested link), and SRTT restarts at the new level instead of crawling there over ~20
  samples. Traffic follows within two probes, not minutes.

score(path) = SRTT, seconds. The whole-path part for `via` lines (hop RTT + the edge's own
RTT to the origin) is added by the owner. Lower is better; None means "not measured yet".
"""

from __future__ import annotations

from typing import Final

__all__ = ["Estimator"]

ALPHA: Final = 1 / 8  # RFC 6298 SRTT gain
BETA: Final = 1 / 4  # RFC 6298 RTTVAR gain
# Changes smaller than this are noise, however steady the line was (loopback's RTTVAR is
# microseconds; without a floor every scheduler hiccup would look like a shift).
SHIFT_FLOOR: Final = 0.005
WINDOW: Final = 3  # median-of-three


class Estimator:
    """SRTT/RTTVAR of one path. ``add(sample, now)`` for each measurement."""

    __slots__ = ("srtt", "rttvar", "samples", "shifts", "last_sample", "last_at", "_recent")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar: float | None = None
        self.samples = 0
        self.last_sample: float | None = None
        self.last_at: float | None = None
        self._recent: list[float] = []
        self.shifts = 0  # level shifts seen

    def __repr__(self) -> str:
        if self.srtt is None:
            return "<Estimator unmeasured>"
        return f"<Estimator srtt={self.srtt * 1000:.2f}ms rttvar={(self.rttvar or 0) * 1000:.2f}ms n={self.samples}>"

    def score(self) -> float | None:
        return self.srtt

    def add(self, sample: float, now: float) -> None:
        """Feed one RTT measurement (seconds), taken at ``now`` (monotonic seconds)."""
        if sample < 0:
            return
        self.samples += 1
        self.last_sample = sample
        self.last_at = now
        recent = self._recent
        recent.append(sample)
        if len(recent) > WINDOW:
            del recent[0]
        srtt, rttvar = self.srtt, self.rttvar
        if len(recent) < WINDOW or srtt is None or rttvar is None:
            # Warming up: the lowest sample so far (RFC 6298's first-sample rule, applied to
            # it). A first probe slowed by start-up load must not hold SRTT up for minutes.
            filtered = min(recent)
            self.srtt, self.rttvar = filtered, filtered / 2
            return
        filtered = sorted(recent)[WINDOW // 2]
        delta = abs(filtered - srtt)
        if delta > max(4 * rttvar, SHIFT_FLOOR):
            # Two of three samples moved together: a new level. Restart there (RFC 6298's
            # first-sample rule), keeping RTTVAR wide enough to absorb the settling.
            self.srtt, self.rttvar = filtered, max(rttvar, delta / 4)
            self.shifts += 1
            return
        self.rttvar = (1 - BETA) * rttvar + BETA * delta
        self.srtt = (1 - ALPHA) * srtt + ALPHA * filtered

    def rto(self, floor: float, ceiling: float) -> float | None:
        """A timeout for work that takes about one RTT here: SRTT + 4*RTTVAR, bounded."""
        if self.srtt is None or self.rttvar is None:
            return None
        return min(max(self.srtt + 4 * self.rttvar, floor), ceiling)
