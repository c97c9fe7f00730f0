"""Who gets the next request: the order in which an upstream's paths are tried.

A pure function of a snapshot (no sockets, no clock reads): the estimator and health are read
by the caller into ``Candidate`` rows; ``order`` decides. Rules, in order:

1. Healthy paths first. If none is healthy, all of them, least bad first: never refuse to try;
   but the current path stays first while none is healthy (see ``_all_down``).
2. Within that, the best (lowest) priority tier first; lower tiers follow as fallbacks.
3. Within a tier, lowest score first (score = the estimator's SRTT, see ``estimator``);
   unmeasured paths after measured ones, then config order.
4. Hysteresis: the current path stays first unless another beats it by more than
   ``tolerance`` (no flapping between lines that are about equal).

Spilling (a path whose in-flight requests reached its pool size goes after the others) is
decided per request by the caller, on top of this order, because in-flight counts change
with every request while this order changes only with probes.

Weights (``Split``): when an upstream's endpoints have a ``weight``, a request's first attempt
goes to an endpoint of the best healthy tier chosen by smooth weighted round robin (as nginx
does it: each pick adds every member's weight to its credit, the member with the most credit
goes and pays back the total), so the shares are exact over any run of picks and interleaved,
not in bursts; that endpoint's paths come first, in the order above (its best line), then the
rest. An endpoint with no healthy path is not a member: its share goes to the others, and
comes back when it is healthy again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Candidate", "Split", "order"]


@dataclass(frozen=True, slots=True)
class Candidate:
    key: Any  # hashable: the caller's path key
    priority: int
    score: float | None  # seconds; None = not measured yet
    healthy: bool
    index: int  # config order, the last tie-breaker
    failures: int = 0  # recent failures, to rank paths when none is healthy


def _rank(c: Candidate) -> tuple[bool, float, int]:
    return (c.score is None, c.score if c.score is not None else 0.0, c.index)


def order(candidates: Sequence[Candidate], current: Hashable | None, tolerance: float) -> list[Candidate]:
    """All candidates, best first. ``current`` is the path that was first last time."""
    healthy = [c for c in candidates if c.healthy]
    if not healthy:
        return _all_down(candidates, current)
    rest = sorted((c for c in candidates if not c.healthy), key=lambda c: (c.priority, c.failures, *_rank(c)))
    tiers: dict[int, list[Candidate]] = {}
    for c in healthy:
        tiers.setdefault(c.priority, []).append(c)
    out: list[Candidate] = []
    for n, priority in enumerate(sorted(tiers)):
        tier = sorted(tiers[priority], key=_rank)
        if n == 0 and current is not None and len(tier) > 1:
            tier = _keep_current(tier, current, tolerance)
        out.extend(tier)
    out.extend(rest)
    return out


def _all_down(candidates: Sequence[Candidate], current: Hashable | None) -> list[Candidate]:
    """Nothing healthy: never refuse to try; least bad (fewest failures in a row) first, except
    that the current path keeps its place at the head.

    With every line dead, each probe round adds one failure to each path in turn, so "fewest
    failures" names another path after every probe: ranking by it alone moved the preference
    (a logged switch, a new pool taking the next request) several times a second while
    nothing changed. No dead path is a better bet than another, so stay; the others follow,
    least bad first, for retries. A path that works again is healthy and wins at once.
    """
    ranked = sorted(candidates, key=lambda c: (c.failures, c.priority, *_rank(c)))
    if current is None or ranked[0].key == current:
        return ranked
    cur = next((c for c in ranked if c.key == current), None)
    if cur is None:  # gone (a reload removed it): the least bad is the new choice
        return ranked
    return [cur, *(c for c in ranked if c is not cur)]


def _keep_current(tier: list[Candidate], current: Hashable, tolerance: float) -> list[Candidate]:
    best = tier[0]
    if best.key == current:
        return tier
    cur = next((c for c in tier if c.key == current), None)
    if cur is None or cur.score is None or best.score is None:
        return tier
    if best.score < cur.score - tolerance:
        return tier  # a real gain: switch
    return [cur, *(c for c in tier if c is not cur)]


class Split(Generic[T]):
    """Weighted shares of a tier's requests between endpoints (smooth weighted round robin)."""

    __slots__ = ("_credit", "_members", "_orders", "weights")

    def __init__(self, weights: dict[str, int]) -> None:
        self.weights = weights  # endpoint URL -> weight
        self._credit = dict.fromkeys(weights, 0)
        self._members: tuple[str, ...] = ()
        self._orders: dict[str, tuple[T, ...]] = {}

    def update(self, order: Sequence[T], members: Collection[str], url_of: Callable[[T], str]) -> None:
        """The try order changed: ``members`` (URLs) share the first attempts; each one's
        order is its own paths first, then the others, all as in ``order``."""
        self._members = tuple(url for url in self.weights if url in members)
        for url in self.weights:
            if url not in members:
                self._credit[url] = 0  # (back with a clean slate)
        self._orders = {
            url: (*(p for p in order if url_of(p) == url), *(p for p in order if url_of(p) != url))
            for url in self._members
        }

    def pick(self) -> tuple[T, ...] | None:
        """The try order for the next request (None: no member, keep the plain order)."""
        members = self._members
        if len(members) < 2:
            return self._orders[members[0]] if members else None
        credit, weights = self._credit, self.weights
        best, total = members[0], 0
        for url in members:
            credit[url] += weights[url]
            total += weights[url]
            if credit[url] > credit[best]:
                best = url
        credit[best] -= total
        return self._orders[best]
